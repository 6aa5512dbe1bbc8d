"""MLflow tracking base shared by every stage.

* Store: ``$MLFLOW_TRACKING_URI`` or ``sqlite:///<root>/mlflow.db``; a SQLite store keeps its
  artifacts beside it in ``mlartifacts/``. One experiment per task (each data set and class
  set: :func:`experiment_name`), tagged ``mlflow.experimentKind = custom_model_development``
  (MLflow's "Machine learning" kind); links made with :func:`ui_url` open the UI in its
  model-training view.
* Runs: one *pipeline* (parent) run per pipeline execution, named ``<task> pipeline``; one *stage* run per stage
  execution, opened by the stage flow before its work and ended after it
  (:func:`stage_run`); one *model* run per trained model under its stage run
  (:func:`model_run`), holding the model's params, training metrics, its train and
  validation datasets, its one logged model, and, logged later by the evaluate stage
  onto the same run and logged model, its test metrics linked to the test dataset
  (:func:`log_test_metrics`). DVC starts each stage in its own process, so the parent
  is passed explicitly: ``$TLPIPE_PARENT_RUN_ID`` when the pipeline flow (or
  ``tlpipe repro``) created it, otherwise the run tagged with the key of the
  ``dvc repro`` process that started this stage, created by that ``dvc repro``'s
  first stage.
* Every run is ended in a ``finally`` (FAILED on error) and records the process that
  owns it (``tlpipe.pid``, ``tlpipe.host``, ``tlpipe.process_start``); a run left
  RUNNING by a killed process is ended as KILLED by the next stage
  (:func:`reap_stale_runs`).
* HTTP: MLflow's own bounded retries (:data:`HTTP_DEFAULTS`, a user's values win); the
  reachability check at stage start probes once per attempt without them, so an
  unreachable server fails in seconds, naming the URI.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import subprocess
import threading
import time
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tlpipe.core.errors import UserError

logger = logging.getLogger("tlpipe.tracking")

EXPERIMENT = "tlpipe"
"""The experiment of a folder without ``params.yaml`` (a project's runs go to its task's experiment)."""
PARENT_ENV = "TLPIPE_PARENT_RUN_ID"
EXPERIMENT_ENV = "TLPIPE_EXPERIMENT"
TASK_TAG = "tlpipe.task"
SESSION_TAG = "tlpipe.session"
STAGE_TAG = "tlpipe.stage"
KIND_TAG = "tlpipe.kind"
MODEL_TAG = "tlpipe.model"
MODEL_SHA_TAG = "tlpipe.model_sha"
MODEL_ID_TAG = "tlpipe.model_id"
PYFUNC_URI_TAG = "tlpipe.pyfunc_uri"
PID_TAG = "tlpipe.pid"
HOST_TAG = "tlpipe.host"
PROCESS_START_TAG = "tlpipe.process_start"
REAPED_TAG = "tlpipe.reaped"
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
"""The experiment kind MLflow 3's UI labels "Machine learning" (its model-training view)."""
UI_TRAINING_VIEW = "workflowType=machine_learning"
"""Query parameter that opens MLflow 3.17's UI in its model-training view.

Checked in MLflow 3.17.2's UI bundle and in headless Chromium: the UI picks the
GenAI or model-training view from a per-browser toggle (sidebar "GenAI | Model
training", remembered in the browser, default GenAI), not from the experiment's
``mlflow.experimentKind`` tag; ``?workflowType=machine_learning`` in a link selects
the training view (and is kept while navigating)."""
DATASET_CONTEXT_TAG = "mlflow.data.context"
DATASET_CONTEXTS = {"train": "train", "val": "validation", "test": "test"}
"""Store split -> the MLflow dataset input context it is logged with."""
TEST_METRICS = ("accuracy", "balanced_accuracy", "f1_macro", "roc_auc")
"""The evaluate stage's scalar test metrics, logged as ``test_<name>``."""
HTTP_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "4",      # MLflow's default: 7
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",   # waits 1, 2, 4, 8 s (default factor 2: up to 2 min)
    "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0.5",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",         # default: 120 s
}
"""MLflow's own HTTP retry settings, bounded: a request to a dead server fails after about 16 s."""
PROBE_TIMEOUT_S = 5

_open_stage_runs: dict[tuple[str, str], str] = {}
_open_lock = threading.Lock()


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


def configure_http_retries() -> None:
    """Bound MLflow's HTTP retries (:data:`HTTP_DEFAULTS`) unless the user set them.

    These are MLflow's own settings, read by every request: a call to a server that
    went away mid-stage retries for about 16 s, then fails with MLflow's error.
    """
    for key, value in HTTP_DEFAULTS.items():
        os.environ.setdefault(key, value)


def tracking_uri(root: Path) -> str:
    """``$MLFLOW_TRACKING_URI``, or the project's local SQLite store ``sqlite:///<project>/mlflow.db``.

    ``<project>`` is :func:`tlpipe.core.paths.tracking_root` of ``root``: a stage that DVC runs in a
    queued or ``--temp`` experiment's temporary workspace logs into the real project's store
    (and ``mlartifacts/``), not into a copy that DVC deletes. The local store is created on
    first use under a file lock (:func:`tlpipe.tracking.sqlite_store.ensure_sqlite_store`): MLflow's own
    schema creation races when two experiments start at once.
    """
    if uri := os.environ.get("MLFLOW_TRACKING_URI"):
        return uri
    from tlpipe.tracking.sqlite_store import ensure_sqlite_store
    from tlpipe.core.paths import tracking_root

    quiet_telemetry()
    return ensure_sqlite_store(tracking_root(root) / "mlflow.db")


def artifact_location(root: Path) -> str | None:
    """Artifact root for a new experiment: ``mlartifacts/`` beside a SQLite store, else the server's choice.

    Decided from the store URI, not from whether ``$MLFLOW_TRACKING_URI`` is set:
    ``mlflow.set_tracking_uri`` sets that variable itself, which once sent every
    artifact of the default store to MLflow's default ``mlruns/``.
    """
    uri = tracking_uri(root)
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///"):]).resolve().parent / "mlartifacts").as_uri()
    return None  # a tracking server (or another store) decides


def probe(client, uri: str) -> None:
    """One reachability check of the store, without MLflow's HTTP retries.

    Raises:
        Exception: Whatever the transport or the store raised.
    """
    if uri.startswith(("http://", "https://")):
        from mlflow.utils.rest_utils import MlflowHostCreds, http_request

        store = client._tracking_client.store
        creds = store.get_host_creds() if hasattr(store, "get_host_creds") else MlflowHostCreds(uri)
        response = http_request(creds, "/api/2.0/mlflow/experiments/search", "GET", max_retries=0,
                                backoff_factor=0, timeout=PROBE_TIMEOUT_S, params={"max_results": 1})
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}: {response.text[:200]}")
        return
    client.search_experiments(max_results=1)


def store_reachable(client, uri: str) -> bool:
    """Whether one :func:`probe` of the store succeeds (never raises)."""
    try:
        probe(client, uri)
        return True
    except Exception:
        return False


def connect(root: Path, attempts: int = 3, backoff_s: float = 1.0):
    """Return an ``MlflowClient`` on the project store, after a bounded reachability check.

    Sets MLflow's bounded HTTP retries (:func:`configure_http_retries`) and the
    fluent tracking URI. The check itself probes once per attempt (5 s timeout),
    so an unreachable store fails in seconds.

    Raises:
        TrackingUnavailableError: Naming the URI, after ``attempts`` tries with
            exponential back-off.
    """
    quiet_telemetry()
    configure_http_retries()
    import mlflow
    from mlflow import MlflowClient

    uri = tracking_uri(root)
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(tracking_uri=uri)
    error: Exception | None = None
    for attempt in range(attempts):
        try:
            probe(client, uri)
            return client
        except Exception as caught:  # any transport or store error
            error = caught
            if attempt + 1 < attempts:
                time.sleep(backoff_s * 2**attempt)
    raise TrackingUnavailableError(
        f"MLflow tracking store {uri} is unreachable after {attempts} attempts "
        f"({type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else ''}). Start the server, "
        "fix MLFLOW_TRACKING_URI, or unset it to use the local sqlite:///mlflow.db store."
    )


def get_client(root: Path):
    """An ``MlflowClient`` on the project store, without the reachability check (use after :func:`connect`)."""
    quiet_telemetry()
    configure_http_retries()
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri(root))


def ui_url(base_url: str, experiment_id: str, run_id: str | None = None) -> str:
    """A link into the MLflow UI at ``base_url`` that opens in the model-training view.

    The experiment's runs list, or one run's page when ``run_id`` is given.
    """
    page = f"runs/{run_id}" if run_id else "runs"
    return f"{base_url.rstrip('/')}/#/experiments/{experiment_id}/{page}?{UI_TRAINING_VIEW}"


def compare_url(base_url: str, experiment_id: str, run_ids: list[str]) -> str:
    """A link to MLflow's Compare page for these runs (e.g. the five model runs), in the training view."""
    runs = ",".join(f'"{run_id}"' for run_id in run_ids)
    return f"{base_url.rstrip('/')}/#/compare-runs?runs=[{runs}]&experiments=[\"{experiment_id}\"]&{UI_TRAINING_VIEW}"


def experiment_name(root: Path, overrides: list[str] | None = None) -> str:
    """The MLflow experiment of the project at ``root``: ``$TLPIPE_EXPERIMENT``, else its task's name
    (:func:`tlpipe.core.params.load_task`, with ``-S`` overrides applied); :data:`EXPERIMENT` without ``params.yaml``."""
    if name := os.environ.get(EXPERIMENT_ENV):
        return name
    if not (Path(root) / "params.yaml").is_file():
        return EXPERIMENT
    from tlpipe.core.params import load_task

    return load_task(root, overrides).name


def ensure_experiment(client, root: Path, name: str | None = None) -> str:
    """Get or create the experiment ``name`` (default: :func:`experiment_name`, the project's task); return its id.

    Artifacts go where :func:`artifact_location` says. The experiment is tagged
    ``mlflow.experimentKind = custom_model_development`` so the MLflow UI opens it
    in its model-training view; a kind already set (e.g. chosen by a user in the UI) is kept.
    """
    from mlflow.exceptions import MlflowException

    name = name or experiment_name(root)
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        try:
            return client.create_experiment(name, artifact_location=artifact_location(root),
                                            tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
        except MlflowException:  # created concurrently
            experiment = client.get_experiment_by_name(name)
            if experiment is None:
                raise
    if EXPERIMENT_KIND_TAG not in experiment.tags:
        client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    return experiment.experiment_id


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


# ---------------------------------------------------------------- process identity and stale runs

def process_tags(pid: int | None = None) -> dict[str, str]:
    """Tags naming the process that owns a run: pid, host and the process's start time."""
    from tlpipe.ops.process_identity import identify

    process = identify(pid)
    return {PID_TAG: str(process.pid), HOST_TAG: socket.gethostname(), PROCESS_START_TAG: f"{process.started:.3f}"}


def owner_is_gone(tags: Mapping[str, str]) -> bool:
    """Whether the process recorded in a run's tags (:func:`process_tags`) has ended.

    True only when the run was created on this host and its pid is dead, a zombie,
    or now belongs to another process (a different start time). Runs of other hosts
    and runs without the tags are never judged gone. One rule for every recorded process:
    :func:`tlpipe.ops.process_identity.is_alive`.
    """
    from tlpipe.ops.process_identity import ProcessIdentity, is_alive

    if tags.get(HOST_TAG) != socket.gethostname() or not tags.get(PID_TAG, "").isdigit():
        return False
    try:
        started = float(tags.get(PROCESS_START_TAG) or "nan")
    except ValueError:
        return False
    return not is_alive(ProcessIdentity(int(tags[PID_TAG]), started))


def reap_stale_runs(client, experiment_id: str) -> list[str]:
    """End as KILLED every RUNNING run of the experiment whose owning process is gone, children too.

    A stage killed with SIGKILL cannot end its runs; the next stage (any stage, on
    this host) calls this before it opens its own run. A run counts as stale when
    :func:`owner_is_gone` says so; its RUNNING descendants (any owner) are ended with
    it. Each reaped run gets the tag ``tlpipe.reaped`` with the reason.

    Args:
        client: An ``MlflowClient``.
        experiment_id: The project's experiment.

    Returns:
        The ids of the runs ended, parents first.
    """
    running = client.search_runs([experiment_id], filter_string="attributes.status = 'RUNNING'",
                                 max_results=1000)
    children: dict[str, list[str]] = {}
    for run in running:
        parent = run.data.tags.get("mlflow.parentRunId")
        if parent:
            children.setdefault(parent, []).append(run.info.run_id)
    pending = [run.info.run_id for run in running if owner_is_gone(run.data.tags)]
    reaped: list[str] = []
    while pending:
        run_id = pending.pop(0)
        if run_id in reaped:
            continue
        reaped.append(run_id)
        pending.extend(children.get(run_id, []))
    tags = {run.info.run_id: run.data.tags for run in running}
    for run_id in reaped:
        owner = tags[run_id]
        reason = (f"process {owner.get(PID_TAG, '?')} on {owner.get(HOST_TAG, '?')} ended without ending "
                  f"this run; ended by process {os.getpid()}")
        client.set_tag(run_id, REAPED_TAG, reason)
        client.set_terminated(run_id, "KILLED")
    return reaped


def dvc_session_process():
    """The ``dvc repro``/``dvc exp run`` process that started us (a ``psutil.Process``), or None."""
    import psutil

    try:
        process = psutil.Process().parent()
        while process is not None:
            cmdline = " ".join(process.cmdline())
            if "dvc" in cmdline and any(verb in cmdline for verb in (" repro", " exp ")):
                return process
            process = process.parent()
    except (psutil.Error, OSError):
        return None
    return None


def dvc_session_key() -> str | None:
    """A key for the ``dvc repro``/``dvc exp run`` process that started us, if any."""
    process = dvc_session_process()
    return None if process is None else f"{process.pid}-{process.create_time():.3f}"


def create_pipeline_run(client, experiment_id: str, root: Path, tags: Mapping[str, str] | None = None,
                        owner_pid: int | None = None, task: str | None = None) -> str:
    """Create a pipeline (parent) run owned by process ``owner_pid`` (default: this one); return its id.

    It is named ``<task> pipeline`` (default task: the experiment's name) and tagged ``tlpipe.task``.
    """
    task = task or client.get_experiment(experiment_id).name
    run = client.create_run(experiment_id, run_name=f"{task} pipeline", tags={
        KIND_TAG: "pipeline", TASK_TAG: task, "tlpipe.git_commit": git_commit(root), **process_tags(owner_pid),
        **(tags or {})})
    return run.info.run_id


def resolve_parent(client, experiment_id: str, root: Path) -> str | None:
    """The pipeline run this stage belongs to (see module docstring), or None."""
    if os.environ.get(PARENT_ENV):
        return os.environ[PARENT_ENV]
    process = dvc_session_process()
    if process is None:
        return None
    key = f"{process.pid}-{process.create_time():.3f}"
    found = client.search_runs([experiment_id], filter_string=f"tags.`{SESSION_TAG}` = '{key}'", max_results=1)
    if found:
        return found[0].info.run_id
    return create_pipeline_run(client, experiment_id, root, {SESSION_TAG: key}, owner_pid=process.pid)


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


def file_sha256(path: Path) -> str:
    """SHA-256 of a file, streamed (how a model run names the model file it logged)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ---------------------------------------------------------------- stage and model runs

@contextmanager
def stage_run(stage: str, root: Path, params: Mapping | None = None, data_hash: str | None = None,
              client=None) -> Iterator[str]:
    """Run one stage execution inside an MLflow child run of the pipeline run.

    The stage flow opens it before its first task and ends it after its last, so
    the run's duration is the stage's. On entry, runs left RUNNING by dead processes
    are ended (:func:`reap_stale_runs`). The run is tagged with the stage name, git
    commit, data hash (when known; tasks may set ``tlpipe.data_hash`` later), the
    owning process and the stage's DVC params (also logged as params), and always
    ended: FINISHED, FAILED when the block raises, KILLED on an interrupt. The
    pipeline run's end time is bumped too. Inside the block the run is also the
    active fluent run of this thread.

    Re-entrant: called again for the same stage while it is open in this process
    (e.g. by a task inside the flow's block), it joins the open run (activating it
    in the calling thread) instead of creating another.

    Yields:
        The stage run id.
    """
    import mlflow

    started = int(time.time() * 1000)  # the stage starts now, before connecting (a new store takes a while)
    client = client or connect(root)
    key = (stage, tracking_uri(root))
    with _open_lock:
        joined = _open_stage_runs.get(key)
    if joined is not None:
        with activate_run(joined, client):
            yield joined
        return
    try:  # the store can go away between the reachability check and here: same clear error as below
        experiment_id = ensure_experiment(client, root)
        reap_stale_runs(client, experiment_id)
        parent = resolve_parent(client, experiment_id, root)
        tags = {STAGE_TAG: stage, KIND_TAG: "stage", "tlpipe.git_commit": git_commit(root), **process_tags()}
        if data_hash:
            tags["tlpipe.data_hash"] = data_hash
        if parent:
            tags["mlflow.parentRunId"] = parent
        flat = flatten("", params or {})
        tags.update({f"dvc.params.{k}": str(v)[:5000] for k, v in flat.items()})
        run_id = client.create_run(experiment_id, start_time=started, run_name=stage, tags=tags).info.run_id
    except Exception as error:
        if isinstance(error, TrackingUnavailableError) or store_reachable(client, key[1]):
            raise
        raise TrackingUnavailableError(
            f"MLflow tracking store {key[1]} became unreachable while the {stage} stage opened its run "
            f"({type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else ''}). Start it "
            "again and rerun the stage."
        ) from error
    status = "FAILED"
    with _open_lock:
        _open_stage_runs[key] = run_id
    try:
        if flat:
            log_params(client, run_id, {k: str(v)[:6000] for k, v in flat.items()})
        mlflow.set_experiment(experiment_id=experiment_id)
        mlflow.start_run(run_id=run_id, nested=mlflow.active_run() is not None)
        yield run_id
        status = "FINISHED"
    except BaseException as error:
        status = "FAILED" if isinstance(error, Exception) else "KILLED"
        if isinstance(error, Exception) and not isinstance(error, TrackingUnavailableError) \
                and not store_reachable(client, key[1]):
            raise TrackingUnavailableError(
                f"MLflow tracking store {key[1]} became unreachable during the {stage} stage "
                f"({type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else ''}). Start it "
                "again and rerun the stage (the runs left RUNNING are then ended as KILLED)."
            ) from error
        raise
    finally:
        with _open_lock:
            _open_stage_runs.pop(key, None)
        end_run_quietly(client, run_id, status, raise_errors=status == "FINISHED")
        if parent:
            finish_pipeline_run(client, parent, stage, status)


@contextmanager
def activate_run(run_id: str, client) -> Iterator[None]:
    """Make a run that another block owns the active fluent run of this thread for the block.

    Nothing happens when it already is. Otherwise MLflow resumes it and, on exit,
    ends it; it is then put back to RUNNING for its owner to end.
    """
    import mlflow

    active = mlflow.active_run()
    if active is not None and active.info.run_id == run_id:
        yield
        return
    try:
        with mlflow.start_run(run_id=run_id, nested=active is not None):
            yield
    finally:
        try:
            client.update_run(run_id, status="RUNNING")
        except Exception as error:  # the owner ends it anyway
            logger.warning("could not put MLflow run %s back to RUNNING after this block used it (%s: %s); it "
                           "shows as ended until its owner ends it with its own status", run_id,
                           type(error).__name__, error)


def end_run_quietly(client, run_id: str, status: str, raise_errors: bool) -> None:
    """End a run (and pop it off this thread's fluent stack); errors are raised only when asked.

    Called in a ``finally``: when the block already failed (e.g. the server went
    away), a second error from ending the run must not hide the first.
    """
    import mlflow

    try:
        active = mlflow.active_run()
        if active is not None and active.info.run_id == run_id:
            mlflow.end_run(status)
        else:
            client.set_terminated(run_id, status)
    except Exception as error:
        if raise_errors:
            raise
        logger.warning("could not end MLflow run %s as %s (%s: %s); it stays RUNNING until the next stage on "
                       "this host reaps it (ends it KILLED)", run_id, status, type(error).__name__, error)


def log_params(client, run_id: str, params: Mapping[str, object]) -> None:
    """Log params on a run in batches of 100 (MLflow's limit per call)."""
    from mlflow.entities import Param

    items = [Param(str(k), str(v)[:6000]) for k, v in params.items()]
    for start in range(0, len(items), 100):
        client.log_batch(run_id, params=items[start:start + 100])


def log_metrics(client, run_id: str, metrics: Mapping[str, float], step: int = 0, model_id: str | None = None,
                dataset=None) -> None:
    """Log numeric metrics on a run in one batch (also on a logged model, and linked to a dataset, when given)."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    batch = [Metric(str(k), float(v), now, int(step), model_id=model_id, run_id=run_id,
                    dataset_name=dataset.name if dataset is not None else None,
                    dataset_digest=dataset.digest if dataset is not None else None)
             for k, v in metrics.items() if v is not None]
    for start in range(0, len(batch), 1000):
        client.log_batch(run_id, metrics=batch[start:start + 1000])


def set_tags(client, run_id: str, tags: Mapping[str, object]) -> None:
    """Set tags on a run in one batch."""
    from mlflow.entities import RunTag

    client.log_batch(run_id, tags=[RunTag(str(k), str(v)[:5000]) for k, v in tags.items()])


def model_id_from_uri(uri: str) -> str | None:
    """The logged-model id of a ``models:/<model id>`` URI (None for other URIs)."""
    if uri.startswith("models:/") and "/" not in uri[len("models:/"):]:
        return uri[len("models:/"):]
    return None


def finish_pipeline_run(client, parent: str, stage: str, status: str) -> None:
    """Record a stage's outcome on the pipeline run and (re)close it with the latest end time."""
    try:
        client.set_tag(parent, f"tlpipe.stage_status.{stage}", status)
        current = client.get_run(parent).info.status
        final = "FAILED" if status in ("FAILED", "KILLED") or current == "FAILED" else "FINISHED"
        client.set_terminated(parent, final)
    except Exception as error:  # never mask the stage's own outcome
        logger.warning("could not record stage %s as %s on the MLflow pipeline run %s (%s: %s); that run keeps "
                       "its previous status", stage, status, parent, type(error).__name__, error)


@contextmanager
def model_run(name: str, parent_run_id: str | None = None, tags: Mapping[str, str] | None = None,
              client=None) -> Iterator[str]:
    """A child run for one trained model, active (fluent) in this thread inside the block.

    Args:
        name: The model name (run name and ``tlpipe.model`` tag).
        parent_run_id: The stage run; default: the active fluent run.
        tags: More tags.
        client: An ``MlflowClient`` (default: one on the fluent tracking URI).

    Yields:
        The model run id. The run ends FINISHED, or FAILED when the block raises.
    """
    import mlflow
    from mlflow import MlflowClient

    client = client or MlflowClient()
    active = mlflow.active_run()
    parent = parent_run_id or (active.info.run_id if active else None)
    if parent is None:
        raise ValueError(f"model run {name!r} needs a parent stage run")
    experiment_id = client.get_run(parent).info.experiment_id
    run = client.create_run(experiment_id, run_name=name, tags={
        KIND_TAG: "model", MODEL_TAG: name, "mlflow.parentRunId": parent, **process_tags(), **(tags or {})})
    with mlflow.start_run(run_id=run.info.run_id, nested=active is not None):
        yield run.info.run_id


def log_json(payload: object, artifact_file: str) -> None:
    """Log a JSON-serialisable object as an artifact of the active run."""
    import mlflow

    mlflow.log_dict(payload, artifact_file)


# ---------------------------------------------------------------- datasets

def dataset_prefix(source: str) -> str:
    """Short name of a data source for dataset names: the folder name, or ``elpv``."""
    text = str(source).rstrip("/\\")
    return (Path(text).name or text) if text else "data"


def split_dataset(store_dir: Path, split: str, source: str):
    """One store split as an MLflow dataset (``mlflow.data.from_pandas`` of its manifest rows).

    Name ``<source>-<split>``; digest: the first 12 hex digits of the SHA-256 of the
    split's (class, file hash) rows, so it names exactly these images; profile: the
    row count. Rows: ``relpath``, ``class_name`` (the targets), ``sha256``.
    """
    import mlflow.data

    from tlpipe.data import store

    manifest = store.load_manifest(Path(store_dir))
    rows = manifest[manifest["split"] == split].reset_index(drop=True)
    rows = rows[["relpath", "class_name", "sha256"]].astype(str)  # text only: no integer-schema hints
    digest = hashlib.sha256("".join(f"{c},{s}\n" for c, s in zip(rows["class_name"], rows["sha256"]))
                            .encode()).hexdigest()[:12]
    with warnings.catch_warnings():  # MLflow registers two local-file source classes; either is right
        warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted in multiple")
        return mlflow.data.from_pandas(rows, source=str(Path(store_dir).resolve() / store.MANIFEST),
                                       targets="class_name", name=f"{dataset_prefix(source)}-{split}",
                                       digest=digest)


def log_datasets(client, run_id: str, store_dir: Path, source: str, splits: tuple[str, ...]) -> dict:
    """Log store splits as dataset inputs of a run (context train/validation/test, class counts as tags).

    Returns:
        ``{split: dataset}``.
    """
    from mlflow.entities import DatasetInput, InputTag

    datasets, inputs = {}, []
    for split in splits:
        dataset = split_dataset(store_dir, split, source)
        counts = dataset.df["class_name"].value_counts().sort_index()
        tags = [InputTag(DATASET_CONTEXT_TAG, DATASET_CONTEXTS[split]), InputTag("tlpipe.images", str(len(dataset.df))),
                *[InputTag(f"tlpipe.count.{name}", str(int(n))) for name, n in counts.items()]]
        inputs.append(DatasetInput(dataset._to_mlflow_entity(), tags))
        datasets[split] = dataset
    client.log_inputs(run_id, datasets=inputs)
    return datasets


# ---------------------------------------------------------------- model runs for the evaluate stage

@dataclass(frozen=True)
class ModelRunRef:
    """Where a trained model lives in MLflow: its model run and its logged model."""

    name: str
    run_id: str
    model_id: str | None

    @property
    def model_uri(self) -> str | None:
        """``models:/<model id>`` (loads the image-taking pyfunc), or None."""
        return f"models:/{self.model_id}" if self.model_id else None


def find_model_run(client, experiment_id: str, model_path: Path) -> ModelRunRef | None:
    """The latest FINISHED model run that logged exactly this model file (matched by SHA-256), or None."""
    sha = file_sha256(Path(model_path))
    runs = client.search_runs([experiment_id], max_results=1, order_by=["attributes.start_time DESC"],
                              filter_string=f"tags.`{MODEL_SHA_TAG}` = '{sha}' and attributes.status = 'FINISHED'")
    if not runs:
        return None
    run = runs[0]
    outputs = run.outputs.model_outputs if run.outputs else []
    model_id = outputs[-1].model_id if outputs else run.data.tags.get(MODEL_ID_TAG)
    return ModelRunRef(run.data.tags.get(MODEL_TAG, Path(model_path).stem), run.info.run_id, model_id)


def log_test_metrics(client, experiment_id: str, model_path: Path, metrics: Mapping[str, float | None],
                     store_dir: Path, source: str) -> ModelRunRef | None:
    """Log a model's test metrics onto its model run and its logged model, linked to the test dataset.

    The test split is logged as a dataset input (context ``test``) of the model run;
    each metric ``m`` of :data:`TEST_METRICS` present in ``metrics`` is logged as
    ``test_<m>`` on the run and on its logged model, with the test dataset's name and
    digest; all of ``metrics`` (per-class values too) goes to the run's
    ``test/metrics.json``. Idempotent: a metric the logged model already holds with the same value on
    the same dataset is not logged again (an evaluate rerun adds nothing).

    Args:
        client: An ``MlflowClient``.
        experiment_id: The project's experiment.
        model_path: The model file (``.joblib``/``.keras``) the run logged.
        metrics: ``{"accuracy": ..., ...}`` as computed by the evaluate stage.
        store_dir: The image store (for the test dataset).
        source: ``data.source`` (for the dataset name).

    Returns:
        The model run reference, or None when no run logged this file (nothing logged).
    """
    ref = find_model_run(client, experiment_id, model_path)
    if ref is None:
        return None
    dataset = log_datasets(client, ref.run_id, store_dir, source, ("test",))["test"]
    held: set[tuple[str, float, str | None]] = set()
    if ref.model_id:
        held = {(m.key, round(m.value, 12), m.dataset_digest) for m in client.get_logged_model(ref.model_id).metrics or []}
    new = {f"test_{name}": float(metrics[name]) for name in TEST_METRICS if metrics.get(name) is not None}
    new = {key: value for key, value in new.items() if (key, round(value, 12), dataset.digest) not in held}
    if new:
        log_metrics(client, ref.run_id, new, model_id=ref.model_id, dataset=dataset)
    client.log_dict(ref.run_id, json.loads(json.dumps(dict(metrics), default=str)), "test/metrics.json")
    return ref


# ---------------------------------------------------------------- what a model run records

NETWORK_INPUTS = {"frozen": "final", "concat": "concat", "finetuned": "final"}
"""The backbone output each network's head reads (the SVMs': :data:`tlpipe.core.names.SVM_MODELS`)."""


def common_model_params(name: str, params, data_hash: str, classes: list[str], image_size: int) -> dict[str, Any]:
    """Params every model run records under the same keys, so the runs compare side by side.

    Keys: ``model``, ``family`` (svm/network), ``model_kind`` (linear_svm/dense_head),
    ``input`` (final/concat/pixels), ``backbone``, ``weights``, ``mid_layer`` (the tap,
    where the input uses it), ``image_size``, ``resize_mode``, ``data_hash``,
    ``classes``, ``n_classes``; the family builders add ``seed`` and ``n_train``.
    """
    from tlpipe.features.backbones.common import get_spec
    from tlpipe.core.names import SVM_MODELS, model_family

    family = model_family(name)
    source = SVM_MODELS[name] if family == "svm" else NETWORK_INPUTS[name]
    uses_backbone = source != "pixels"
    return {
        "model": name, "family": family, "model_kind": "linear_svm" if family == "svm" else "dense_head",
        "input": source,
        "backbone": params.features.backbone if uses_backbone else "none",
        "weights": str(params.features.weights) if uses_backbone else "none",
        "mid_layer": get_spec(params.features.backbone).mid_layer if source == "concat" else "none",
        "image_size": int(image_size), "resize_mode": params.data.resize_mode,
        "data_hash": data_hash, "classes": ",".join(classes), "n_classes": len(classes),
    }


def svm_model_params(name: str, summary: Mapping, params, data_hash: str, classes: list[str],
                     image_size: int) -> dict[str, Any]:
    """Params of an SVM's model run: :func:`common_model_params` plus ``svm.*`` (C grid, chosen C, search).

    Family-specific keys carry a prefix (``svm.``/``net.``) so the shared keys sort
    first: MLflow's Compare page plots the first three differing params by name
    (here ``backbone``, ``family``, ``input``) in its parallel-coordinates plot.
    """
    grid = params.svm.c_grid
    extra = {
        "svm.C": summary["best_C"], "svm.C_grid": f"logspace({grid.start:g}, {grid.stop:g}, {grid.num})",
        "svm.cv_folds": params.svm.cv_folds, "svm.search": summary.get("search", ""),
        "svm.n_features": summary.get("n_features", ""), "seed": params.svm.seed,
        "n_train": summary.get("n_train", ""),
    }
    if name == "svm_pixels":
        extra["svm.pixel_size"] = params.svm.pixel_size
    return {**common_model_params(name, params, data_hash, classes, image_size), **extra}


def network_model_params(kind: str, summary: Mapping, params, data_hash: str, classes: list[str],
                         image_size: int) -> dict[str, Any]:
    """Params of a network's model run: :func:`common_model_params` plus ``net.*`` (optimizer, schedule, head,
    augmentation); see :func:`svm_model_params` for the prefix."""
    tune = params.finetune
    if kind == "finetuned":  # its own schedule (tlpipe.train.networks.train_finetuned): the shared keys say what it used
        augment = tune.finetuned_augmentation()
        schedule = {"net.learning_rate": tune.finetuned_head_learning_rate,
                    "net.epochs": tune.finetuned_head_epochs + tune.finetuned_epochs,
                    "net.head_units": tune.finetuned_units, "net.feature_cache": True,
                    "net.cache_copies": tune.finetuned_copies,
                    "net.unfreeze_layers": summary.get("tuned_blocks", tune.finetuned_blocks)}
    else:
        augment = tune.augment
        schedule = {"net.learning_rate": tune.learning_rate, "net.epochs": tune.epochs,
                    "net.head_units": getattr(tune, f"{kind}_units"), "net.feature_cache": tune.feature_cache,
                    "net.cache_copies": tune.cache_copies if tune.feature_cache else 0,
                    "net.unfreeze_layers": tune.unfreeze_layers}
    extra = {
        "net.optimizer": tune.optimizer, **schedule, "net.batch_size": tune.batch_size,
        "net.mode": summary.get("mode", ""),
        **{f"net.augment.{k}": v for k, v in augment.model_dump().items()},
        "seed": tune.seed, "n_train": summary.get("train_images", ""),
    }
    if kind == "finetuned":
        extra.update({f"net.{key}": value for key, value in tune.model_dump().items() if key.startswith("finetuned_")})
        return {**common_model_params(kind, params, data_hash, classes, image_size), **extra}
    if tune.unfreeze_layers:
        extra.update({"net.unfreeze_epochs": tune.unfreeze_epochs,
                      "net.unfreeze_learning_rate": tune.unfreeze_learning_rate})
    return {**common_model_params(kind, params, data_hash, classes, image_size), **extra}
