"""Processes tlpipe starts never outlive what they belong to (issue 20, items 4, 7, 8).

* ``tlpipe repro`` stopped mid-run (SIGINT, SIGTERM, SIGKILL) leaves no ``dvc`` or stage process behind,
  and its pipeline lock is free afterwards; stopped by a signal it can catch, it stops them before it exits.
* ``tlpipe ui`` stopped with SIGTERM takes its MLflow server (and the server's workers) with it.
* The project's Prefect server stops when its project folder is deleted, and after an idle period.

Real processes throughout: a real ``tlpipe repro`` (the CLI) driving a real ``dvc repro`` whose one stage
writes a marker file and then blocks (the deterministic kill point), a real ``mlflow server``, a real
``prefect server start``. Waits are for conditions, with generous timeouts, never wall-clock upper bounds.
"""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterable
from pathlib import Path

import psutil
import pytest

from tests.conftest import REPO, copy_project_files, make_project, make_source
from tlpipe.ops.lock import LockHeldError, file_lock, pipeline_lock_path

pytestmark = pytest.mark.slow

WAIT_S = 300.0
"""Generous limit for a condition that should come true (a slow, loaded machine), never a performance bound."""

BLOCKING_PIPELINE = """\
stages:
  block:  # starts a worker, says it is inside its work (started.txt), then waits for the worker
    cmd: sleep 600 & echo started > started.txt && wait
"""


def wait_for(condition: Callable[[], object], what: str, timeout: float = WAIT_S,
             process: subprocess.Popen | None = None) -> object:
    """Poll ``condition`` until it is truthy; fail naming ``what`` after ``timeout`` or when ``process`` exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := condition():
            return value
        if process is not None and process.poll() is not None:
            pytest.fail(f"{what}: the process exited first (code {process.returncode}):\n"
                        f"{read_output(process)[-4000:]}")
        time.sleep(0.1)
    pytest.fail(f"{what}: not within {timeout:.0f} s")


def read_output(process: subprocess.Popen) -> str:
    """What a finished process started with ``stdout=PIPE, stderr=STDOUT`` printed."""
    return process.stdout.read() if process.stdout and process.poll() is not None else ""


def alive(processes: Iterable[psutil.Process]) -> list[str]:
    """The processes still running (zombies count as gone: this machine's init may not reap orphans)."""
    left = []
    for process in processes:
        try:
            if process.is_running() and process.status() != psutil.STATUS_ZOMBIE:
                left.append(f"{process.pid} {' '.join(process.cmdline())[:120]}")
        except psutil.NoSuchProcess:
            continue
    return left


def of_project(project: Path) -> list[psutil.Process]:
    """Every process started for ``project``: tlpipe exports ``TLPIPE_ROOT`` to all it starts (workers
    a server forks after a snapshot of its children was taken included)."""
    found = []
    for process in psutil.process_iter():
        try:
            if process.environ().get("TLPIPE_ROOT") == str(project):
                found.append(process)
        except psutil.Error:
            continue
    return found


def kill_all(processes: Iterable[psutil.Process]) -> None:
    """Leave nothing behind, whatever the verdict."""
    for process in processes:
        try:
            process.kill()
        except psutil.Error:
            pass


def lock_is_free(project: Path) -> bool:
    """Whether the project's pipeline lock can be taken now."""
    try:
        with file_lock(pipeline_lock_path(project), "a test", wait_s=0):
            return True
    except LockHeldError:
        return False


@pytest.fixture
def blocking_project(tmp_path) -> Path:
    """A project whose pipeline is one stage that blocks (:data:`BLOCKING_PIPELINE`), committed.

    One per test: a SIGKILLed ``dvc`` may stay a zombie here (this machine's init does not reap orphans),
    and DVC then takes its stale pid in ``.dvc/tmp/rwlock`` for a live one.
    """
    project = make_project(tmp_path / "project", make_source(tmp_path / "source", per_class=2))
    (project / "dvc.yaml").write_text(BLOCKING_PIPELINE)
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qam", "blocking pipeline"],
                   cwd=project, check=True)
    return project


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL], ids=lambda s: s.name)
def test_repro_stopped_mid_run_leaves_no_dvc_or_stage_process_and_frees_the_lock(
        blocking_project, prefect_server, project_env, sig):
    project = blocking_project
    marker = project / "started.txt"
    env = {**project_env, "PREFECT_API_URL": prefect_server}
    parent = subprocess.Popen([sys.executable, "-m", "flows.cli", "repro"], cwd=project, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    children: list[psutil.Process] = []
    try:
        wait_for(marker.exists, "the stage never started", process=parent)
        children = psutil.Process(parent.pid).children(recursive=True)
        children += [p for p in of_project(project) if p.pid != parent.pid and p not in children]
        names = " ".join(" ".join(p.cmdline()) for p in children)
        assert "-m dvc " in names and "sleep 600" in names, names
        assert not lock_is_free(project)  # the run holds it

        parent.send_signal(sig)
        parent.wait(timeout=WAIT_S)
        if sig != signal.SIGKILL:  # it could run its finally: dvc and the stage were stopped before it exited
            assert parent.returncode != 0
            assert alive(children) == [], read_output(parent)[-3000:]
        wait_for(lambda: not alive(children), f"dvc and stage processes gone after {sig.name}")
        assert alive(of_project(project)) == []
        assert lock_is_free(project)
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
        kill_all([*children, *of_project(project)])


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def port_is_free(port: int) -> bool:
    """Whether a server could listen on ``port`` now (with SO_REUSEADDR, as servers bind)."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status == 200
    except OSError:
        return False


def test_ui_stopped_with_sigterm_stops_its_mlflow_server_and_workers(tmp_path, project_env):
    project = tmp_path / "uiproj"
    project.mkdir()
    for name in ("params.yaml", "dvc.yaml"):
        shutil.copy2(REPO / name, project / name)
    port = free_port()
    ui = subprocess.Popen([sys.executable, "-m", "flows.cli", "ui", "--port", str(port), "--root", str(project)],
                          cwd=REPO, env=project_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    children: list[psutil.Process] = []
    try:
        wait_for(lambda: answers(f"http://127.0.0.1:{port}/health"), "the MLflow UI never answered", process=ui)
        children = psutil.Process(ui.pid).children(recursive=True)
        assert any("mlflow" in " ".join(p.cmdline()) for p in children)

        ui.send_signal(signal.SIGTERM)
        ui.wait(timeout=WAIT_S)
        assert alive([*children, *of_project(project)]) == [], read_output(ui)[-3000:]
        assert port_is_free(port)
    finally:
        if ui.poll() is None:
            ui.kill()
            ui.wait()
        kill_all([*children, *of_project(project)])


ENSURE = "import sys; from tlpipe.ops.prefect_server import ensure_server; print(ensure_server(sys.argv[1]))"


def start_project_server(project: Path, env: dict) -> psutil.Process:
    """Start the project's Prefect server as a stage would (in the project, running its copy of the code);
    return its process."""
    copy_project_files(REPO, project)
    done = subprocess.run([sys.executable, "-c", ENSURE, str(project)], env=env, cwd=project, capture_output=True,
                          text=True, timeout=WAIT_S + 60)
    assert done.returncode == 0, done.stderr[-3000:]
    info = json.loads((project / ".prefect" / "server.json").read_text())
    return psutil.Process(info["pid"])


@pytest.fixture
def server_env(project_env) -> dict:
    """A plain user's environment for the project's server: any free port, the watchdog checking every second."""
    env = {key: value for key, value in project_env.items() if key != "PREFECT_API_URL"}
    env.update({"TLPIPE_PREFECT_SERVER": "auto", "TLPIPE_PREFECT_PORT": "0", "TLPIPE_PREFECT_CHECK_SECONDS": "1"})
    return env


def test_prefect_server_stops_when_its_project_folder_is_deleted(tmp_path, server_env):
    project = tmp_path / "goneproj"
    project.mkdir()
    server = start_project_server(project, server_env)
    group = [server, *server.children(recursive=True)]
    try:
        assert alive(group)
        from tlpipe.ops.prefect_watchdog import lifetime_note

        wait_for((project / ".prefect" / "watchdog.json").exists, "the watchdog never started")
        said = lifetime_note(project)  # what `tlpipe repro` (make run) ends with
        port = json.loads((project / ".prefect" / "server.json").read_text())["port"]
        assert said and f"http://127.0.0.1:{port} until it has been idle for 30 min" in said, said
        assert "make prefect-stop" in said
        shutil.rmtree(project)
        wait_for(lambda: not alive(group), "the server of a deleted project still runs")
    finally:
        kill_all(group)


def test_prefect_server_stops_after_its_idle_period(tmp_path, server_env):
    project = tmp_path / "idleproj"
    project.mkdir()
    server = start_project_server(project, {**server_env, "TLPIPE_PREFECT_IDLE_MINUTES": "0.05"})  # 3 s
    group = [server, *server.children(recursive=True)]
    try:
        wait_for(lambda: not alive(group), "the idle server still runs")
        from tlpipe.ops.prefect_server import running_url

        assert running_url(project) is None
        assert project.is_dir()  # stopped for idleness, not because the folder went
    finally:
        kill_all(group)
