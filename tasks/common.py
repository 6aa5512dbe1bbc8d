"""Helpers shared by the tasks: progress reporting and stage logging."""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

from prefect import get_run_logger, task
from prefect.exceptions import MissingContextError

from tlpipe import tracking


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
    from tlpipe.errors import UserError

    return not isinstance(state.data, UserError)


@task(name="check-tracking", timeout_seconds=120)
def check_tracking(root: Path) -> str:
    """Fail fast, before any work, when the MLflow store is unreachable; return its URI.

    Retries live in :func:`tlpipe.tracking.connect` (bounded, with back-off).
    """
    tracking.connect(root)
    return tracking.tracking_uri(root)


def file_sha256(path: Path) -> str:
    """SHA-256 of a file, streamed."""
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def log_image_model(name: str, model_path: Path, store_dir: Path, features_dir: Path | None, params) -> str:
    """Log a trained model as an MLflow pyfunc that takes images, in the active run.

    The run is tagged with the model file's hash and the pyfunc URI, so the
    evaluate stage can register exactly this file later without logging it again.

    Returns:
        The logged model's URI.
    """
    import mlflow

    from tlpipe import pyfunc, store
    from tlpipe.features import EXTRACTOR, normalise_weights
    from tlpipe.svm import SVM_MODELS

    classes = store.load_classes(store_dir)
    image_size = int(store.read_npy_header(store.split_path(store_dir, "test"))[0][1])
    if model_path.suffix == ".joblib":
        info = pyfunc.log_svm_classifier(
            name, model_path, SVM_MODELS[name], classes, image_size, params.data.resize_mode,
            params.features.backbone, normalise_weights(params.features.weights), params.svm.pixel_size,
            extractor_path=features_dir / EXTRACTOR if SVM_MODELS[name] != "pixels" else None)
    else:
        info = pyfunc.log_keras_classifier(name, model_path, classes, image_size, params.data.resize_mode)
    mlflow.set_tags({"tlpipe.model_sha": file_sha256(model_path), "tlpipe.pyfunc_uri": info.model_uri})
    return info.model_uri
