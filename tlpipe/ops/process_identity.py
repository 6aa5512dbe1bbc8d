"""Is a recorded process still the one that was recorded? One answer for every pid the project keeps.

A pid alone is no identity: once a process ends the kernel may give its pid to another
process, and ``os.kill(pid, 0)`` then says "alive" while ``killpg`` would stop a stranger's
process group. So every record of a process holds its pid *and its start time*
(``psutil.Process.create_time``), and the process counts as alive only while that pid runs,
started at that time (within :data:`START_TOLERANCE_S`), and is not a zombie. Used for the
MLflow server's pid file (:mod:`tlpipe.ops.services`), the Prefect server's ``server.json`` and
its watchdog (:mod:`tlpipe.ops.prefect_server`, :mod:`tlpipe.ops.prefect_watchdog`) and the owners of
MLflow runs (:func:`tlpipe.tracking.runs.owner_is_gone`).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

START_TOLERANCE_S = 0.01
"""Start times match within this: MLflow tags keep them to the millisecond, the kernel counts in clock ticks."""


@dataclass(frozen=True)
class ProcessIdentity:
    """A process: its pid and its start time (seconds since the epoch, as ``psutil`` reports it)."""

    pid: int
    started: float


def identify(pid: int | None = None) -> ProcessIdentity:
    """The identity of the running process ``pid`` (this process when None).

    Raises:
        psutil.NoSuchProcess: When no process has that pid.
    """
    import psutil

    process = psutil.Process(pid)
    return ProcessIdentity(process.pid, process.create_time())


def is_alive(identity: ProcessIdentity) -> bool:
    """Whether that very process still runs: same pid, same start time, not a zombie.

    A process this user may not inspect counts as alive (nothing says it is gone).
    """
    import psutil

    try:
        process = psutil.Process(identity.pid)
        if process.status() == psutil.STATUS_ZOMBIE:
            return False
        return abs(process.create_time() - identity.started) < START_TOLERANCE_S
    except psutil.NoSuchProcess:  # zombies included
        return False
    except psutil.Error:
        return True


def write_pid_file(path: Path, pid: int) -> ProcessIdentity:
    """Record the running process ``pid`` in ``path`` as JSON ``{"pid", "started"}`` (written whole, then renamed)."""
    identity = identify(pid)
    path = Path(path)
    partial = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    partial.write_text(json.dumps(asdict(identity)))
    os.replace(partial, path)
    return identity


def read_pid_file(path: Path) -> ProcessIdentity | None:
    """The identity recorded in ``path``; None when it is missing, unreadable, or holds no start time
    (a plain pid, as older versions wrote: never trusted)."""
    try:
        record = json.loads(Path(path).read_text())
        return ProcessIdentity(int(record["pid"]), float(record["started"]))
    except (OSError, ValueError, TypeError, KeyError):
        return None


def live_pid(path: Path) -> int | None:
    """The pid recorded in ``path`` while that very process runs (:func:`is_alive`), else None."""
    identity = read_pid_file(path)
    return identity.pid if identity is not None and is_alive(identity) else None
