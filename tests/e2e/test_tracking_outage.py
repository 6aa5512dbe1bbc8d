"""A tracking server that dies while a stage logs to it (issue 20, item 14): the svm, finetune and evaluate
stages each log to a real ``mlflow server`` that is killed while the stage's run is open. The stage fails with
one line naming the server and no traceback, its published outputs stay unrecorded by DVC, and once the server
is back a rerun of that stage alone logs each of its runs (and, for evaluate, the model version) exactly once.

Each case changes one param of its stage in a copy of the shared tiny pipeline's project (``baseline_copy``),
so only that stage has to run. The moment is deterministic: the stage waits at its pause point
(:mod:`tlpipe.ops.pause`) until the server is dead.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import deep_update, stage_env
from tests.e2e.test_faults import repro, stage_run_running, stages_ran, stop_tree, wait_for_pause
from tlpipe.ops.pause import PAUSE_AT_ENV, PAUSE_DIR_ENV

pytestmark = pytest.mark.slow

OUTAGES = {
    # stage: (the param changed so DVC reruns it, where it waits while the server is killed, the models it logs)
    "svm": ({"svm": {"c_grid": {"num": 2}}}, "svm.logging", {"svm_features", "svm_concat", "svm_pixels"}),
    "finetune": ({"finetune": {"epochs": 1}}, "finetune.training", {"frozen", "concat", "finetuned"}),
    "evaluate": ({"evaluate": {"grid_images": 2}}, "evaluate.logging", set()),
}
"""Each stage that logs: what makes it run, its pause point (its stage run open, nothing of it logged yet)."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_mlflow_server(folder: Path, port: int) -> subprocess.Popen:
    """``mlflow server`` on a SQLite store in ``folder`` (one worker); returns once it answers."""
    import urllib.request

    mlflow_bin = Path(sys.executable).parent / "mlflow"
    server = subprocess.Popen(
        [str(mlflow_bin), "server", "--backend-store-uri", f"sqlite:///{folder}/mlflow.db",
         "--artifacts-destination", str(folder / "mlartifacts"), "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"],
        cwd=folder, env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},  # as tlpipe's servers
        stdout=open(folder / f"server-{port}.log", "a"),  # noqa: SIM115 (the server keeps it)
        stderr=subprocess.STDOUT,
        start_new_session=True)  # its own process group: stopping it stops its workers too
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"mlflow server exited: {(folder / f'server-{port}.log').read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
                if response.status == 200:
                    return server
        except OSError:
            time.sleep(0.5)
    stop_server(server)
    pytest.fail("mlflow server did not become healthy in 180 s")


def stop_server(server: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    """Stop a server started by :func:`start_mlflow_server` and every process of its group."""
    try:
        os.killpg(server.pid, sig)
    except ProcessLookupError:
        pass
    server.wait(timeout=60)


@pytest.mark.parametrize("stage", OUTAGES)
def test_tracking_server_dying_mid_stage_fails_clearly_and_rerun_logs_once(stage, baseline_copy, prefect_server,
                                                                            tmp_path) -> None:
    """``stage`` logs to an ``mlflow server`` that is killed while the stage runs: the stage fails with one line
    naming the server; once the server is back, a rerun logs each run (and the model version) once."""
    change, point, models = OUTAGES[stage]
    project = baseline_copy
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    # MLflow's own retry knobs, small so the dead server is given up on in seconds (users keep theirs)
    env = {**stage_env(prefect_server), "MLFLOW_TRACKING_URI": uri, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
           "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
    params = project / "params.yaml"
    params.write_text(yaml.safe_dump(deep_update(yaml.safe_load(params.read_text()), change), sort_keys=False))
    server_folder = tmp_path / "server"
    server_folder.mkdir()
    server = start_mlflow_server(server_folder, port)
    db = server_folder / "mlflow.db"
    try:
        log = tmp_path / "repro-dying-server.log"
        pauses = tmp_path / "pauses"
        pauses.mkdir()
        with open(log, "w") as sink:
            dvc = subprocess.Popen([sys.executable, "-m", "dvc", "repro", stage], cwd=project, stdout=sink,
                                   stderr=subprocess.STDOUT, text=True,
                                   env={**env, PAUSE_AT_ENV: point, PAUSE_DIR_ENV: str(pauses)})
        try:
            marker = wait_for_pause(pauses, point, dvc, log)
            assert stage_run_running(db, stage), log.read_text()[-3000:]
            stop_server(server)
            marker.unlink()  # the stage goes on, against a dead server
            returncode = dvc.wait(timeout=600)
        finally:
            stop_tree(dvc)
        output = log.read_text()
        assert stages_ran(output) == [stage], output[-3000:]
        assert returncode != 0, output[-3000:]
        errors = [line for line in output.splitlines() if "error" in line.lower() and uri in line]
        assert errors, f"no error line names {uri}:\n{output[-4000:]}"
        assert "Traceback" not in output, output[-4000:]

        server = start_mlflow_server(server_folder, port)
        rerun = repro(project, env, stage)
        assert rerun.returncode == 0, (rerun.stdout + rerun.stderr)[-6000:]
        assert stages_ran(rerun.stdout + rerun.stderr) == [stage]

        from mlflow import MlflowClient

        from tlpipe.core.task import load_task

        client = MlflowClient(uri)
        task = load_task(project)
        experiment = client.get_experiment_by_name(task.name)
        runs = client.search_runs([experiment.experiment_id], max_results=1000)
        assert not [r.info.run_id for r in runs if r.info.status == "RUNNING"]
        finished = [r for r in runs if r.info.status == "FINISHED"]
        stage_runs = [r for r in finished if r.data.tags.get("tlpipe.kind") == "stage"]
        assert [r.data.tags.get("tlpipe.stage") for r in stage_runs] == [stage]
        keys = [(r.data.tags.get("tlpipe.kind"), r.data.tags.get("tlpipe.model")) for r in finished]
        assert len(keys) == len(set(keys)), f"a run was logged twice: {sorted(map(str, keys))}"
        logged = {r.data.tags.get("tlpipe.model") for r in finished if r.data.tags.get("tlpipe.kind") == "model"}
        assert logged >= models, logged
        versions = client.search_model_versions(f"name = '{task.model_name}'")
        assert len(versions) == (1 if stage == "evaluate" else 0), [(v.version, v.run_id) for v in versions]
    finally:
        stop_server(server)
