"""MLflow tracking base shared by every stage.

* Store: ``$MLFLOW_TRACKING_URI`` or ``sqlite:///<root>/mlflow.db`` with artifacts
  under ``<root>/mlartifacts``; one experiment for the project.
* Runs: one *pipeline* (parent) run per pipeline execution, one child run per
  stage execution, grandchildren per model. DVC starts each stage in its own
  process, so the parent is passed explicitly: ``$TLPIPE_PARENT_RUN_ID`` when the
  pipeline flow (or ``tlpipe repro``) created it, otherwise the run tagged with
  the key of the ``dvc repro`` process that started this stage, created by the
  first stage of that ``dvc repro``.
* Every run is ended in a ``finally`` (FAILED on error); the reachability check
  retries a bounded number of times and then names the URI.
"""

from __future__ import annotations

from tlpipe.errors import UserError
import hashlib
import json
import os
import subprocess
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

EXPERIMENT = "tlpipe"
PARENT_ENV = "TLPIPE_PARENT_RUN_ID"
EXPERIMENT_ENV = "TLPIPE_EXPERIMENT"
SESSION_TAG = "tlpipe.session"
STAGE_TAG = "tlpipe.stage"
KIND_TAG = "tlpipe.kind"


class TrackingUnavailableError(UserError, RuntimeError):
    """The tracking server cannot be reached after bounded retries."""


def quiet_telemetry() -> None:
    """Switch off MLflow, Prefect and DVC telemetry for this process and its children.

    Also gives Prefect's ephemeral server a generous start-up timeout and quiets
    TensorFlow's start-up chatter. ``setdefault`` only: a user's own values win.
    """
    for key, value in {
        "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "1", "DVC_NO_ANALYTICS": "1",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120", "TF_CPP_MIN_LOG_LEVEL": "2",
    }.items():
        os.environ.setdefault(key, value)


def tracking_uri(root: Path) -> str:
    """``$MLFLOW_TRACKING_URI``, or the project's local SQLite store ``sqlite:///<project>/mlflow.db``.

    ``<project>`` is :func:`tlpipe.paths.tracking_root` of ``root``: a stage that DVC runs in a
    queued or ``--temp`` experiment's temporary workspace logs into the real project's store
    (and ``mlartifacts/``), not into a copy that DVC deletes. The local store is created on
    first use under a file lock (:func:`tlpipe.local_store.ensure_sqlite_store`): MLflow's own
    schema creation races when two experiments start at once.
    """
    if uri := os.environ.get("MLFLOW_TRACKING_URI"):
        return uri
    from tlpipe.local_store import ensure_sqlite_store
    from tlpipe.paths import tracking_root

    quiet_telemetry()
    return ensure_sqlite_store(tracking_root(root) / "mlflow.db")


def artifact_location(root: Path) -> str | None:
    """Artifact root for a new experiment: ``<root>/mlartifacts`` for the local store."""
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return None  # the server decides
    return (Path(root).resolve() / "mlartifacts").as_uri()


def connect(root: Path, attempts: int = 3, backoff_s: float = 1.0):
    """Return an ``MlflowClient`` on the project store, after a bounded reachability check.

    Raises:
        TrackingUnavailableError: Naming the URI, after ``attempts`` tries with
            exponential back-off.
    """
    quiet_telemetry()
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    import mlflow
    from mlflow import MlflowClient

    uri = tracking_uri(root)
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(tracking_uri=uri)
    error: Exception | None = None
    for attempt in range(attempts):
        try:
            client.search_experiments(max_results=1)
            return client
        except Exception as caught:  # any transport or store error
            error = caught
            if attempt + 1 < attempts:
                time.sleep(backoff_s * 2**attempt)
    raise TrackingUnavailableError(
        f"MLflow tracking store {uri} is unreachable after {attempts} attempts "
        f"({type(error).__name__}: {str(error).splitlines()[0][:200]}). Start the server, fix "
        "MLFLOW_TRACKING_URI, or unset it to use the local sqlite:///mlflow.db store."
    )


def ensure_experiment(client, root: Path) -> str:
    """Get or create the project's experiment; return its id."""
    name = os.environ.get(EXPERIMENT_ENV, EXPERIMENT)
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    try:
        return client.create_experiment(name, artifact_location=artifact_location(root))
    except Exception:  # created concurrently
        return client.get_experiment_by_name(name).experiment_id


def git_commit(root: Path) -> str:
    """The project's git commit (with ``-dirty`` when the tree has changes), or 'unknown'."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                                text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return commit + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def dvc_session_key() -> str | None:
    """A key for the ``dvc repro``/``dvc exp run`` process that started us, if any."""
    import psutil

    try:
        process = psutil.Process().parent()
        while process is not None:
            cmdline = " ".join(process.cmdline())
            if "dvc" in cmdline and any(verb in cmdline for verb in (" repro", " exp ")):
                return f"{process.pid}-{process.create_time():.3f}"
            process = process.parent()
    except (psutil.Error, OSError):
        return None
    return None


def create_pipeline_run(client, experiment_id: str, root: Path, tags: Mapping[str, str] | None = None) -> str:
    """Create a pipeline (parent) run and return its id."""
    run = client.create_run(experiment_id, run_name="pipeline", tags={
        KIND_TAG: "pipeline", "tlpipe.git_commit": git_commit(root), **(tags or {})})
    return run.info.run_id


def resolve_parent(client, experiment_id: str, root: Path) -> str | None:
    """The pipeline run this stage belongs to (see module docstring), or None."""
    if os.environ.get(PARENT_ENV):
        return os.environ[PARENT_ENV]
    key = dvc_session_key()
    if key is None:
        return None
    found = client.search_runs([experiment_id], filter_string=f"tags.`{SESSION_TAG}` = '{key}'", max_results=1)
    if found:
        return found[0].info.run_id
    return create_pipeline_run(client, experiment_id, root, {SESSION_TAG: key})


def flatten(prefix: str, value: object) -> dict[str, object]:
    """Flatten nested mappings into dotted keys (for params and tags)."""
    if isinstance(value, Mapping):
        items: dict[str, object] = {}
        for key, inner in value.items():
            items.update(flatten(f"{prefix}.{key}" if prefix else str(key), inner))
        return items
    return {prefix: value}


def hash_params(params: Mapping) -> str:
    """Short hash of a params mapping."""
    return hashlib.sha256(json.dumps(params, sort_keys=True, default=str).encode()).hexdigest()[:12]


@contextmanager
def stage_run(stage: str, root: Path, params: Mapping | None = None, data_hash: str | None = None,
              client=None) -> Iterator[str]:
    """Run one stage execution inside an MLflow child run of the pipeline run.

    The run is active (fluent API) inside the block, tagged with the stage name,
    git commit, data hash and the stage's DVC params, and always ended: FINISHED,
    or FAILED when the block raises. The pipeline run's end time is bumped too.

    Yields:
        The stage run id.
    """
    import mlflow

    client = client or connect(root)
    experiment_id = ensure_experiment(client, root)
    parent = resolve_parent(client, experiment_id, root)
    tags = {STAGE_TAG: stage, KIND_TAG: "stage", "tlpipe.git_commit": git_commit(root)}
    if data_hash:
        tags["tlpipe.data_hash"] = data_hash
    if parent:
        tags["mlflow.parentRunId"] = parent
    flat = flatten("", params or {})
    tags.update({f"dvc.params.{k}": str(v)[:5000] for k, v in flat.items()})
    run = client.create_run(experiment_id, run_name=stage, tags=tags)
    mlflow.set_experiment(experiment_id=experiment_id)
    status = "FAILED"
    try:
        with mlflow.start_run(run_id=run.info.run_id):
            if flat:
                mlflow.log_params({k: str(v)[:6000] for k, v in flat.items()})
            yield run.info.run_id
            status = "FINISHED"
    finally:
        if mlflow.active_run() is not None:
            mlflow.end_run(status)
        client.set_terminated(run.info.run_id, status)
        if parent:
            finish_pipeline_run(client, parent, stage, status)


def finish_pipeline_run(client, parent: str, stage: str, status: str) -> None:
    """Record a stage's outcome on the pipeline run and (re)close it with the latest end time."""
    try:
        client.set_tag(parent, f"tlpipe.stage_status.{stage}", status)
        current = client.get_run(parent).info.status
        final = "FAILED" if status == "FAILED" or current == "FAILED" else "FINISHED"
        client.set_terminated(parent, final)
    except Exception:  # never mask the stage's own outcome
        pass


@contextmanager
def model_run(name: str, tags: Mapping[str, str] | None = None) -> Iterator[str]:
    """A nested run for one model inside the active stage run; ended on exit."""
    import mlflow

    active = mlflow.active_run()
    experiment_id = active.info.experiment_id if active else None
    with mlflow.start_run(run_name=name, nested=True, experiment_id=experiment_id,
                          tags={KIND_TAG: "model", "tlpipe.model": name, **(tags or {})}) as run:
        yield run.info.run_id


def log_json(payload: object, artifact_file: str) -> None:
    """Log a JSON-serialisable object as an artifact of the active run."""
    import mlflow

    mlflow.log_dict(payload, artifact_file)
