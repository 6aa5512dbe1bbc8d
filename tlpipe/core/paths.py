"""Project paths, resolved from the project root, never from a worker's working directory."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from tlpipe.core.errors import UserError

ROOT_ENV = "TLPIPE_ROOT"
DVC_STAGE_ENV = "DVC_STAGE"
"""Set by DVC for every stage command it runs (the stage's name)."""
EXPERIMENT_WORKSPACES = (".dvc", "tmp", "exps")
"""Where DVC keeps the temporary workspaces of queued (``tmpXXX/``) and ``--temp`` (``standalone/tmpXXX/``)
experiments, inside the project's ``.dvc`` folder."""


class ProjectNotFoundError(UserError, RuntimeError):
    """No tlpipe project (a folder with params.yaml and dvc.yaml) was found."""


def find_root(start: Path | str | None = None) -> Path:
    """Return the project root.

    ``$TLPIPE_ROOT`` wins, except inside a DVC stage (``$DVC_STAGE`` set): DVC runs a
    stage in the workspace it reproduces, which for a queued or ``--temp`` experiment
    is a temporary copy of the project, so there the root is found from ``start``.
    Otherwise: the nearest folder at or above ``start`` (default: the working
    directory) holding both ``params.yaml`` and ``dvc.yaml``.
    """
    if os.environ.get(ROOT_ENV) and not os.environ.get(DVC_STAGE_ENV):
        return Path(os.environ[ROOT_ENV]).resolve()
    here = Path(start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / "params.yaml").is_file() and (folder / "dvc.yaml").is_file():
            return folder
    raise ProjectNotFoundError(
        f"no tlpipe project at or above {here}: expected params.yaml and dvc.yaml "
        f"(or set {ROOT_ENV})"
    )


def tracking_root(root: Path | str) -> Path:
    """The project whose tracking store (MLflow's ``mlflow.db``, ``mlartifacts/``) a stage at ``root`` uses.

    ``root`` itself, except in a DVC experiment's temporary workspace: ``dvc exp run --queue``
    (then ``dvc queue start``) and ``dvc exp run --temp`` run the stages in a copy of the project
    under ``<project>/.dvc/tmp/exps/[standalone/]<tmpdir>/`` that DVC deletes afterwards (DVC
    also passes ``$DVC_ROOT`` = ``<project>`` to those stages). Then it is ``<project>``, so every
    experiment logs into the store the user reads, whatever folder its stages ran in.
    """
    resolved = Path(root).resolve()
    parts = resolved.parts
    width = len(EXPERIMENT_WORKSPACES)
    for index in range(len(parts) - width, -1, -1):
        if parts[index:index + width] != EXPERIMENT_WORKSPACES:
            continue
        inside = parts[index + width:]
        if inside[:1] == ("standalone",):
            inside = inside[1:]
        if inside:  # inside[0] is the workspace; the rest is the project's place in the repository
            project = Path(*parts[:index], *inside[1:])
            if (project / "dvc.yaml").is_file():
                return project
    return resolved


METRICS_FOLDER = "metrics"


def metrics_file(name: str) -> str:
    """A DVC metrics file relative to the project root (as git and dvc.yaml name it): ``metrics/<name>.json``."""
    return f"{METRICS_FOLDER}/{name}.json"


@dataclass(frozen=True)
class ProjectPaths:
    """Every stage input and output, relative to one root (as listed in dvc.yaml)."""

    root: Path

    @property
    def params(self) -> Path:
        return self.root / "params.yaml"

    @property
    def selection(self) -> Path:
        """The select stage's choice (backbone and side), read by every later stage."""
        return self.root / "data" / "selection.json"

    @property
    def store(self) -> Path:
        return self.root / "data" / "store"

    @property
    def features(self) -> Path:
        return self.root / "data" / "features"

    @property
    def svm_models(self) -> Path:
        return self.root / "models" / "svm"

    @property
    def finetune_models(self) -> Path:
        return self.root / "models" / "finetune"

    @property
    def metrics(self) -> Path:
        return self.root / METRICS_FOLDER

    def stage_metrics(self, name: str) -> Path:
        """A DVC metrics file: ``metrics/<name>.json`` (a stage's, or ``evaluate_detail``)."""
        return self.root / metrics_file(name)

    def reports(self, stage: str) -> Path:
        """The reports folder of one stage."""
        return self.root / "reports" / stage


def project_paths(root: Path | str | None = None) -> ProjectPaths:
    """Paths of the project at ``root`` (found with :func:`find_root` when None)."""
    return ProjectPaths(Path(root).resolve() if root else find_root())
