"""Shared tracking services: a PostgreSQL cluster and an MLflow tracking server on top of it.

``make tracking-server`` (``python -m tlpipe.ops.services start``) starts both, bound to
127.0.0.1; ``make tracking-stop`` stops them; ``python -m tlpipe.ops.services status``
reports them. Everything lives in one state folder (default ``<project>/.tlpipe``)::

    .tlpipe/pg/data/           the PostgreSQL cluster (owned by the server's user)
    .tlpipe/pg/run/            its unix socket
    .tlpipe/pg/postgres.log    its log
    .tlpipe/pg/password        the database password (0600, generated once)
    .tlpipe/mlflow-artifacts/  artifacts, proxied by the MLflow server (--artifacts-destination)
    .tlpipe/mlflow.pid|.log    the MLflow server
    .tlpipe/tracking.json      ports and URIs of the running services

PostgreSQL binaries come from ``$TLPIPE_PG_BIN``, else the ``pgserver`` wheel in the
project's environment (PostgreSQL 16; ``make setup`` installs it where it has wheels: Linux
x86_64, CPython 3.11 and 3.12), else a system installation (Debian's
``/usr/lib/postgresql/<version>/bin``, newest first, or ``pg_ctl`` on PATH).
PostgreSQL refuses to run as root: when this runs as root the cluster is owned and
run by ``$TLPIPE_PG_USER`` (default ``nobody``). Clients authenticate with a
password (SCRAM); the server listens on 127.0.0.1 and a private socket only.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import pwd
import secrets
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from tlpipe.core.errors import UserError
from tlpipe.core.files import write_atomic
from tlpipe.ops.process_identity import live_pid, write_pid_file
from tlpipe.ops.processes import HOST, healthy, port_free, stop_process_group, tail

DEFAULT_PG_PORT = 55432
DEFAULT_MLFLOW_PORT = 5010
DB_USER = "tlpipe"
DB_NAME = "mlflow"
PG_USER_ENV = "TLPIPE_PG_USER"
PG_BIN_ENV = "TLPIPE_PG_BIN"
SYSTEM_PG_ROOT = Path("/usr/lib/postgresql")  # Debian's PostgreSQL: <root>/<major version>/bin
STATE_FILE = "tracking.json"


class ServiceError(UserError, RuntimeError):
    """A tracking service cannot be found, started or stopped; the message says why and what to do."""


@dataclass(frozen=True)
class TrackingEndpoints:
    """Where the running services listen."""

    tracking_uri: str
    backend_store_uri: str  # without the password (it is passed to the server in PGPASSWORD)
    artifacts_destination: str
    pg_port: int
    mlflow_port: int
    mlflow_pid: int
    pg_seconds: float  # start-up time of PostgreSQL (initdb included on first start)
    mlflow_seconds: float  # start-up time of the MLflow server until /health answered


@dataclass(frozen=True)
class StateDir:
    """Paths inside one state folder."""

    root: Path

    @property
    def pg(self) -> Path:
        return self.root / "pg"

    @property
    def pg_data(self) -> Path:
        return self.pg / "data"

    @property
    def pg_socket(self) -> Path:
        return self.pg / "run"

    @property
    def pg_log(self) -> Path:
        return self.pg / "postgres.log"

    @property
    def password(self) -> Path:
        return self.pg / "password"

    @property
    def artifacts(self) -> Path:
        return self.root / "mlflow-artifacts"

    @property
    def mlflow_pid(self) -> Path:
        return self.root / "mlflow.pid"

    @property
    def mlflow_log(self) -> Path:
        return self.root / "mlflow.log"

    @property
    def state(self) -> Path:
        return self.root / STATE_FILE


# ---------------------------------------------------------------- PostgreSQL


def postgres_bin_dir(user: str | None = None) -> Path:
    """The folder holding ``initdb``, ``pg_ctl`` and ``postgres`` (see module docstring for the order).

    With ``user`` (the server user), folders that user cannot reach are skipped, e.g. a virtual
    environment inside a private (mode 0700) folder: the next candidate is taken."""
    candidates: list[Path] = []
    if os.environ.get(PG_BIN_ENV):
        candidates.append(Path(os.environ[PG_BIN_ENV]))
    spec = importlib.util.find_spec("pgserver")  # located, not imported (its import has side effects)
    if spec is not None and spec.submodule_search_locations:
        candidates.append(Path(list(spec.submodule_search_locations)[0]) / "pginstall" / "bin")
    debian = sorted(SYSTEM_PG_ROOT.glob("*/bin"), key=lambda p: int(p.parent.name)
                    if p.parent.name.isdigit() else 0, reverse=True)
    candidates.extend(debian)
    if on_path := shutil.which("pg_ctl"):
        candidates.append(Path(on_path).parent)
    found = [folder for folder in candidates
             if all((folder / tool).is_file() for tool in ("initdb", "pg_ctl", "postgres"))]
    for folder in found:
        if unreachable_parent(folder, user) is None:
            return folder
    if found:
        parent = unreachable_parent(found[0], user)
        raise ServiceError(
            f"user '{user}' cannot enter {parent}, so it cannot run PostgreSQL from {found[0]}: clone the project "
            f"where that user can reach it, install Debian's postgresql, or set {PG_BIN_ENV}")
    raise ServiceError(
        "no PostgreSQL server binaries found: install Debian's postgresql (`apt-get install -y postgresql`), "
        "or run `make setup` on Linux x86_64 with Python 3.11 or 3.12 (installs the pgserver wheel), "
        f"or set {PG_BIN_ENV} to the folder holding initdb and pg_ctl")


def server_user() -> str | None:
    """The unprivileged user that owns and runs the cluster when we are root (None: run as ourselves)."""
    if os.geteuid() != 0:
        return None
    name = os.environ.get(PG_USER_ENV, "nobody")
    try:
        pwd.getpwnam(name)
    except KeyError:
        raise ServiceError(f"user '{name}' ({PG_USER_ENV}) does not exist; PostgreSQL cannot run as root") from None
    return name


def unreachable_parent(folder: Path, user: str | None) -> Path | None:
    """The first existing folder on ``folder``'s path that ``user`` cannot enter, or None."""
    if user is None:
        return None
    for parent in [folder.resolve(), *folder.resolve().parents]:
        if parent.exists() and not parent.stat().st_mode & 0o001 and parent.stat().st_uid != pwd.getpwnam(user).pw_uid:
            return parent
    return None


def check_reachable(folder: Path, user: str | None) -> None:
    """Fail when ``user`` cannot traverse every parent of ``folder`` (PostgreSQL would fail obscurely)."""
    parent = unreachable_parent(folder, user)
    if parent is not None:
        raise ServiceError(
            f"user '{user}' cannot enter {parent} (mode {oct(parent.stat().st_mode & 0o777)}), so PostgreSQL "
            f"cannot use {folder}: choose a state folder it can reach (--state-dir), or another {PG_USER_ENV}")


def _as_server_user(command: list[str], user: str | None, **kwargs) -> subprocess.CompletedProcess:
    """Run a PostgreSQL tool as the cluster's user, C locale, capturing output."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env.update({"LC_ALL": "C", "LANG": "C"})
    if user is not None:
        entry = pwd.getpwnam(user)
        kwargs.update(user=entry.pw_uid, group=entry.pw_gid, extra_groups=[])
        env["HOME"] = "/"
    return subprocess.run(command, env=env, capture_output=True, text=True, **kwargs)


def _chown(path: Path, user: str | None) -> None:
    if user is not None:
        entry = pwd.getpwnam(user)
        os.chown(path, entry.pw_uid, entry.pw_gid)


def init_cluster(state: StateDir, bin_dir: Path, user: str | None) -> None:
    """``initdb`` a new cluster (SCRAM password auth, UTF-8, C locale) unless one exists."""
    if (state.pg_data / "PG_VERSION").is_file():
        return
    check_reachable(state.root, user)
    state.root.mkdir(parents=True, exist_ok=True)
    os.chmod(state.root, 0o755)
    state.pg.mkdir(exist_ok=True)
    os.chmod(state.pg, 0o755)
    for folder in (state.pg_data, state.pg_socket):
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(mode=0o700)
        _chown(folder, user)
    if not state.password.is_file():
        write_atomic(state.password, secrets.token_urlsafe(24), mode=0o600)
    pwfile = state.pg_socket / "initdb-password"  # readable by the cluster's user only, removed right after
    pwfile.write_text(state.password.read_text())
    os.chmod(pwfile, 0o600)
    _chown(pwfile, user)
    try:
        result = _as_server_user([str(bin_dir / "initdb"), "-D", str(state.pg_data), "-U", DB_USER,
                                  "--auth=scram-sha-256", f"--pwfile={pwfile}", "-E", "UTF8", "--locale=C"],
                                 user, timeout=300)
    finally:
        pwfile.unlink(missing_ok=True)
    if result.returncode != 0:
        shutil.rmtree(state.pg_data, ignore_errors=True)
        raise ServiceError(f"initdb failed in {state.pg_data}: {result.stderr.strip()[-800:]}")


def postgres_running(state: StateDir, bin_dir: Path | None = None) -> bool:
    """Whether the cluster's postmaster runs (``pg_ctl status``)."""
    if not (state.pg_data / "PG_VERSION").is_file():
        return False
    bin_dir = bin_dir or postgres_bin_dir(server_user())
    return _as_server_user([str(bin_dir / "pg_ctl"), "-D", str(state.pg_data), "status"], server_user(),
                           timeout=60).returncode == 0


def start_postgres(state: StateDir, port: int = DEFAULT_PG_PORT, timeout_s: int = 120) -> float:
    """Init (first time) and start the cluster on 127.0.0.1:``port``; create the MLflow database.

    Returns:
        Seconds until the server accepted connections and the database existed.
    """
    start = time.perf_counter()
    user = server_user()
    bin_dir = postgres_bin_dir(user)
    init_cluster(state, bin_dir, user)
    if not postgres_running(state, bin_dir):
        if not port_free(port):
            raise ServiceError(f"port {port} on {HOST} is taken: choose another PostgreSQL port (--pg-port)")
        _chown(state.pg_socket, user)
        log = state.pg_log
        log.touch()
        _chown(log, user)
        options = f"-c listen_addresses={HOST} -p {port} -k {state.pg_socket}"
        result = _as_server_user([str(bin_dir / "pg_ctl"), "-D", str(state.pg_data), "-l", str(log), "-o", options,
                                  "-w", "-t", str(timeout_s), "start"], user, timeout=timeout_s + 30)
        if result.returncode != 0:
            raise ServiceError(f"PostgreSQL did not start (see {log}): {tail(log)}")
    ensure_database(state, port)
    return time.perf_counter() - start


def connect_postgres(state: StateDir, port: int, database: str = "postgres"):
    """A psycopg2 connection to the cluster as the tlpipe user."""
    import psycopg2

    return psycopg2.connect(host=HOST, port=port, user=DB_USER, password=state.password.read_text(),
                            dbname=database, connect_timeout=10)


def ensure_database(state: StateDir, port: int) -> None:
    """Create the MLflow database when missing."""
    connection = connect_postgres(state, port)
    try:
        connection.autocommit = True
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1 FROM pg_database WHERE datname = %s", (DB_NAME,))
            if cursor.fetchone() is None:
                cursor.execute(f'CREATE DATABASE "{DB_NAME}"')
    finally:
        connection.close()


def stop_postgres(state: StateDir, timeout_s: int = 60) -> bool:
    """Stop the cluster (fast shutdown); return whether it was running."""
    if not (state.pg_data / "PG_VERSION").is_file():
        return False
    bin_dir = postgres_bin_dir(server_user())
    if not postgres_running(state, bin_dir):
        return False
    result = _as_server_user([str(bin_dir / "pg_ctl"), "-D", str(state.pg_data), "-m", "fast", "-w",
                              "-t", str(timeout_s), "stop"], server_user(), timeout=timeout_s + 30)
    if result.returncode != 0:
        raise ServiceError(f"PostgreSQL did not stop: {result.stderr.strip()[-400:]}")
    return True


def backend_store_uri(port: int) -> str:
    """The SQLAlchemy URI of the MLflow database, without the password."""
    return f"postgresql+psycopg2://{DB_USER}@{HOST}:{port}/{DB_NAME}"


# ---------------------------------------------------------------- MLflow server


def read_pid(path: Path) -> int | None:
    """The pid in a pid file while that very process runs (same pid and start time), else None.

    See :mod:`tlpipe.ops.process_identity`: a reused pid is never taken for the server, so it is never killed.
    """
    return live_pid(path)


def start_mlflow(state: StateDir, pg_port: int, port: int = DEFAULT_MLFLOW_PORT,
                 timeout_s: int = 180) -> tuple[int, float]:
    """Start ``mlflow server`` on PostgreSQL with proxied artifacts, detached; wait for ``/health``.

    Returns:
        (pid, seconds until healthy).

    Raises:
        ServiceError: When the port is taken, the server exits, or it is not healthy in time
            (the message carries its log tail).
    """
    if read_pid(state.mlflow_pid) is not None:
        raise ServiceError(f"an MLflow server of {state.root} already runs (pid file {state.mlflow_pid})")
    if not port_free(port):
        raise ServiceError(f"port {port} on {HOST} is taken: choose another MLflow port (--port)")
    state.artifacts.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend_store_uri(pg_port),
               "--artifacts-destination", state.artifacts.resolve().as_uri(), "--serve-artifacts",
               "--host", HOST, "--port", str(port), "--workers", "1"]
    env = {**os.environ, "PGPASSWORD": state.password.read_text(), "MLFLOW_DISABLE_TELEMETRY": "true",
           "DO_NOT_TRACK": "1", "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # no GenAI job runner (7 processes)
    env.pop("MLFLOW_TRACKING_URI", None)
    start = time.perf_counter()
    with open(state.mlflow_log, "ab") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   env=env, start_new_session=True, cwd=state.root)
    write_pid_file(state.mlflow_pid, process.pid)  # pid + start time
    url = f"http://{HOST}:{port}/health"
    while time.perf_counter() - start < timeout_s:
        if process.poll() is not None:
            state.mlflow_pid.unlink(missing_ok=True)
            raise ServiceError(f"the MLflow server exited with code {process.returncode} (see {state.mlflow_log}):\n"
                               f"{tail(state.mlflow_log)}")
        if healthy(url):
            return process.pid, time.perf_counter() - start
        time.sleep(0.25)
    stop_process_group(process.pid)
    state.mlflow_pid.unlink(missing_ok=True)
    raise ServiceError(f"the MLflow server was not healthy after {timeout_s} s (see {state.mlflow_log}):\n"
                       f"{tail(state.mlflow_log)}")


def stop_mlflow(state: StateDir) -> bool:
    """Stop the MLflow server (its whole process group); return whether it was running."""
    pid = read_pid(state.mlflow_pid)
    state.mlflow_pid.unlink(missing_ok=True)
    if pid is None:
        return False
    stop_process_group(pid)
    return True


# ---------------------------------------------------------------- both


def start_tracking(state_dir: Path, pg_port: int = DEFAULT_PG_PORT,
                   mlflow_port: int = DEFAULT_MLFLOW_PORT) -> TrackingEndpoints:
    """Start PostgreSQL, then the MLflow server on it; record the endpoints in ``tracking.json``.

    When the MLflow server fails or refuses to start (one already runs, its port is taken),
    PostgreSQL is stopped again only if this call started it: a running one may serve a live
    MLflow server.
    """
    state = StateDir(Path(state_dir).resolve())
    was_running = postgres_running(state)
    pg_seconds = start_postgres(state, pg_port)
    try:
        pid, mlflow_seconds = start_mlflow(state, pg_port, mlflow_port)
    except BaseException:
        if not was_running:
            stop_postgres(state)
        raise
    endpoints = TrackingEndpoints(
        tracking_uri=f"http://{HOST}:{mlflow_port}", backend_store_uri=backend_store_uri(pg_port),
        artifacts_destination=state.artifacts.as_uri(), pg_port=pg_port, mlflow_port=mlflow_port,
        mlflow_pid=pid, pg_seconds=round(pg_seconds, 3), mlflow_seconds=round(mlflow_seconds, 3))
    write_atomic(state.state, json.dumps(asdict(endpoints), indent=2) + "\n")
    return endpoints


def stop_tracking(state_dir: Path) -> dict[str, bool]:
    """Stop the MLflow server, then PostgreSQL; return which ones were running."""
    state = StateDir(Path(state_dir).resolve())
    stopped = {"mlflow": stop_mlflow(state), "postgres": stop_postgres(state)}
    state.state.unlink(missing_ok=True)
    return stopped


def restart_mlflow(state_dir: Path) -> TrackingEndpoints:
    """Stop and start the MLflow server on the same ports (PostgreSQL keeps running)."""
    state = StateDir(Path(state_dir).resolve())
    recorded = TrackingEndpoints(**json.loads(state.state.read_text()))
    stop_mlflow(state)
    pid, seconds = start_mlflow(state, recorded.pg_port, recorded.mlflow_port)
    endpoints = TrackingEndpoints(**{**asdict(recorded), "mlflow_pid": pid, "mlflow_seconds": round(seconds, 3)})
    state.state.write_text(json.dumps(asdict(endpoints), indent=2) + "\n")
    return endpoints


def tracking_status(state_dir: Path) -> dict[str, object]:
    """What runs: PostgreSQL (``pg_ctl status``), the MLflow server (pid and ``/health``), the URIs."""
    state = StateDir(Path(state_dir).resolve())
    recorded = json.loads(state.state.read_text()) if state.state.is_file() else {}
    uri = recorded.get("tracking_uri")
    return {"postgres": postgres_running(state) if (state.pg_data / "PG_VERSION").is_file() else False,
            "mlflow": bool(read_pid(state.mlflow_pid)) and bool(uri) and healthy(f"{uri}/health"),
            "tracking_uri": uri, "backend_store_uri": recorded.get("backend_store_uri"),
            "artifacts_destination": recorded.get("artifacts_destination")}


def main(argv: list[str] | None = None) -> int:
    """``python -m tlpipe.ops.services {start,stop,status,restart-mlflow,binaries}``."""
    parser = argparse.ArgumentParser(prog="python -m tlpipe.ops.services", description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=("start", "stop", "status", "restart-mlflow", "binaries"),
                        help="binaries: print the PostgreSQL binaries folder (exit 1 when there is none)")
    parser.add_argument("--state-dir", type=Path, default=None, help="default: <project root>/.tlpipe")
    parser.add_argument("--pg-port", type=int, default=DEFAULT_PG_PORT)
    parser.add_argument("--port", type=int, default=DEFAULT_MLFLOW_PORT, help="MLflow server port")
    args = parser.parse_args(argv)
    try:
        if args.action == "binaries":
            print(postgres_bin_dir())
            return 0
        if args.state_dir is None:
            from tlpipe.core.paths import find_root

            args.state_dir = find_root() / ".tlpipe"
        if args.action == "start":
            endpoints = start_tracking(args.state_dir, args.pg_port, args.port)
            print(f"PostgreSQL on {HOST}:{endpoints.pg_port} ({endpoints.pg_seconds:.1f} s), MLflow server on "
                  f"{endpoints.tracking_uri} ({endpoints.mlflow_seconds:.1f} s), artifacts in "
                  f"{endpoints.artifacts_destination}\nexport MLFLOW_TRACKING_URI={endpoints.tracking_uri}")
        elif args.action == "stop":
            stopped = stop_tracking(args.state_dir)
            print(", ".join(f"{k} {'stopped' if v else 'was not running'}" for k, v in stopped.items()))
        elif args.action == "restart-mlflow":
            print(f"MLflow server restarted on {restart_mlflow(args.state_dir).tracking_uri}")
        else:
            print(json.dumps(tracking_status(args.state_dir), indent=2))
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
