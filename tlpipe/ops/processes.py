"""Process and server helpers shared by the PostgreSQL/MLflow services and the Prefect server.

Ports on 127.0.0.1, health checks over HTTP, log tails, and stopping a detached
server's whole process group.
"""

from __future__ import annotations

import os
import signal
import socket
import time
import urllib.error
import urllib.request
from pathlib import Path

HOST = "127.0.0.1"


def port_bindable(port: int) -> bool:
    """Whether a local TCP port can be bound right now."""
    with socket.socket() as sock:
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
    return True


def port_free(port: int) -> bool:
    """Whether nothing listens on 127.0.0.1:``port`` (a port in TIME_WAIT counts as free)."""
    with socket.socket() as probe:
        return probe.connect_ex((HOST, port)) != 0


def free_port() -> int:
    """A port that is free on 127.0.0.1 right now."""
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        return probe.getsockname()[1]


def choose_port(preferred: int) -> int:
    """``preferred`` when it can be bound, else (or when it is 0) any free local port."""
    if preferred and port_bindable(preferred):
        return preferred
    return free_port()


def healthy(url: str, timeout_s: float = 2.0) -> bool:
    """Whether ``GET url`` answers 200."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def tail(path: Path, lines: int = 15) -> str:
    """The last lines of a log file (empty when missing)."""
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def group_stopped(pid: int) -> bool:
    """Whether the process group led by ``pid`` is gone, or its leader is a zombie (ended, not yet reaped)."""
    import psutil

    try:
        os.waitpid(pid, os.WNOHANG)  # reap the leader when it is our child
    except ChildProcessError:
        pass  # not our child (or reaped)
    try:
        os.killpg(pid, 0)
    except ProcessLookupError:
        return True
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def stop_process_group(pid: int, timeout_s: float = 20.0) -> None:
    """SIGTERM the process group led by ``pid``, then SIGKILL it when it has not stopped after ``timeout_s``."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if group_stopped(pid):
                return
            time.sleep(0.1)
