"""Figure 8: start-up of the scale-out services: PostgreSQL + MLflow server, Prefect server + worker.

* PostgreSQL: ``tlpipe.ops.services.start_postgres`` with the pgserver wheel's binaries (ours, PostgreSQL 16)
  against Debian's (``/usr/lib/postgresql/<v>/bin``, the baseline, when installed): the first start of a
  new cluster (initdb + start + create the database) and a restart of the existing cluster.
* MLflow server on that PostgreSQL (ours) against the same server on a SQLite file (baseline), first start
  (schema migrations) and restart, each until ``/health`` answers.
* Prefect: ``prefect server start`` until ``/api/health`` answers, then ``prefect worker start`` on a
  process pool until the worker shows on the pool (no baseline: informational rows).

Every service is started in a temporary state folder on free ports and stopped at the end.
Run alone: ``python -m bench.services_bench [--quick] [--json PATH]``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import log, machine, row, write_json
from tlpipe.ops import processes, services


def debian_bin() -> Path | None:
    """Debian's newest PostgreSQL binaries folder, if installed."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"))
    return found[-1].parent if found else None


def postgres_times(bin_dir: Path | None, base: Path) -> dict[str, float]:
    """First start and restart of a new cluster with the binaries in ``bin_dir`` (None: the default choice)."""
    previous = os.environ.get(services.PG_BIN_ENV)
    if bin_dir is not None:
        os.environ[services.PG_BIN_ENV] = str(bin_dir)
    state = services.StateDir(base)
    port = processes.free_port()
    try:
        first = services.start_postgres(state, port)
        services.stop_postgres(state)
        again = services.start_postgres(state, port)
        return {"first": round(first, 2), "restart": round(again, 2), "port": port}
    finally:
        services.stop_postgres(state)
        if previous is None:
            os.environ.pop(services.PG_BIN_ENV, None)
        else:
            os.environ[services.PG_BIN_ENV] = previous


def mlflow_times(base: Path, backend: str) -> dict[str, float]:
    """First start and restart of ``mlflow server`` on ``backend`` ('postgres' or 'sqlite') until healthy."""
    state = services.StateDir(base)
    if backend == "postgres":
        port = processes.free_port()
        services.start_postgres(state, port)
        uri = services.backend_store_uri(port)
    else:
        base.mkdir(parents=True, exist_ok=True)
        uri = f"sqlite:///{base}/mlflow.db"
    times = {}
    try:
        for label in ("first", "restart"):
            port = processes.free_port()
            command = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri, "--artifacts-destination",
                       (base / "artifacts").as_uri(), "--serve-artifacts", "--host", processes.HOST,
                       "--port", str(port), "--workers", "1"]
            env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
            if backend == "postgres":
                env["PGPASSWORD"] = state.password.read_text()
            start = time.perf_counter()
            with open(base / "mlflow.log", "ab") as log_file:
                process = subprocess.Popen(command, env=env, stdout=log_file, stderr=subprocess.STDOUT,
                                           start_new_session=True)
            try:
                while not processes.healthy(f"http://{processes.HOST}:{port}/health"):
                    if process.poll() is not None or time.perf_counter() - start > 300:
                        raise RuntimeError(f"mlflow server failed:\n{processes.tail(base / 'mlflow.log')}")
                    time.sleep(0.1)
                times[label] = round(time.perf_counter() - start, 2)
            finally:
                processes.stop_process_group(process.pid)
    finally:
        if backend == "postgres":
            services.stop_postgres(state)
    return times


def prefect_times(base: Path) -> dict[str, float]:
    """``prefect server start`` until healthy, then a process worker until it shows on its pool."""
    port = processes.free_port()
    url = f"http://{processes.HOST}:{port}/api"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update({"PREFECT_HOME": str(base / "prefect"), "PREFECT_API_URL": url,
                "PREFECT_SERVER_ANALYTICS_ENABLED": "false"})
    logs = base / "prefect.log"
    base.mkdir(parents=True, exist_ok=True)
    started = []
    try:
        start = time.perf_counter()
        with open(logs, "ab") as log_file:
            started.append(subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host",
                                               processes.HOST, "--port", str(port)], env=env, stdout=log_file,
                                              stderr=subprocess.STDOUT, start_new_session=True))
        while not processes.healthy(f"{url}/health"):
            if started[0].poll() is not None or time.perf_counter() - start > 300:
                raise RuntimeError(f"prefect server failed:\n{processes.tail(logs)}")
            time.sleep(0.2)
        server = time.perf_counter() - start
        start = time.perf_counter()
        with open(logs, "ab") as log_file:
            started.append(subprocess.Popen([sys.executable, "-m", "prefect", "worker", "start", "--pool", "bench",
                                               "--type", "process", "--name", "bench-worker", "--install-policy",
                                               "never"], env=env, stdout=log_file, stderr=subprocess.STDOUT,
                                              start_new_session=True))
        probe = [sys.executable, "-c", "from prefect.client.orchestration import get_client\n"
                 "with get_client(sync_client=True) as c:\n"
                 "    print(any(w.name == 'bench-worker' for w in c.read_workers_for_work_pool('bench')))"]
        while subprocess.run(probe, env=env, capture_output=True, text=True).stdout.strip() != "True":
            if started[1].poll() is not None or time.perf_counter() - start > 300:
                raise RuntimeError(f"prefect worker failed:\n{processes.tail(logs)}")
            time.sleep(0.5)
        worker = time.perf_counter() - start
        return {"server": round(server, 2), "worker": round(worker, 2)}
    finally:
        for process in reversed(started):
            processes.stop_process_group(process.pid)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run figure 8 and return (and optionally write) its rows and details."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="same as the full run (it is short)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    base = Path(tempfile.mkdtemp(prefix="tlpipe-services-bench-"))
    os.chmod(base, 0o755)  # the cluster's unprivileged user must reach it
    details: dict[str, Any] = {"machine": machine(), "pg_bin": str(services.postgres_bin_dir())}
    try:
        log(f"PostgreSQL with {details['pg_bin']}")
        details["postgres"] = postgres_times(None, base / "pg")
        if (debian := debian_bin()) is not None:
            log(f"PostgreSQL with {debian}")
            details["postgres_debian"] = postgres_times(debian, base / "pg-debian")
        log("MLflow server on PostgreSQL, then on SQLite")
        details["mlflow_postgres"] = mlflow_times(base / "ml-pg", "postgres")
        details["mlflow_sqlite"] = mlflow_times(base / "ml-sqlite", "sqlite")
        log("Prefect server and worker")
        details["prefect"] = prefect_times(base / "prefect")
    finally:
        shutil.rmtree(base, ignore_errors=True)
    nan = float("nan")
    pg, deb = details["postgres"], details.get("postgres_debian", {})
    ml, sq, pf = details["mlflow_postgres"], details["mlflow_sqlite"], details["prefect"]
    rows = [
        row("8 PostgreSQL first start (initdb), pgserver vs Debian", pg["first"], deb.get("first", nan), "s",
            "informational", True),
        row("8 PostgreSQL restart, pgserver vs Debian", pg["restart"], deb.get("restart", nan), "s",
            "informational", True),
        row("8 MLflow server first start, PostgreSQL vs SQLite", ml["first"], sq["first"], "s", "informational", True),
        row("8 MLflow server restart, PostgreSQL vs SQLite", ml["restart"], sq["restart"], "s", "informational", True),
        row("8 Prefect server start, until healthy", pf["server"], nan, "s", "informational", True),
        row("8 Prefect process worker, until on its pool", pf["worker"], nan, "s", "informational", True),
    ]
    result = {"rows": rows, "details": details}
    if args.json:
        write_json(args.json, result)
    return result


if __name__ == "__main__":
    for line in main()["rows"]:
        print(line)
