"""Project paths, resolved from the project root, never from a worker's working directory."""

from __future__ import annotations

from tlpipe.errors import UserError
import os
from dataclasses import dataclass
from pathlib import Path

ROOT_ENV = "TLPIPE_ROOT"


class ProjectNotFoundError(UserError, RuntimeError):
    """No tlpipe project (a folder with params.yaml and dvc.yaml) was found."""


def find_root(start: Path | str | None = None) -> Path:
    """Return the project root.

    ``$TLPIPE_ROOT`` wins; otherwise the nearest folder at or above ``start``
    (default: the working directory) holding both ``params.yaml`` and ``dvc.yaml``.
    """
    if os.environ.get(ROOT_ENV):
        return Path(os.environ[ROOT_ENV]).resolve()
    here = Path(start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / "params.yaml").is_file() and (folder / "dvc.yaml").is_file():
            return folder
    raise ProjectNotFoundError(
        f"no tlpipe project at or above {here}: expected params.yaml and dvc.yaml "
        f"(or set {ROOT_ENV})"
    )


@dataclass(frozen=True)
class ProjectPaths:
    """Every stage input and output, relative to one root (as listed in dvc.yaml)."""

    root: Path

    @property
    def params(self) -> Path:
        return self.root / "params.yaml"

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
        return self.root / "metrics"

    def reports(self, stage: str) -> Path:
        """The reports folder of one stage."""
        return self.root / "reports" / stage


def project_paths(root: Path | str | None = None) -> ProjectPaths:
    """Paths of the project at ``root`` (found with :func:`find_root` when None)."""
    return ProjectPaths(Path(root).resolve() if root else find_root())
