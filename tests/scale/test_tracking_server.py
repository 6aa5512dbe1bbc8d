"""Shared tracking: the tiny pipeline's stages against a real PostgreSQL + MLflow server (artifacts proxied).

The services are started with :mod:`tlpipe.ops.services` (what ``make tracking-server`` runs), stages run
through ``dvc repro`` with ``MLFLOW_TRACKING_URI=http://127.0.0.1:<port>``, and everything is read back
through the server: stage and model runs, artifacts, registered versions and the champion alias. The MLflow
server is restarted between two ``dvc repro`` calls; nothing logged before is lost.

The project is a copy of the shared tiny pipeline's (``baseline_copy``): ingest, svm and evaluate are forced
to run again against the server (ingest, the first stage to log; svm, which logs models; evaluate, which
logs the candidate's pyfunc when no run of this store trained it, registers and gates it). Features and
finetune log the same way through the same helpers and are not run a second time here.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

from tests.e2e.test_faults import stages_ran as ran
from tests.scale.helpers import run
from tlpipe.ops import processes, services

STAGES = ("ingest", "svm", "evaluate")
MODELS = {"svm_features", "svm_concat", "svm_pixels"}


@pytest.fixture
def tracking_services():
    """PostgreSQL + MLflow server on free ports in a state folder the cluster's user can reach; always stopped."""
    base = Path(tempfile.mkdtemp(prefix="tlpipe-tracking-"))
    os.chmod(base, 0o755)  # pytest's tmp_path is 0700: PostgreSQL runs as an unprivileged user
    state = base / "state"
    try:
        endpoints = services.start_tracking(state, processes.free_port(), processes.free_port())
        yield state, endpoints
    finally:
        services.stop_tracking(state)
        shutil.rmtree(base, ignore_errors=True)


def stage_runs(client, experiment_id: str) -> list:
    """Every run of the experiment (stage, model and pipeline runs)."""
    return client.search_runs([experiment_id], max_results=1000)


@pytest.mark.slow
def test_pipeline_on_postgres_mlflow_server(tmp_path, baseline_copy, prefect_server, project_env, tracking_services):
    from mlflow import MlflowClient

    state, endpoints = tracking_services
    assert endpoints.tracking_uri.startswith("http://127.0.0.1:")
    assert services.tracking_status(state) == {
        "postgres": True, "mlflow": True, "tracking_uri": endpoints.tracking_uri,
        "backend_store_uri": endpoints.backend_store_uri, "artifacts_destination": endpoints.artifacts_destination}
    project = baseline_copy
    local_store = {p.relative_to(project): p.stat().st_mtime_ns for p in [project / "mlflow.db",
                                                                          *(project / "mlartifacts").rglob("*")]}
    env = {**project_env, "PREFECT_API_URL": prefect_server, "MLFLOW_TRACKING_URI": endpoints.tracking_uri}
    dvc = [sys.executable, "-m", "dvc", "repro"]

    output = run([*dvc, "-f", "-s", "ingest"], project, env)
    assert ran(output) == ["ingest"], output[-3000:]
    from tlpipe.core.task import load_task

    task = load_task(project)  # each data set is its own task: its experiment and registered model
    client = MlflowClient(endpoints.tracking_uri)
    experiment = client.get_experiment_by_name(task.name)
    assert experiment.artifact_location.startswith("mlflow-artifacts:")  # proxied by the server
    before = {r.info.run_id: (r.info.status, r.data.metrics) for r in stage_runs(client, experiment.experiment_id)}
    assert [r.data.tags.get("tlpipe.stage") for r in stage_runs(client, experiment.experiment_id)
            if r.data.tags.get("tlpipe.kind") == "stage"] == ["ingest"]

    restarted = services.restart_mlflow(state)  # between two stages: a new server process, same store
    assert restarted.mlflow_pid != endpoints.mlflow_pid and restarted.tracking_uri == endpoints.tracking_uri
    after_restart = {r.info.run_id: (r.info.status, r.data.metrics) for r in stage_runs(client, experiment.experiment_id)}
    assert after_restart == before

    output = run([*dvc, "-f", "-s", "svm", "evaluate"], project, env)
    assert ran(output) == ["svm", "evaluate"], output[-3000:]

    runs = stage_runs(client, experiment.experiment_id)
    by_id = {r.info.run_id: r for r in runs}
    assert set(before) <= set(by_id)  # nothing logged before the restart is lost
    assert all(by_id[run_id].data.metrics == metrics for run_id, (_, metrics) in before.items())
    stages = [r for r in runs if r.data.tags.get("tlpipe.kind") == "stage"]
    assert sorted(r.data.tags["tlpipe.stage"] for r in stages) == sorted(STAGES)
    assert all(r.info.status == "FINISHED" for r in runs)
    models = {r.data.tags.get("tlpipe.model") for r in runs if r.data.tags.get("tlpipe.kind") == "model"}
    assert models >= MODELS
    ingest_run = next(r for r in stages if r.data.tags["tlpipe.stage"] == "ingest")
    assert ingest_run.data.metrics["images_kept"] == 24
    assert [a.path for a in client.list_artifacts(ingest_run.info.run_id)] == ["ingest"]

    # registry and champion through the server, as the evaluate stage recorded them
    promotion = json.loads((project / "reports" / "evaluate" / "promotion.json").read_text())
    assert promotion["promoted"] is True
    champion = client.get_model_version_by_alias(task.model_name, "champion")
    assert str(champion.version) == str(promotion["version"])
    versions = client.search_model_versions(f"name = '{task.model_name}'")
    assert {str(v.version) for v in versions} >= {str(champion.version)}

    # artifacts went through the server into its destination, not into the project
    stored = [p for p in (state / "mlflow-artifacts").rglob("*") if p.is_file()]
    assert any(p.name == "data_report.json" for p in stored) and any(p.name == "MLmodel" for p in stored)
    assert {p.relative_to(project): p.stat().st_mtime_ns for p in [project / "mlflow.db",
                                                                   *(project / "mlartifacts").rglob("*")]} == local_store
    import mlflow

    mlflow.set_tracking_uri(endpoints.tracking_uri)
    local = Path(mlflow.artifacts.download_artifacts(f"models:/{task.model_name}@champion/MLmodel",
                                                      dst_path=str(tmp_path / "download")))
    assert "python_function" in local.read_text()

    # the gate on the server: evaluate again; the same models cannot beat the champion they produced
    assert ran(run([*dvc, "-f", "-s", "evaluate"], project, env)) == ["evaluate"]
    second = json.loads((project / "reports" / "evaluate" / "promotion.json").read_text())
    assert second["promoted"] is False and second["reason"]
    assert str(client.get_model_version_by_alias(task.model_name, "champion").version) == str(champion.version)


@pytest.mark.slow
def test_a_refused_start_stops_only_the_postgres_it_started():
    """MLflow refuses to start (its port is taken, as by a live server): a second ``make tracking-server``
    must leave the running PostgreSQL alone; a start that brought PostgreSQL up itself takes it down."""
    import socket

    base = Path(tempfile.mkdtemp(prefix="tlpipe-tracking-"))
    os.chmod(base, 0o755)  # PostgreSQL runs as an unprivileged user
    state, pg_port = services.StateDir(base / "state"), processes.free_port()
    try:
        with socket.socket() as taken:
            taken.bind((processes.HOST, 0))
            taken.listen()
            mlflow_port = taken.getsockname()[1]
            with pytest.raises(services.ServiceError, match=f"port {mlflow_port} .* is taken"):
                services.start_tracking(state.root, pg_port, mlflow_port)
            assert not services.postgres_running(state)  # this call started it, so it stopped it
            services.start_postgres(state, pg_port)  # the PostgreSQL of a live tracking server
            with pytest.raises(services.ServiceError, match=f"port {mlflow_port} .* is taken"):
                services.start_tracking(state.root, pg_port, mlflow_port)
            assert services.postgres_running(state)  # not this call's: still running
    finally:
        services.stop_tracking(state.root)
        shutil.rmtree(base, ignore_errors=True)
