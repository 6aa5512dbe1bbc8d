"""Pipeline, stage and model runs: their lifecycle, owners and stale runs (store: :mod:`tlpipe.tracking.connection`).

* Store: ``$MLFLOW_TRACKING_URI`` or ``sqlite:///<root>/mlflow.db``; a SQLite store keeps its
  artifacts beside it in ``mlartifacts/``. One experiment per task (each data set and class
  set: :func:`~tlpipe.tracking.connection.experiment_name`), tagged ``mlflow.experimentKind = custom_model_development``
  (MLflow's "Machine learning" kind); links made with :func:`~tlpipe.tracking.connection.ui_url` open the UI in its
  model-training view.
* Runs: one *pipeline* (parent) run per pipeline execution, named ``<task> pipeline``; one *stage* run per stage
  execution, opened by the stage flow before its work and ended after it
  (:func:`stage_run`); one *model* run per trained model under its stage run
  (:func:`model_run`), holding the model's params, training metrics, its train and
  validation datasets, its one logged model, and, logged later by the evaluate stage
  onto the same run and logged model, its test metrics linked to the test dataset
  (:func:`tlpipe.tracking.records.log_test_metrics`). DVC starts each stage in its own process, so the parent
  is passed explicitly: ``$TLPIPE_PARENT_RUN_ID`` when the pipeline flow (or
  ``tlpipe repro``) created it, otherwise the run tagged with the key of the
  ``dvc repro`` process that started this stage, created by that ``dvc repro``'s
  first stage.
* Every run is ended in a ``finally`` (FAILED on error) and records the process that
  owns it (``tlpipe.pid``, ``tlpipe.host``, ``tlpipe.process_start``); a run left
  RUNNING by a killed process is ended as KILLED by the next stage
  (:func:`reap_stale_runs`).
* HTTP: MLflow's own bounded retries (:data:`~tlpipe.tracking.connection.HTTP_DEFAULTS`, a user's values win); the
  reachability check at stage start probes once per attempt without them, so an
  unreachable server fails in seconds, naming the URI.
* Client: every function takes the ``MlflowClient`` and the run id it works on; the stage flow passes its stage
  run id to its tasks. The only fluent MLflow calls are in :mod:`tlpipe.tracking.fluent`.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from tlpipe.core.hashing import flatten
from tlpipe.tracking.connection import (
    TrackingUnavailableError,
    connect,
    ensure_experiment,
    store_reachable,
    tracking_uri,
)
from tlpipe.tracking.records import log_params
from tlpipe.tracking.tags import (
    HOST_TAG,
    KIND_TAG,
    MODEL_TAG,
    PARENT_ENV,
    PID_TAG,
    PROCESS_START_TAG,
    REAPED_TAG,
    SESSION_TAG,
    STAGE_TAG,
    TASK_TAG,
)

logger = logging.getLogger("tlpipe.tracking")


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


@contextmanager
def stage_run(stage: str, root: Path, params: Mapping | None = None, data_hash: str | None = None,
              client=None) -> Iterator[str]:
    """Run one stage execution inside an MLflow child run of the pipeline run.

    The stage flow opens it before its first task and ends it after its last, so
    the run's duration is the stage's, and passes the run id to the tasks that log
    onto it. On entry, runs left RUNNING by dead processes
    are ended (:func:`reap_stale_runs`). The run is tagged with the stage name, git
    commit, data hash (when known; tasks may set ``tlpipe.data_hash`` later), the
    owning process and the stage's DVC params (also logged as params), and always
    ended: FINISHED, FAILED when the block raises, KILLED on an interrupt. The
    pipeline run's end time is bumped too.

    Args:
        client: An ``MlflowClient`` on the project's store (default: :func:`~tlpipe.tracking.connection.connect`).

    Yields:
        The stage run id.
    """
    started = int(time.time() * 1000)  # the stage starts now, before connecting (a new store takes a while)
    client = client or connect(root)
    uri = tracking_uri(root)
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
        if isinstance(error, TrackingUnavailableError) or store_reachable(client, uri):
            raise
        raise TrackingUnavailableError(
            f"MLflow tracking store {uri} became unreachable while the {stage} stage opened its run "
            f"({type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else ''}). Start it "
            "again and rerun the stage."
        ) from error
    status = "FAILED"
    try:
        if flat:
            log_params(client, run_id, {k: str(v)[:6000] for k, v in flat.items()})
        yield run_id
        status = "FINISHED"
    except BaseException as error:
        status = "FAILED" if isinstance(error, Exception) else "KILLED"
        if isinstance(error, Exception) and not isinstance(error, TrackingUnavailableError) \
                and not store_reachable(client, uri):
            raise TrackingUnavailableError(
                f"MLflow tracking store {uri} became unreachable during the {stage} stage "
                f"({type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else ''}). Start it "
                "again and rerun the stage (the runs left RUNNING are then ended as KILLED)."
            ) from error
        raise
    finally:
        end_run_quietly(client, run_id, status, raise_errors=status == "FINISHED")
        if parent:
            finish_pipeline_run(client, parent, stage, status)


def end_run_quietly(client, run_id: str, status: str, raise_errors: bool) -> None:
    """End a run; errors are raised only when asked.

    Called in a ``finally``: when the block already failed (e.g. the server went
    away), a second error from ending the run must not hide the first.
    """
    try:
        client.set_terminated(run_id, status)
    except Exception as error:
        if raise_errors:
            raise
        logger.warning("could not end MLflow run %s as %s (%s: %s); it stays RUNNING until the next stage on "
                       "this host reaps it (ends it KILLED)", run_id, status, type(error).__name__, error)


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
def model_run(client, name: str, parent_run_id: str, tags: Mapping[str, str] | None = None) -> Iterator[str]:
    """A child run for one trained model under the stage run ``parent_run_id``.

    Args:
        client: An ``MlflowClient`` on the project's store.
        name: The model name (run name and ``tlpipe.model`` tag).
        parent_run_id: The stage run.
        tags: More tags.

    Yields:
        The model run id. The run ends FINISHED, or FAILED when the block raises.
    """
    experiment_id = client.get_run(parent_run_id).info.experiment_id
    run = client.create_run(experiment_id, run_name=name, tags={
        KIND_TAG: "model", MODEL_TAG: name, "mlflow.parentRunId": parent_run_id, **process_tags(), **(tags or {})})
    status = "FAILED"
    try:
        yield run.info.run_id
        status = "FINISHED"
    finally:
        client.set_terminated(run.info.run_id, status)


