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


@task(name="check-tracking", timeout_seconds=120)
def check_tracking(root: Path) -> str:
    """Fail fast, before any work, when the MLflow store is unreachable; return its URI.

    Retries live in :func:`tlpipe.tracking.connect` (bounded, with back-off).
    """
    tracking.connect(root)
    return tracking.tracking_uri(root)
