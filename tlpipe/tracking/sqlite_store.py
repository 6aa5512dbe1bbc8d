"""The project's local MLflow store: one SQLite file, created once even when several processes start at once.

MLflow creates a missing SQLite store's schema on first use, without a lock: processes that start on a
missing store at the same moment (two queued DVC experiments under ``dvc queue start -j 2``) race, and
all but one fail with ``table ... already exists``, ``duplicate column name`` or an alembic error (seen
here with three processes on MLflow 3.17). Once the schema exists, concurrent use is safe: MLflow sets
SQLite's busy timeout (20 s) on every session, so writers wait for each other instead of failing.
"""

from __future__ import annotations

import hashlib
import logging
import tempfile
from pathlib import Path

from tlpipe.ops.lock import file_lock

logger = logging.getLogger("tlpipe.local_store")

CREATE_WAIT_S = 120.0
"""How long a process waits for another one creating the same store."""

_ready: set[str] = set()


def sqlite_uri(db: Path) -> str:
    """MLflow's URI of the SQLite store file ``db`` (absolute)."""
    return f"sqlite:///{Path(db).resolve()}"


def lock_path(db: Path) -> Path:
    """The lock file that serialises creating ``db``: in the temporary folder, keyed by the store's path,
    so it never shows up in the project (``git status``) nor in DVC experiments."""
    key = hashlib.sha256(str(Path(db).resolve()).encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"tlpipe-mlflow-{key}.lock"


def ensure_sqlite_store(db: Path) -> str:
    """Make sure the MLflow store ``db`` exists with its schema; return its URI.

    The first call in a process opens the store holding :func:`lock_path` (MLflow creates the schema when
    it is missing), so concurrent first users wait for one another instead of racing. A failure is logged,
    not raised here: the caller's first real request reports it (e.g. :func:`tlpipe.tracking.connection.connect`, which
    names the URI).
    """
    uri = sqlite_uri(db)
    if uri in _ready:
        return uri
    try:
        with file_lock(lock_path(db), f"creating the MLflow store {db}", wait_s=CREATE_WAIT_S):
            from mlflow import MlflowClient

            MlflowClient(tracking_uri=uri).search_experiments(max_results=1)
        _ready.add(uri)
    except Exception as error:  # raised again by the caller's own request, with its context
        logger.warning("could not open or create the MLflow store %s (%s: %s); going on: the first tracking "
                       "request opens it again and reports any error", db, type(error).__name__, error)
    return uri
