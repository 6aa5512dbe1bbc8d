"""Helpers shared by the tasks: progress reporting, the stage preamble, model runs and logged models."""

from __future__ import annotations

import functools
import inspect
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from prefect import get_run_logger, task
from prefect.exceptions import MissingContextError

from tlpipe.core.hashing import file_sha256
from tlpipe.core.params import Params
from tlpipe.core.paths import ProjectPaths
from tlpipe.tracking.connection import connect, outage_reported, tracking_uri
from tlpipe.tracking.records import log_datasets, log_params, set_tags
from tlpipe.tracking.runs import model_run
from tlpipe.tracking.tags import MODEL_ID_TAG, MODEL_SHA_TAG, MODEL_TAG, PYFUNC_URI_TAG


def get_logger():
    """The Prefect run logger inside a flow or task, a plain logger outside."""
    try:
        return get_run_logger()
    except MissingContextError:
        import logging

        return logging.getLogger("tlpipe")


def report_progress(label: str, steps: int = 4):
    """Make a progress wrapper: a tqdm bar on the console and ``steps`` log lines in Prefect."""
    from tqdm import tqdm

    def wrap(iterable: Iterable, total: int | None = None) -> Iterator:
        logger = get_logger()
        total = total if total is not None else (len(iterable) if hasattr(iterable, "__len__") else None)
        marks = {max(1, round(total * k / steps)) for k in range(1, steps + 1)} if total else set()
        bar = tqdm(iterable, total=total, desc=label, file=sys.stderr, mininterval=1.0,
                   disable=not sys.stderr.isatty())
        for count, item in enumerate(bar, start=1):
            yield item
            if count in marks:
                logger.info("%s: %d/%d (%.0f%%)", label, count, total, 100 * count / total)
        bar.close()

    return wrap


def retry_unless_user_error(task, task_run, state) -> bool:
    """Prefect ``retry_condition_fn``: retry transient failures, never a user error (a retry cannot fix it)."""
    from tlpipe.core.errors import UserError

    return not isinstance(state.data, UserError)


def reports_tracking_outage(what: str) -> Callable[[Callable], Callable]:
    """Decorate a logging task (one with a ``root`` argument): a store that goes away while it logs fails it
    with one line naming the store (:func:`tlpipe.tracking.connection.outage_reported`), not MLflow's traceback.
    """

    def decorate(function: Callable) -> Callable:
        signature = inspect.signature(function)

        @functools.wraps(function)
        def logging_task(*args, **kwargs):
            root = signature.bind(*args, **kwargs).arguments["root"]
            with outage_reported(Path(root), what):
                return function(*args, **kwargs)

        return logging_task

    return decorate


@task(name="check-tracking", timeout_seconds=120)
def check_tracking(root: Path) -> str:
    """Fail fast, before any work, when the MLflow store is unreachable; return its URI.

    Retries live in :func:`tlpipe.tracking.connection.connect` (bounded, with back-off).
    """
    connect(root)
    return tracking_uri(root)


@dataclass(frozen=True)
class StageInputs:
    """What every training and evaluation stage opens with: the project's paths, its params and the data hash."""

    paths: ProjectPaths
    params: Params
    data_hash: str


def load_stage_inputs(root: str | Path | None) -> StageInputs:
    """The stage preamble: project paths, the params with the select stage's choice applied, the store's hash."""
    from tlpipe.core.paths import project_paths
    from tlpipe.core.task import load_stage_params
    from tlpipe.data import store
    from tlpipe.data.ingest import hash_manifest

    paths = project_paths(root)
    params = load_stage_params(paths.params, paths.selection)
    return StageInputs(paths, params, hash_manifest(store.load_manifest(paths.store)))


@contextmanager
def trained_model_run(client, stage_run_id: str, name: str, family: str, data_hash: str,
                      run_params: Mapping[str, object], store_dir: Path, source: str) -> Iterator[tuple[str, dict]]:
    """One trained model's MLflow run under the stage run: tagged with the data hash and family, its params
    and its train and validation datasets logged.

    Yields:
        The model run id and ``{"train": dataset, "val": dataset}``.
    """
    with model_run(client, name, stage_run_id, {"tlpipe.data_hash": data_hash, "tlpipe.family": family}) as run_id:
        log_params(client, run_id, run_params)
        yield run_id, log_datasets(client, run_id, store_dir, source, ("train", "val"))


def log_image_model(client, run_id: str, name: str, model_path: Path, store_dir: Path, features_dir: Path | None,
                    params, step: int = 0, tags: dict[str, str] | None = None) -> str:
    """Log a trained model as its one MLflow model (the image-taking pyfunc) into run ``run_id``.

    The logged model gets the run's params (MLflow copies them), the run's metrics
    at ``step`` (so pass the best epoch for a network) and tags naming the model and
    its file's hash; the run is tagged with the file's hash, the pyfunc URI and the
    model id, so the evaluate stage finds this run and model for exactly this file.

    Returns:
        The logged model's URI (``models:/<model id>``).
    """
    from tlpipe.core.names import model_family
    from tlpipe.tracking.logged_models import log_trained_model

    sha = file_sha256(model_path)
    info = log_trained_model(client, run_id, name, model_path, store_dir, features_dir, params, step=step,
                             model_type=model_family(name),
                             tags={MODEL_TAG: name, MODEL_SHA_TAG: sha, **(tags or {})})
    set_tags(client, run_id, {MODEL_SHA_TAG: sha, PYFUNC_URI_TAG: info.model_uri, MODEL_ID_TAG: info.model_id})
    return info.model_uri
