"""Prefect work pool and process worker: a real `prefect server start`, `tlpipe deploy --work-pool`, a real
`prefect worker start` process, a run triggered through the API and executed by the worker.

Everything the test starts (server, worker) runs in its own process group and is stopped in ``finally``.
The run is made cheap: the project runs a one-stage listing pipeline on the same source, already reproduced,
so ``retrain`` hears from ``dvc status`` that everything is up to date and returns without rerunning it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import make_project
from tests.scale.helpers import run
from tlpipe.ops.processes import free_port, healthy, stop_process_group, tail

POOL = "tlpipe-test-pool"


def start_process(command: list[str], env: dict, log: Path, cwd: Path) -> subprocess.Popen:
    """Start ``command`` in its own process group with its output in ``log``."""
    with open(log, "ab") as handle:
        return subprocess.Popen(command, env=env, cwd=cwd, stdout=handle, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)


def wait_healthy(url: str, process: subprocess.Popen, log: Path, timeout_s: float = 240) -> float:
    """Seconds until ``url`` answers; fail with the log tail when the process dies or time runs out."""
    start = time.perf_counter()
    while time.perf_counter() - start < timeout_s:
        assert process.poll() is None, f"exited {process.returncode}:\n{tail(log, 40)}"
        if healthy(url):
            return time.perf_counter() - start
        time.sleep(0.5)
    raise AssertionError(f"{url} not healthy after {timeout_s} s:\n{tail(log, 40)}")


@pytest.fixture
def prefect_env(tmp_path):
    """A real `prefect server start` on a free port with its own PREFECT_HOME; yields the env to reach it."""
    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update({"PREFECT_HOME": str(tmp_path / "prefect-home"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                "PREFECT_API_URL": url, "DO_NOT_TRACK": "1",
                "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"})
    log = tmp_path / "prefect-server.log"
    server = start_process([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                            "--port", str(port)], env, log, tmp_path)
    try:
        seconds = wait_healthy(f"{url}/health", server, log)
        yield {"env": env, "url": url, "server_seconds": seconds}
    finally:
        stop_process_group(server.pid)


@pytest.mark.slow
def test_worker_runs_the_deployment_from_a_work_pool(tmp_path, tiny_source, prefect_env):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    # Prefect reads its settings once per process: point this process at the test's server explicitly
    with temporary_settings(updates={PREFECT_API_URL: prefect_env["url"]}):
        deploy_and_run_on_a_worker(tmp_path, tiny_source, prefect_env)


def deploy_and_run_on_a_worker(tmp_path: Path, tiny_source: Path, prefect_env: dict) -> None:
    """Deploy to the pool, start a worker, trigger a run through the API, check who ran it and how."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, LogFilter, LogFilterFlowRunId
    from prefect.deployments import run_deployment

    from tests.conftest import use_listing_pipeline

    env, url = prefect_env["env"], prefect_env["url"]
    project = use_listing_pipeline(make_project(tmp_path / "project", tiny_source))
    run([sys.executable, "-m", "dvc", "repro"], project, env)  # DVC up to date: retrain has nothing to rerun

    output = run([sys.executable, "-m", "flows.cli", "deploy", "--work-pool", POOL, "--api-url", url,
                  "--root", str(project)], project, env)
    assert f"on work pool '{POOL}'" in output
    with get_client(sync_client=True) as client:
        assert str(client.api_url).rstrip("/") == url
        pool = client.read_work_pool(POOL)
        assert pool.type == "process"
        deployment = client.read_deployment_by_name("retrain/tlpipe-retrain")
        assert deployment.work_pool_name == POOL
        assert deployment.entrypoint == "flows/retrain.py:retrain_flow"
        assert deployment.parameters == {"root": str(project.resolve())}
        assert deployment.pull_steps == [{"prefect.deployments.steps.set_working_directory": {
            "directory": str(project.resolve())}}]

    log = tmp_path / "worker.log"
    start = time.perf_counter()
    worker = start_process([sys.executable, "-m", "flows.cli", "worker", "--pool", POOL, "--name", "w1",
                            "--api-url", url, "--root", str(project)], env, log, project)
    try:
        worker_seconds = None
        with get_client(sync_client=True) as client:
            while time.perf_counter() - start < 180:  # the worker registers itself on the pool
                assert worker.poll() is None, tail(log, 40)
                if any(w.name == "w1" for w in client.read_workers_for_work_pool(POOL)):
                    worker_seconds = time.perf_counter() - start
                    break
                time.sleep(0.5)
        assert worker_seconds is not None, tail(log, 40)
        flow_run = run_deployment("retrain/tlpipe-retrain", timeout=300, poll_interval=1)
        assert flow_run.state.is_completed(), f"{flow_run.state}\n{tail(log, 60)}"
        with get_client(sync_client=True) as client:
            deadline, messages = time.monotonic() + 60, ""
            while "up to date" not in messages and time.monotonic() < deadline:  # logs arrive in batches
                logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run.id])))
                messages = "\n".join(entry.message for entry in logs)
                time.sleep(0.5)
            assert "up to date" in messages, messages
            done = client.read_flow_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run.id])))
            assert done[0].work_pool_name == POOL
        assert not (project / "data").exists()  # nothing was rebuilt
        print(f"prefect server healthy after {prefect_env['server_seconds']:.1f} s, worker polling after "
              f"{worker_seconds:.1f} s")
    finally:
        stop_process_group(worker.pid)
    import psutil

    # the leader is gone; what it started got the same SIGTERM and may take a moment to exit, not longer
    left = []
    for pid in group_members(worker.pid):
        try:
            left.append(psutil.Process(pid))
        except psutil.NoSuchProcess:
            continue
    _, alive = psutil.wait_procs(left, timeout=30)
    assert not alive, f"the worker or a flow run it started outlived its stop: {alive}"


def group_members(pgid: int) -> list[int]:
    """Live processes (zombies aside) of process group ``pgid``: the worker leads its own group."""
    import psutil

    members = []
    for process in psutil.process_iter(["status"]):
        try:
            if os.getpgid(process.pid) == pgid and process.info["status"] != psutil.STATUS_ZOMBIE:
                members.append(process.pid)
        except (ProcessLookupError, PermissionError):
            continue
    return members
