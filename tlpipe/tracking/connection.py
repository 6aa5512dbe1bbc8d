"""The MLflow store and its client: the URI, telemetry and HTTP settings, the reachability check, the experiment.

The client is made here (:func:`connect`, :func:`get_client`) and passed to every function that talks to the
store; nothing here sets MLflow's process-wide (fluent) state except :mod:`tlpipe.tracking.fluent`, the one
place an API that only works on an active run is called.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tlpipe.core.errors import UserError

EXPERIMENT = "tlpipe"
"""The experiment of a folder without ``params.yaml`` (a project's runs go to its task's experiment)."""


EXPERIMENT_ENV = "TLPIPE_EXPERIMENT"


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


HTTP_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "4",      # MLflow's default: 7
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",   # waits 1, 2, 4, 8 s (default factor 2: up to 2 min)
    "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0.5",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",         # default: 120 s
}
"""MLflow's own HTTP retry settings, bounded: a request to a dead server fails after about 16 s."""


PROBE_TIMEOUT_S = 5


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
    from tlpipe.core.paths import tracking_root
    from tlpipe.tracking.sqlite_store import ensure_sqlite_store

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


def first_line(error: BaseException) -> str:
    """``Type: first line of the message`` (at most 200 characters of it)."""
    text = str(error)
    return f"{type(error).__name__}: {text.splitlines()[0][:200] if text else ''}"


@contextmanager
def outage_reported(root: Path, what: str) -> Iterator[None]:
    """Report a store that went away while ``what`` (say "logging the SVMs") used it as one clear error.

    An error raised inside becomes a :class:`TrackingUnavailableError` naming the store when one probe of
    the store then fails; otherwise (the store answers: the error is something else) it passes unchanged.
    A user error prints as one line, where MLflow's own exception would print a traceback of its HTTP stack.
    """
    try:
        yield
    except TrackingUnavailableError:
        raise
    except Exception as error:
        uri = tracking_uri(root)
        if store_reachable(get_client(root), uri):
            raise
        raise TrackingUnavailableError(
            f"MLflow tracking store {uri} became unreachable while {what} ({first_line(error)}). Start it again "
            "and rerun the stage (the runs left RUNNING are then ended as KILLED)."
        ) from error


def connect(root: Path, attempts: int = 3, backoff_s: float = 1.0):
    """Return an ``MlflowClient`` on the project store, after a bounded reachability check.

    Sets MLflow's bounded HTTP retries (:func:`configure_http_retries`); the client is
    the caller's to pass on (MLflow's process-wide fluent state is left alone:
    :mod:`tlpipe.tracking.fluent`). The check itself probes once per attempt (5 s
    timeout), so an unreachable store fails in seconds.

    Raises:
        TrackingUnavailableError: Naming the URI, after ``attempts`` tries with
            exponential back-off.
    """
    quiet_telemetry()
    configure_http_retries()
    from mlflow import MlflowClient

    uri = tracking_uri(root)
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
    (:func:`tlpipe.core.task.load_task`, with ``-S`` overrides applied); :data:`EXPERIMENT` without
    ``params.yaml``."""
    if name := os.environ.get(EXPERIMENT_ENV):
        return name
    if not (Path(root) / "params.yaml").is_file():
        return EXPERIMENT
    from tlpipe.core.task import load_task

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
