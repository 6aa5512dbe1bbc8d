"""The project's own Prefect server: started once, outlives the stages, keeps every flow run.

Without it, each ``python -m flows.<stage>`` process that DVC starts would spin up
Prefect's temporary (ephemeral) server: ~10 s per stage, and its runs vanish with
it. Instead the first entry point that needs Prefect starts

    prefect server start --host 127.0.0.1 --port <port>

in the background (the way Prefect documents running a server), with its own
``PREFECT_HOME`` under the project, and every later process reuses it after a
health check (``GET /api/health``). Files, all under ``<project>/.prefect/``:

* ``prefect.db``: the server's SQLite database, i.e. where the flow runs are kept;
* ``server.json``: pid, port, URL and start time of the running server;
* ``server.log``: the server's output;
* ``server.lock``: held while a server is being started, so two stage processes
  starting at once (``dvc queue start -j 2``) start one server, not two;
* ``watchdog.json``: the settings of the watchdog started beside the server
  (:mod:`tlpipe.ops.prefect_watchdog`), which stops it once idle or once the project is gone.

Choice per process (:func:`api_url_for`): ``$PREFECT_API_URL`` when set (tests,
shared servers) is used as is; ``TLPIPE_PREFECT_SERVER=ephemeral`` keeps
Prefect's own per-process temporary server; otherwise (``auto``, the default)
the project's server, started if needed. ``TLPIPE_PREFECT_PORT`` picks the port
(default 4200; a free one is chosen when that is taken).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from tlpipe.core.errors import UserError
from tlpipe.core.paths import tracking_root
from tlpipe.ops.lock import file_lock
from tlpipe.ops.process_identity import ProcessIdentity, identify, is_alive
from tlpipe.ops.processes import HOST, choose_port, healthy, stop_process_group

MODE_ENV = "TLPIPE_PREFECT_SERVER"
PORT_ENV = "TLPIPE_PREFECT_PORT"
DEFAULT_PORT = 4200
START_TIMEOUT_S = 180.0
HOME_DIR = ".prefect"


class PrefectServerError(UserError, RuntimeError):
    """The project's Prefect server could not be started or reached."""


@dataclass(frozen=True)
class ServerInfo:
    """What ``server.json`` records about a started server.

    ``created`` is the server process's start time (``psutil``'s ``create_time``): with ``pid``,
    its identity (:mod:`tlpipe.ops.process_identity`); None in records of older versions, never trusted.
    """

    pid: int
    port: int
    url: str
    started: float
    created: float | None = None


def main_project_root(root: Path | str) -> Path:
    """The project a path belongs to; a DVC experiment workspace maps to its project.

    DVC runs queued and ``--temp`` experiments in ``<project>/.dvc/tmp/exps/...``; they must
    report to the project's server, not start one in a folder DVC deletes. Same rule as the
    tracking store's (:func:`tlpipe.core.paths.tracking_root`).
    """
    return tracking_root(root)


def home(root: Path | str) -> Path:
    """The server's ``PREFECT_HOME``: ``<project>/.prefect``."""
    return main_project_root(root) / HOME_DIR


def read_info(root: Path | str) -> ServerInfo | None:
    """The recorded server, or None when none was recorded (or the record is unreadable)."""
    try:
        return ServerInfo(**json.loads((home(root) / "server.json").read_text()))
    except (OSError, ValueError, TypeError):
        return None


def is_healthy(url: str, timeout: float = 2.0) -> bool:
    """Whether the Prefect API at ``url`` answers its health check."""
    return healthy(f"{url.rstrip('/')}/health", timeout)


def server_is_alive(info: ServerInfo) -> bool:
    """Whether the recorded server process still runs: same pid and start time (never a reused pid)."""
    return info.created is not None and is_alive(ProcessIdentity(info.pid, info.created))


def running_url(root: Path | str) -> str | None:
    """The API URL of the project's server if it is running and healthy, else None."""
    info = read_info(root)
    if info is None or not server_is_alive(info) or not is_healthy(info.url):
        return None
    return info.url


def server_command(port: int) -> list[str]:
    """``prefect server start`` of this interpreter's environment."""
    binary = Path(sys.executable).parent / "prefect"
    prefix = [str(binary)] if binary.exists() else [sys.executable, "-m", "prefect"]
    return [*prefix, "server", "start", "--host", HOST, "--port", str(port)]


def start_server(root: Path | str, port: int | None = None, timeout: float = START_TIMEOUT_S) -> ServerInfo:
    """Start the server in the background and wait until it is healthy (call under the start lock).

    The server gets its own session (it outlives the process that started it and
    the ``dvc repro`` around that), no inherited pipes, and its output in ``server.log``.

    Raises:
        PrefectServerError: If it exits or is not healthy within ``timeout`` seconds.
    """
    folder = home(root)
    folder.mkdir(parents=True, exist_ok=True)
    port = choose_port(port or int(os.environ.get(PORT_ENV, DEFAULT_PORT)))
    url = f"http://{HOST}:{port}/api"
    env = {key: value for key, value in os.environ.items() if key != "PREFECT_API_URL"}
    env.update({"PREFECT_HOME": str(folder), "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1",
                # the UI asks /ui-settings which API to call; Prefect builds that from these, not from --port,
                # so on a port other than 4200 the UI would show whichever server holds 4200
                "PREFECT_SERVER_API_HOST": HOST, "PREFECT_SERVER_API_PORT": str(port), "PREFECT_UI_API_URL": url})
    log_path = folder / "server.log"
    start = time.monotonic()
    with open(log_path, "ab") as log, open(os.devnull, "rb") as devnull:
        process = subprocess.Popen(server_command(port), cwd=folder, env=env, stdin=devnull, stdout=log,
                                   stderr=subprocess.STDOUT, start_new_session=True, close_fds=True)
    while not is_healthy(url):
        if process.poll() is not None:
            raise PrefectServerError(f"the Prefect server exited with code {process.returncode} while "
                                     f"starting; see {log_path}")
        if time.monotonic() - start > timeout:
            stop_process_group(process.pid)
            raise PrefectServerError(f"the Prefect server was not healthy after {timeout:.0f} s; see {log_path}")
        time.sleep(0.25)
    info = ServerInfo(pid=process.pid, port=port, url=url, started=time.time(),
                      created=identify(process.pid).started)
    from tlpipe.core.files import write_atomic

    write_atomic(folder / "server.json", json.dumps(asdict(info)))
    start_watchdog(folder, info.pid)
    return info


def start_watchdog(folder: Path, pid: int) -> None:
    """Start ``python -m tlpipe.ops.prefect_watchdog`` beside the server ``pid`` (its own session, output to
    ``server.log``): it stops the server once idle (``$TLPIPE_PREFECT_IDLE_MINUTES``, default 30) or once
    ``folder`` is gone, and exits when the server does."""
    with open(folder / "server.log", "ab") as log, open(os.devnull, "rb") as devnull:
        subprocess.Popen([sys.executable, "-m", "tlpipe.ops.prefect_watchdog", str(folder), str(pid)],
                         cwd=Path(__file__).resolve().parents[1],  # where this tlpipe is, so it runs this code
                         stdin=devnull, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, close_fds=True)


def ensure_server(root: Path | str, port: int | None = None, timeout: float = START_TIMEOUT_S) -> str:
    """The running server's API URL, starting the server first when none is running.

    Concurrent callers serialise on ``server.lock``: the first starts the server,
    the others wait and then reuse it.
    """
    if url := running_url(root):
        return url
    with file_lock(home(root) / "server.lock", "starting the Prefect server", wait_s=timeout + 30):
        if url := running_url(root):
            return url
        print(f"tlpipe: starting the project's Prefect server (runs kept in {home(root)}; log "
              f"{home(root) / 'server.log'}; stop it with `make prefect-stop`)", file=sys.stderr, flush=True)
        return start_server(root, port, timeout).url


def stop_server(root: Path | str) -> bool:
    """Stop the project's server; return whether one was running."""
    info = read_info(root)
    (home(root) / "server.json").unlink(missing_ok=True)
    if info is None or not server_is_alive(info):
        return False
    stop_process_group(info.pid)
    return True


def api_url_for(root: Path | str) -> str | None:
    """The Prefect API URL this process should report to, or None to leave Prefect's own choice.

    None when ``$PREFECT_API_URL`` is set (it wins) or ``TLPIPE_PREFECT_SERVER=ephemeral``;
    otherwise the project's server (started if needed).

    Raises:
        PrefectServerError: If the server cannot be started.
    """
    if os.environ.get("PREFECT_API_URL"):
        return None
    mode = os.environ.get(MODE_ENV, "auto").strip().lower()
    if mode == "ephemeral":
        return None
    if mode != "auto":
        raise PrefectServerError(f"{MODE_ENV}={mode!r}: expected 'auto' (the project's server) or 'ephemeral'")
    return ensure_server(root)
