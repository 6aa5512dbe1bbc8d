"""Experiments as README writes them, and queued ones tracked where the user looks (issue 11, items 2 and 9).

* ``<venv>/bin/dvc exp run -S data.source=<abs> -S data.max_per_class=null`` with the venv *not* on PATH, in a
  copy of the shared tiny pipeline's project with one more changed param: the stage it reruns runs through
  ``bin/python``, which finds the interpreter running that ``dvc``.
* ``dvc exp run --queue`` of two variants, then ``dvc queue start -j 2``: DVC runs them in temporary
  workspaces under ``.dvc/tmp/exps/``; every run, metric and model version lands in the project's own
  MLflow store (:func:`tlpipe.core.paths.tracking_root`), and concurrent first use of a store does not race
  (:func:`tlpipe.tracking.sqlite_store.ensure_sqlite_store`).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

VENV_BIN = Path(sys.executable).parent
VARIANTS = (3, 5)  # evaluate.grid_images: two, which `dvc queue start -j 2` runs at once; the tiny baseline uses 4
# and the README command 2, so each variant reruns evaluate only: two evaluates log, register and gate at once


def run(command: list[str], cwd: Path, env: dict, timeout: int = 1200) -> str:
    """Run ``command``; fail the test with the tail of its output when it fails."""
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"{' '.join(map(str, command))} exited {result.returncode}:\n{output[-6000:]}"
    return output


def make_workspace_tree(tmp_path: Path) -> tuple[Path, Path]:
    """A project folder and one of DVC's queued-experiment workspaces inside it."""
    project = tmp_path / "project"
    workspace = project / ".dvc" / "tmp" / "exps" / "tmpk2j4x9"
    for folder in (project, workspace):
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "dvc.yaml").write_text("stages: {}\n")
        (folder / "params.yaml").write_text("{}\n")
    return project, workspace


def test_tracking_root_maps_dvc_experiment_workspaces_to_their_project(tmp_path, monkeypatch):
    from tlpipe.core.paths import find_root, tracking_root

    project, workspace = make_workspace_tree(tmp_path)
    standalone = project / ".dvc" / "tmp" / "exps" / "standalone" / "tmpq1"  # dvc exp run --temp
    standalone.mkdir(parents=True)
    assert tracking_root(workspace) == project.resolve()
    assert tracking_root(standalone) == project.resolve()
    assert tracking_root(project) == project.resolve()
    assert tracking_root(tmp_path) == tmp_path.resolve()
    orphan = tmp_path / "elsewhere" / ".dvc" / "tmp" / "exps" / "tmpz"  # no project above: kept as is
    orphan.mkdir(parents=True)
    assert tracking_root(orphan) == orphan.resolve()

    # a stage finds its own workspace as root (DVC decides where it runs), even when TLPIPE_ROOT is set
    monkeypatch.setenv("TLPIPE_ROOT", str(project))
    assert find_root(workspace) == project.resolve()
    monkeypatch.setenv("DVC_STAGE", "svm")
    assert find_root(workspace) == workspace.resolve()


def test_tracking_uri_of_a_workspace_is_the_projects_store(tmp_path, monkeypatch):
    from tlpipe.tracking.connection import artifact_location, tracking_uri

    project, workspace = make_workspace_tree(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking_uri(workspace) == f"sqlite:///{project.resolve()}/mlflow.db"
    assert artifact_location(workspace) == (project.resolve() / "mlartifacts").as_uri()
    assert (project / "mlflow.db").is_file() and not (workspace / "mlflow.db").exists()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")
    assert tracking_uri(workspace) == "http://127.0.0.1:9"


CONCURRENT_WRITER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from tlpipe.tracking.connection import artifact_location, connect, ensure_experiment, experiment_name, tracking_uri
    root, barrier, count = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
    (barrier / str(time.time_ns())).touch()  # imports done: wait for the others, then all hit the store
    while len(list(barrier.iterdir())) < count:
        time.sleep(0.002)
    client = connect(root)
    experiment = ensure_experiment(client, root)
    for i in range(10):
        run = client.create_run(experiment)
        for step in range(5):
            client.log_metric(run.info.run_id, "m", step, step=step)
        client.set_terminated(run.info.run_id)
    print("done")
""")


@pytest.mark.slow
def test_processes_starting_together_on_a_missing_store_all_succeed(tmp_path, monkeypatch):
    """MLflow alone races creating a new SQLite store ('table ... already exists'); ours waits on a lock.
    Two writers run in the project, two in one of its experiment workspaces: all log into one store."""
    from mlflow import MlflowClient

    project, workspace = make_workspace_tree(tmp_path)
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    roots = (project, project, workspace, workspace)
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[2])
    processes = [subprocess.Popen([sys.executable, "-c", CONCURRENT_WRITER, str(root), str(barrier),
                                   str(len(roots))], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  text=True) for root in roots]
    outputs = [process.communicate(timeout=300)[0] for process in processes]
    assert all(process.returncode == 0 for process in processes), "\n".join(o[-3000:] for o in outputs)
    from tlpipe.tracking.connection import experiment_name

    client = MlflowClient(f"sqlite:///{project.resolve()}/mlflow.db")
    experiment = client.get_experiment_by_name(experiment_name(project))  # params.yaml {}: elpv-defect
    runs = client.search_runs([experiment.experiment_id], max_results=100)
    assert len(runs) == 10 * len(roots)
    assert all(len(client.get_metric_history(r.info.run_id, "m")) == 5 for r in runs)
    assert not (workspace / "mlflow.db").exists()


def queue_status(project: Path, env: dict) -> tuple[dict[str, str], str]:
    """``dvc queue status``: experiment name -> state, and the worker line."""
    output = run([sys.executable, "-m", "dvc", "queue", "status"], project, env)
    states = dict(re.findall(r"^\w{7}\s+(\S+)\s+.*?\s(Queued|Running|Success|Failed)\s*$", output, re.M))
    workers = next((line for line in output.splitlines() if line.startswith("Worker status")), "")
    return states, workers


@pytest.mark.slow
def test_readme_exp_run_without_venv_then_queued_experiments_track_into_the_project(
        baseline_copy, prefect_server, project_env):
    from mlflow import MlflowClient

    from tlpipe.core.task import load_task

    project = baseline_copy  # reproduced once (the shared tiny pipeline): only what the experiments change runs
    env = {**project_env, "PREFECT_API_URL": prefect_server}
    client = MlflowClient(f"sqlite:///{project}/mlflow.db")
    task = load_task(project)  # the variants keep the source: one task, one experiment, one registry
    experiment_id = client.get_experiment_by_name(task.name).experiment_id
    model_name = task.model_name
    per_evaluate = len(client.search_model_versions(f"name = '{model_name}'"))  # what one evaluate registers
    assert per_evaluate > 0

    # README's command, venv not activated and not on PATH (exit 127 or "No module named prefect" before),
    # with one changed param, so a stage runs (through bin/python)
    source = yaml.safe_load((project / "params.yaml").read_text())["data"]["source"]  # the shared source
    bare = {k: v for k, v in env.items() if k != "VIRTUAL_ENV"}
    bare["PATH"] = os.pathsep.join(p for p in ("/usr/local/bin", "/usr/bin", "/bin") if Path(p).is_dir())
    output = run([str(VENV_BIN / "dvc"), "exp", "run", "-S", f"data.source={source}",
                  "-S", "data.max_per_class=null", "-S", "evaluate.grid_images=2"], project, bare)
    assert re.findall(r"Running stage '([^']+)'", output) == ["evaluate"], output[-3000:]
    versions_before = len(client.search_model_versions(f"name = '{model_name}'"))
    assert versions_before == 2 * per_evaluate

    # two variants, queued, then run two at a time in DVC's temporary workspaces
    dvc = [sys.executable, "-m", "dvc"]  # `dvc queue start` spawns workers by the name `dvc`: on PATH in env
    for num in VARIANTS:
        run([*dvc, "exp", "run", "--queue", "-S", f"evaluate.grid_images={num}"], project, env)
    run([*dvc, "queue", "start", "-j", "2"], project, env)
    deadline = time.monotonic() + 1500
    try:
        while True:
            states, workers = queue_status(project, env)
            if len(states) == len(VARIANTS) and all(s in ("Success", "Failed") for s in states.values()):
                break
            assert time.monotonic() < deadline, f"queue still busy: {states} {workers}"
            time.sleep(10)
        logs = {name: run([*dvc, "queue", "logs", name], project, env) for name in states}
        assert set(states.values()) == {"Success"}, "\n".join(log[-3000:] for log in logs.values())
    finally:  # leave no worker behind: they stop once the queue drains; stop them if they don't
        for _ in range(24):
            if "0 active, 0 idle" in queue_status(project, env)[1]:
                break
            time.sleep(5)
        else:
            subprocess.run([*dvc, "queue", "stop", "--kill"], cwd=project, env=env, timeout=120)
    for _name, log in logs.items():
        assert "database is locked" not in log and "Traceback" not in log, log[-3000:]
        assert re.findall(r"Running stage '([^']+)'", log) == ["evaluate"], log[-3000:]

    # everything each experiment logged is in the project's store (their workspaces are gone)
    runs = client.search_runs([experiment_id], max_results=1000)
    evaluate_runs = [r for r in runs if r.data.tags.get("tlpipe.stage") == "evaluate"]
    assert sorted(int(r.data.params["evaluate.grid_images"]) for r in evaluate_runs) == sorted([2, 4, *VARIANTS])
    parents = {r.data.tags.get("mlflow.parentRunId") for r in evaluate_runs}
    assert len(parents) == 2 + len(VARIANTS) and None not in parents  # one pipeline run per experiment
    assert all(r.info.status == "FINISHED" for r in runs), [(r.info.run_name, r.info.status) for r in runs]
    for stage_run in evaluate_runs:  # each experiment's report, logged onto its evaluate run
        assert "evaluate" in [a.path for a in client.list_artifacts(stage_run.info.run_id)]
    assert all(r.info.artifact_uri.startswith((project / "mlartifacts").as_uri()) for r in runs)
    versions = client.search_model_versions(f"name = '{model_name}'")
    assert len(versions) == versions_before + per_evaluate * len(VARIANTS)
    assert {v.run_id for v in versions} <= {r.info.run_id for r in runs}  # each version's run is in the store
    assert sorted(p.relative_to(project).as_posix() for p in project.rglob("mlflow.db")) == ["mlflow.db"]
