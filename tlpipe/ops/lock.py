"""Process locks on files: the OS lock (``fcntl.flock``) plus a note of who holds it.

The kernel releases an ``flock`` when its holder exits, however it exits
(``kill -9`` included), so a lock left by a killed process never blocks: the
note in the file is then stale but harmless, and the next holder rewrites it.
"""

from __future__ import annotations

import fcntl
import json
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

from tlpipe.core.errors import UserError


class LockHeldError(UserError, RuntimeError):
    """Another process holds the lock; the message names it (pid, since when, command)."""


def describe_holder(path: Path) -> str:
    """The holder note of a lock file as text, e.g. ``pid 123 since 2026-01-02 10:00:00 (tlpipe repro)``."""
    try:
        note = json.loads(Path(path).read_text() or "{}")
    except (OSError, ValueError):
        return "an unknown process"
    since = datetime.fromtimestamp(note["since"]).strftime("%Y-%m-%d %H:%M:%S") if "since" in note else "?"
    command = f" ({note['command']})" if note.get("command") else ""
    return f"pid {note.get('pid', '?')} since {since}{command}"


@contextmanager
def file_lock(path: Path, what: str, wait_s: float | None = 0.0) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` for the block and note this process in it.

    Args:
        path: The lock file (created, with its folder, if missing).
        what: What the lock protects, for the error message ("a pipeline run in /x").
        wait_s: 0 to fail at once when the lock is held, seconds to wait, or None to wait forever.

    Raises:
        LockHeldError: When another process holds the lock (after ``wait_s``), naming it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = open(path, "a+")  # noqa: SIM115 (held for the lock's lifetime)
    held = False
    try:
        deadline = None if wait_s is None else time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if deadline is not None and time.monotonic() >= deadline:
                    raise LockHeldError(
                        f"{what} is already running: {describe_holder(path)}; wait for it to finish "
                        f"(the lock is {path})") from None
                time.sleep(0.2)
        held = True
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps({"pid": os.getpid(), "since": time.time(),
                                 "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])[:200]}))
        handle.flush()
        yield
    finally:
        if held:  # clear the note while still holding the lock
            handle.seek(0)
            handle.truncate()
        handle.close()  # closing the file releases the lock


def pipeline_lock_path(root: Path) -> Path:
    """The lock a pipeline run holds for its whole life: ``<root>/.dvc/tmp/tlpipe-pipeline.lock``."""
    return Path(root) / ".dvc" / "tmp" / "tlpipe-pipeline.lock"


def pipeline_lock(root: Path):
    """Hold the project's pipeline lock; a second pipeline run in the project fails at once, naming the first.

    Raises:
        LockHeldError: When another pipeline run of this project holds it.
    """
    return file_lock(pipeline_lock_path(root), f"a tlpipe pipeline run in {Path(root)}", wait_s=0)
