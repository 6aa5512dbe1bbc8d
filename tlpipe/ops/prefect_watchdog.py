"""The watchdog of a project's Prefect server: stops it once idle, or once its project folder is gone.

Prefect's server has no idle shutdown of its own, so :func:`tlpipe.ops.prefect_server.start_server`
starts this loop beside the server (``python -m tlpipe.ops.prefect_watchdog``, a process in its own
session). Every ``TLPIPE_PREFECT_CHECK_SECONDS`` (default 60) it looks at the server and stops it
(its process group: SIGTERM, then SIGKILL) when

* the project's ``.prefect`` folder is gone (the project was deleted or moved), or
* it has been idle for ``TLPIPE_PREFECT_IDLE_MINUTES`` (default 30; 0 never stops it for
  idleness). Idle means both: nothing was written to the server's database (``prefect.db`` and
  its WAL: every flow or task run state, log line, artifact and worker poll writes there; an idle
  server writes nothing) and no client holds a connection to it (a running flow keeps its
  events websocket open even through a long task that writes nothing).

It exits on its own when the server is gone (``make prefect-stop``). What it decided is appended
to ``.prefect/server.log``; ``.prefect/watchdog.json`` records its settings for :func:`lifetime_note`.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from datetime import datetime
from pathlib import Path

import psutil

# imported here, not where used: the watchdog may run code from a project folder that is then deleted
from tlpipe.ops.prefect_server import home, running_url, stop_process_group
from tlpipe.ops.process_identity import ProcessIdentity, is_alive

IDLE_ENV = "TLPIPE_PREFECT_IDLE_MINUTES"
CHECK_ENV = "TLPIPE_PREFECT_CHECK_SECONDS"
DEFAULT_IDLE_MINUTES = 30.0
DEFAULT_CHECK_SECONDS = 60.0
STATE_FILE = "watchdog.json"


def idle_minutes() -> float:
    """``$TLPIPE_PREFECT_IDLE_MINUTES`` (default 30; 0: never stop for idleness)."""
    return float(os.environ.get(IDLE_ENV) or DEFAULT_IDLE_MINUTES)


def check_seconds() -> float:
    """``$TLPIPE_PREFECT_CHECK_SECONDS``: how often the watchdog looks (default 60)."""
    return float(os.environ.get(CHECK_ENV) or DEFAULT_CHECK_SECONDS)


def last_write(folder: Path) -> float:
    """When the server's database (``prefect.db`` or its ``-wal``/``-shm`` files) was last written; 0 if never."""
    times = []
    for path in folder.glob("prefect.db*"):
        try:
            times.append(path.stat().st_mtime)
        except OSError:
            continue
    return max(times, default=0.0)


def has_clients(pid: int) -> bool:
    """Whether any client holds a TCP connection to the server ``pid`` (or one of its workers)."""
    try:
        server = psutil.Process(pid)
        processes = [server, *server.children(recursive=True)]
    except psutil.Error:
        return False
    for process in processes:
        try:
            if any(c.raddr and c.status == psutil.CONN_ESTABLISHED for c in process.net_connections("tcp")):
                return True
        except psutil.Error:
            continue
    return False


def same_process(pid: int, created: float) -> bool:
    """Whether ``pid`` is still the live process that started at ``created`` (not a reused pid, not a zombie)."""
    return is_alive(ProcessIdentity(pid, created))


def note(folder: Path, message: str) -> None:
    """Append one line to ``server.log`` (if the folder still exists)."""
    try:
        with open(folder / "server.log", "a") as log:
            log.write(f"{datetime.now():%Y-%m-%d %H:%M:%S} tlpipe watchdog: {message}\n")
    except OSError:
        pass


def stop(folder: Path, pid: int, reason: str) -> str:
    """Stop the server ``pid`` and forget it in ``server.json`` (when that still names it); return what was done."""
    stop_process_group(pid)
    try:
        if json.loads((folder / "server.json").read_text()).get("pid") == pid:
            (folder / "server.json").unlink()
    except (OSError, ValueError):
        pass
    return f"stopped the Prefect server (pid {pid}): {reason}"


def watch(folder: Path, pid: int, idle_s: float, check_s: float) -> str:
    """Look at the server ``pid`` every ``check_s`` seconds until it is gone, idle or orphaned; return why it ended.

    Args:
        folder: The server's ``PREFECT_HOME`` (``<project>/.prefect``).
        pid: The server process (the leader of its process group).
        idle_s: Seconds without database writes and client connections before it is stopped (0: never).
        check_s: Seconds between looks.
    """
    try:
        created = psutil.Process(pid).create_time()
    except psutil.Error:
        return "the server is gone"
    active = time.time()
    while True:
        time.sleep(check_s)
        if not same_process(pid, created):
            return "the server is gone"
        if not folder.is_dir():
            return stop(folder, pid, f"its folder {folder} is gone")
        if has_clients(pid):
            active = time.time()
        active = max(active, last_write(folder))
        if idle_s and time.time() - active >= idle_s:
            return stop(folder, pid, f"idle for {idle_s / 60:g} min")


def lifetime_note(root: Path | str) -> str | None:
    """What ``tlpipe repro`` says about the project's server it leaves running, or None when none runs."""
    url = running_url(root)
    if not url:
        return None
    folder = home(root)
    try:
        idle = float(json.loads((folder / STATE_FILE).read_text())["idle_minutes"])
    except (OSError, ValueError, KeyError, TypeError):
        idle = None
    ui = url.removesuffix("/api")
    if not idle:
        until = "until stopped"
    else:
        end = datetime.fromtimestamp(max(time.time(), last_write(folder)) + idle * 60)
        until = (f"until it has been idle for {idle:g} min (about {end:%H:%M} if nothing else uses it; "
                 f"{IDLE_ENV} sets that) or the project folder is deleted")
    return f"tlpipe: the project's Prefect server keeps running on {ui} {until}; stop it now with `make prefect-stop`"


def main(argv: list[str] | None = None) -> None:
    """``python -m tlpipe.ops.prefect_watchdog FOLDER PID [--idle-minutes M] [--check-seconds S]``.

    The defaults come from ``$TLPIPE_PREFECT_IDLE_MINUTES`` and ``$TLPIPE_PREFECT_CHECK_SECONDS``.
    """
    parser = argparse.ArgumentParser(prog="python -m tlpipe.ops.prefect_watchdog", description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="the server's PREFECT_HOME (<project>/.prefect)")
    parser.add_argument("pid", type=int, help="the server's pid")
    parser.add_argument("--idle-minutes", type=float, default=idle_minutes())
    parser.add_argument("--check-seconds", type=float, default=check_seconds())
    args = parser.parse_args(argv)
    state = args.folder / STATE_FILE  # written whole, then renamed (tlpipe.data.store would import pandas here)
    partial = state.with_name(f".{STATE_FILE}.tmp-{os.getpid()}")
    partial.write_text(json.dumps({"pid": os.getpid(), "server_pid": args.pid, "idle_minutes": args.idle_minutes,
                                   "check_seconds": args.check_seconds}))
    os.replace(partial, state)
    note(args.folder, f"watching the Prefect server (pid {args.pid}): stopping it after {args.idle_minutes:g} min "
                      f"idle (0: never) or when this folder is gone")
    note(args.folder, watch(args.folder, args.pid, args.idle_minutes * 60, args.check_seconds))


if __name__ == "__main__":
    main()
