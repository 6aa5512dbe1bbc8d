"""Child processes that never outlive the process that started them.

:func:`guarded_group` starts a command in a process group of its own and stops the whole group
(SIGTERM, a grace period, then SIGKILL) when the block ends, however it ends: normally, on an
exception, on SIGINT (``KeyboardInterrupt``), on a SIGTERM turned into an exception
(:func:`signals_raise`, or Prefect's own SIGTERM bridge inside a flow), on a task timeout. The
group holds the command and everything it starts (``dvc repro``'s stage processes and their
workers; a server's workers), unless one of them makes a group of its own.

A ``finally`` cannot run when the parent is SIGKILLed, so a watchdog stands beside each group:
``python -m tlpipe.ops.process_group``, in a session of its own, reading a pipe whose write end
only the parent holds. The parent writes the group's id on it, and ``done`` once it has
stopped the group itself; when the parent dies instead (SIGKILL included) the kernel closes
the write end, the watchdog reads end-of-file without ``done`` and stops the group.

Why a watchdog rather than ``prctl(PR_SET_PDEATHSIG)`` in a ``preexec_fn``: the death signal
reaches only the direct child (not the stage processes DVC starts under it), and it fires when
the *thread* that started the child exits, not when the process does.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

GRACE_S = 10.0
"""Seconds a group gets between SIGTERM and SIGKILL."""
KILL_WAIT_S = 10.0
"""Seconds to wait for a SIGKILLed group to be gone (a process stuck in the kernel may take longer)."""
DONE = b"done"


def group_members(pgid: int) -> list[int]:
    """Pids of the live processes (zombies excluded) of process group ``pgid``."""
    import psutil

    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return []
    except PermissionError:
        pass  # a member we may not signal: look at each process
    members = []
    for process in psutil.process_iter(["status"]):
        try:
            if os.getpgid(process.pid) == pgid and process.info["status"] != psutil.STATUS_ZOMBIE:
                members.append(process.pid)
        except (ProcessLookupError, psutil.Error):
            continue
    return members


def stop_group(pgid: int, grace_s: float = GRACE_S, leader: subprocess.Popen | None = None) -> bool:
    """SIGTERM process group ``pgid``, SIGKILL what is left after ``grace_s``; return once none is left.

    Args:
        pgid: The group (the pid of the process that leads it).
        grace_s: Seconds between SIGTERM and SIGKILL.
        leader: The leader's ``Popen`` when this process started it: reaped while waiting.

    Returns:
        Whether the group had live processes to stop.
    """
    if leader is not None:
        leader.poll()
    if not group_members(pgid):
        return False
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, KILL_WAIT_S)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + wait_s
        while True:
            if leader is not None:
                leader.poll()
            if not group_members(pgid):
                return True
            if time.monotonic() >= deadline:
                break
            time.sleep(0.1)
    return True


def start_watchdog(grace_s: float) -> tuple[subprocess.Popen, int]:
    """Start the watchdog of one group; return it and the write end of its pipe (held by this process only)."""
    read_end, write_end = os.pipe()  # both ends are non-inheritable; stdin= makes a copy of the read end
    try:
        watchdog = subprocess.Popen([sys.executable, "-m", "tlpipe.ops.process_group", str(grace_s)], stdin=read_end,
                                    stdout=subprocess.DEVNULL, start_new_session=True, close_fds=True,
                                    cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this tlpipe
    finally:
        os.close(read_end)
    return watchdog, write_end


def tell_watchdog(write_end: int, word: bytes) -> None:
    """Write one line to the watchdog (nothing happens if it is gone)."""
    try:
        os.write(write_end, word + b"\n")
    except OSError:
        pass


def release_watchdog(watchdog: subprocess.Popen, write_end: int) -> None:
    """Tell the watchdog the group is stopped and wait for it to exit."""
    tell_watchdog(write_end, DONE)
    os.close(write_end)
    try:
        watchdog.wait(timeout=30)
    except subprocess.TimeoutExpired:
        watchdog.kill()
        watchdog.wait()


@contextmanager
def guarded_group(command: Sequence[str], name: str, grace_s: float = GRACE_S,
                  **popen: object) -> Iterator[subprocess.Popen]:
    """Run ``command`` in a process group of its own that is stopped when the block ends, however it ends.

    Its stdin is /dev/null unless ``popen`` says otherwise (a background group must not read the
    terminal). See the module docstring for the SIGKILL case.

    Args:
        command: The command line.
        name: What it is, for the line printed when it is stopped early ("dvc", "the MLflow server").
        grace_s: Seconds between SIGTERM and SIGKILL when the group is stopped.
        **popen: Further :class:`subprocess.Popen` arguments (cwd, env, stdout, ...).

    Yields:
        The started process (the leader of its group).
    """
    popen.setdefault("stdin", subprocess.DEVNULL)
    watchdog, write_end = start_watchdog(grace_s)
    process = None
    try:
        process = subprocess.Popen(command, process_group=0, **popen)
        tell_watchdog(write_end, str(process.pid).encode())
        yield process
    finally:
        if process is not None and process.poll() is None:
            print(f"tlpipe: stopping {name} (pid {process.pid}) and its process group", file=sys.stderr, flush=True)
        if process is not None:
            stop_group(process.pid, grace_s, process)
        release_watchdog(watchdog, write_end)


@contextmanager
def signals_raise(signals: Sequence[int] = (signal.SIGTERM, signal.SIGHUP)) -> Iterator[None]:
    """Turn ``signals`` into ``SystemExit(128 + signal)`` for the block, so ``finally`` clauses run.

    Python's default for SIGTERM and SIGHUP ends the process at once, skipping them. Call from
    the main thread; the previous handlers come back after the block.
    """
    def exit_on(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    previous = {sig: signal.signal(sig, exit_on) for sig in signals}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def watch(stream, grace_s: float) -> None:
    """The watchdog's loop: read the group id, then wait for ``done``; at end-of-file without it, stop the group."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    pgid = None
    for line in stream:
        word = line.strip()
        if word == DONE:
            return
        if word.isdigit():
            pgid = int(word)
    if pgid is not None:
        stop_group(pgid, grace_s)


if __name__ == "__main__":
    watch(sys.stdin.buffer, float(sys.argv[1]) if len(sys.argv) > 1 else GRACE_S)
