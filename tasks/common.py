"""Helpers shared by the tasks: progress reporting and stage logging."""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

from prefect import get_run_logger, task
from prefect.exceptions import MissingContextError

from tlpipe.tracking import runs as tracking


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


@task(name="check-tracking", timeout_seconds=120)
def check_tracking(root: Path) -> str:
    """Fail fast, before any work, when the MLflow store is unreachable; return its URI.

    Retries live in :func:`tlpipe.tracking.runs.connect` (bounded, with back-off).
    """
    tracking.connect(root)
    return tracking.tracking_uri(root)


file_sha256 = tracking.file_sha256
"""SHA-256 of a file, streamed (re-exported from :mod:`tlpipe.tracking.runs`)."""


def log_image_model(name: str, model_path: Path, store_dir: Path, features_dir: Path | None, params,
                    step: int = 0, tags: dict[str, str] | None = None) -> str:
    """Log a trained model as its one MLflow model (the image-taking pyfunc), in the active run.

    The logged model gets the run's params (MLflow copies them), the run's metrics
    at ``step`` (so pass the best epoch for a network) and tags naming the model and
    its file's hash; the run is tagged with the file's hash, the pyfunc URI and the
    model id, so the evaluate stage finds this run and model for exactly this file.

    Returns:
        The logged model's URI (``models:/<model id>``).
    """
    import mlflow

    from tlpipe.core.names import model_family
    from tlpipe.serving.classifier import log_trained_model

    sha = file_sha256(model_path)
    info = log_trained_model(name, model_path, store_dir, features_dir, params, step=step,
                             model_type=model_family(name),
                             tags={tracking.MODEL_TAG: name, tracking.MODEL_SHA_TAG: sha, **(tags or {})})
    mlflow.set_tags({tracking.MODEL_SHA_TAG: sha, tracking.PYFUNC_URI_TAG: info.model_uri,
                     tracking.MODEL_ID_TAG: info.model_id})
    return info.model_uri
