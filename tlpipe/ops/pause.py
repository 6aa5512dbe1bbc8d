"""Pause points: a stage waits at a named place in its work while a fault test acts on it.

A fault test (tests/e2e/test_faults.py) has to kill a stage, or the tracking server under it, while the stage
is inside a given piece of work: building its staging folder, with its decode pool running, or logging to
MLflow after publishing its outputs. Polling for those states races the stage; a pause point makes the moment
deterministic. With ``TLPIPE_PAUSE_AT=<point>`` in its environment, a stage that reaches ``<point>`` writes
the marker file ``<TLPIPE_PAUSE_DIR>/<point>-<pid>`` and waits until the marker is deleted (then goes on) or
the process is killed. A point pauses only the stage it is named after (``ingest.decoding`` pauses
``python -m flows.ingest``, not the select stage running ingest's code), and a process pauses at a point
once: a retried task passes it the second time. Without the variable, a pause point costs one environment
look-up.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

PAUSE_AT_ENV = "TLPIPE_PAUSE_AT"
PAUSE_DIR_ENV = "TLPIPE_PAUSE_DIR"
MAX_PAUSE_S = 900.0
"""A pause never outlasts this: a test that never comes back does not leave the stage stuck."""

_passed: set[str] = set()
"""The points this process has paused at (a retry of the same task goes on at once)."""


def marker_path(point: str, pid: int | None = None, folder: Path | None = None) -> Path:
    """The marker file a process paused at ``point`` writes (``<folder>/<point>-<pid>``)."""
    folder = Path(folder or os.environ.get(PAUSE_DIR_ENV) or tempfile.gettempdir())
    return folder / f"{point}-{os.getpid() if pid is None else pid}"


def running_stage() -> str | None:
    """The stage this process runs (``python -m flows.<stage>`` -> ``<stage>``), or None."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    name = getattr(spec, "name", None) or ""
    return name.removeprefix("flows.") if name.startswith("flows.") else None


def in_stage_of(point: str) -> bool:
    """Whether ``point`` (``<stage>.<what>``) belongs to the stage this process runs: ingest's code also runs
    in the select stage (its split), and must pause only in ingest. Outside a stage process, any point does."""
    stage = running_stage()
    return stage is None or point.split(".", 1)[0] == stage


def pause_point(point: str) -> None:
    """Wait here when ``TLPIPE_PAUSE_AT`` names ``point`` (the first time only), until the marker is deleted or
    the process killed.

    Args:
        point: The pause point's name, ``<stage>.<what it is doing>`` (e.g. ``features.extracting``).
    """
    if os.environ.get(PAUSE_AT_ENV) != point or point in _passed or not in_stage_of(point):
        return
    _passed.add(point)
    marker = marker_path(point)
    marker.parent.mkdir(parents=True, exist_ok=True)
    staging = marker.with_name(f".{marker.name}.tmp")
    staging.write_text(json.dumps({"point": point, "pid": os.getpid(), "since": time.time()}))
    os.replace(staging, marker)
    deadline = time.monotonic() + MAX_PAUSE_S
    while marker.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
