"""One pipeline execution as Prefect shows it, and two at once in one project.

A real ``tlpipe repro`` (the CLI, as a user runs it) on a tiny project against the session's Prefect
test server: while it runs, a second ``tlpipe repro`` in the same project stops at once with one line
naming the first; the first finishes unharmed. Then, through the Prefect API: the stage flow runs of that
execution are found by its ``pipeline:<flow run id>`` tag, and the pipeline run carries the comparison
table, the promotion decision and the MLflow run links as artifacts.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import make_project
from tlpipe.core.names import MODEL_NAMES
from tlpipe.core.params import load_params
from tlpipe.ops.lock import pipeline_lock_path
from tlpipe.tracking.connection import experiment_name

STAGES = {"select", "ingest", "features", "svm", "finetune", "evaluate"}


def wait_for_lock_holder(project, process: subprocess.Popen, timeout: float = 600) -> dict:
    """The holder note of the pipeline lock, once the pipeline holds it."""
    path = pipeline_lock_path(project)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()[1][-3000:]
        text = path.read_text() if path.exists() else ""
        if text:
            return json.loads(text)
        time.sleep(0.5)
    raise TimeoutError("the pipeline never took its lock")


@pytest.mark.slow
def test_pipeline_runs_once_per_project_links_its_stage_runs_and_publishes_artifacts(
        tmp_path, tiny_source, prefect_server, project_env):
    from mlflow import MlflowClient
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        FlowFilter,
        FlowFilterName,
        FlowRunFilter,
        FlowRunFilterTags,
    )

    project = make_project(tmp_path / "linkproj", tiny_source,
                           {"finetune": {"epochs": 1}, "svm": {"c_grid": {"num": 2}}})  # as small as it gets
    env = {**project_env, "PREFECT_API_URL": prefect_server}
    command = [sys.executable, "-m", "flows.cli", "repro"]
    first = subprocess.Popen(command, cwd=project, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    try:
        holder = wait_for_lock_holder(project, first)
        assert holder["pid"] == first.pid

        start = time.monotonic()
        second = subprocess.run(command, cwd=project, env=env, capture_output=True, text=True, timeout=300)
        assert time.monotonic() - start < 120
        assert second.returncode == 1
        assert "Traceback" not in second.stderr
        errors = [line for line in second.stderr.splitlines() if ": error: " in line]
        assert len(errors) == 1, second.stderr
        assert errors[0].startswith(f"python -m flows.cli repro: error: a tlpipe pipeline run in {project} is "
                                    f"already running: pid {first.pid} since "), errors[0]

        out, err = first.communicate(timeout=1800)
    finally:
        if first.poll() is None:
            first.kill()
            first.communicate()
    assert first.returncode == 0, err[-4000:]
    start = out.index('{\n  "stages_ran"')  # the CLI's summary, after DVC's streamed output
    summary = json.loads(out[start:out.index("\n}", start) + 2])
    assert summary["stages_ran"] == ["select", "ingest", "features", "svm", "finetune", "evaluate"]

    with get_client(sync_client=True) as client:
        pipelines = client.read_flow_runs(
            flow_filter=FlowFilter(name=FlowFilterName(any_=["pipeline"])),
            flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=["project:linkproj"])))
        completed = [run for run in pipelines if run.state.is_completed()]
        assert len(completed) == 1 and len(pipelines) == 2  # the second attempt failed on the lock
        pipeline = completed[0]
        link = f"pipeline:{pipeline.id}"
        assert {"tlpipe", "project:linkproj", link} <= set(pipeline.tags)

        linked = client.read_flow_runs(flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=[link])))
        flows = {client.read_flow(run.flow_id).name: run for run in linked}
        assert set(flows) == STAGES | {"pipeline"}
        for name in STAGES:
            assert flows[name].state.is_completed()
            assert {"tlpipe", "project:linkproj", link} <= set(flows[name].tags)

        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[pipeline.id])))
    by_key = {artifact.key: artifact for artifact in artifacts}
    assert {"linkproj-pipeline-model-comparison", "linkproj-pipeline-promotion",
            "linkproj-pipeline-mlflow-runs"} <= set(by_key)

    table = by_key["linkproj-pipeline-model-comparison"]
    assert table.type == "table"
    rows = json.loads(table.data) if isinstance(table.data, str) else table.data
    metrics = json.loads((project / "metrics" / "evaluate.json").read_text())
    assert {row["model"] for row in rows} == set(metrics) == set(MODEL_NAMES) and len(rows) == len(MODEL_NAMES)
    for row in rows:
        recorded = metrics[row["model"]]
        assert row["test_accuracy"] == pytest.approx(recorded.get("acc", recorded.get("accuracy")), abs=1e-4)
        assert "/#/experiments/" in row["mlflow_run"]

    promotion = json.loads((project / "reports" / "evaluate" / "promotion.json").read_text())
    decision = by_key["linkproj-pipeline-promotion"].data
    assert ("**promoted**" if promotion["promoted"] else "**not promoted**") in decision
    assert promotion["reason"] in decision

    client = MlflowClient(f"sqlite:///{project}/mlflow.db")
    task = experiment_name(project)  # each data set is its own task: its experiment, its run names
    experiment = client.get_experiment_by_name(task)
    [mlflow_pipeline] = client.search_runs([experiment.experiment_id], "tags.`tlpipe.kind` = 'pipeline'")
    assert mlflow_pipeline.info.run_name == f"{task} pipeline" and mlflow_pipeline.data.tags["tlpipe.task"] == task
    source = Path(load_params(project / "params.yaml").data.source).name
    assert {item.dataset.name for item in mlflow_pipeline.inputs.dataset_inputs} == {  # the Dataset column
        f"{source}-{split}" for split in ("train", "val", "test")}
    links = by_key["linkproj-pipeline-mlflow-runs"].data
    assert f"/runs/{mlflow_pipeline.info.run_id}?workflowType=machine_learning)" in links
    assert all(f"- stage {stage}: [" in links for stage in STAGES)


@pytest.mark.slow
def test_repro_on_another_source_runs_in_that_sources_task(tmp_path, tiny_source, prefect_server, project_env):
    """Issue 19: after a run on one source, `tlpipe repro -S data.source=<other>` opens its pipeline run in the
    other source's task (its own experiment, a run named after it), which becomes the project's current task."""
    from mlflow import MlflowClient

    from flows.pipeline import pipeline_flow
    from tests.conftest import make_source, use_listing_pipeline

    project = use_listing_pipeline(make_project(tmp_path / "project", tiny_source))
    insects = make_source(tmp_path / "insects", per_class=3)
    first = pipeline_flow(root=str(project))
    refs = ["git", "for-each-ref", "refs/exps"]
    assert subprocess.run(refs, cwd=project, capture_output=True, text=True).stdout == ""  # dvc repro, no experiment
    second = pipeline_flow(root=str(project), overrides=[f"data.source={insects}"])
    client = MlflowClient(f"sqlite:///{project}/mlflow.db")
    for result, task in ((first, "source-bright-dark"), (second, "insects-bright-dark")):
        run = client.get_run(result["mlflow_run_id"])
        assert client.get_experiment(run.info.experiment_id).name == task
        assert run.info.run_name == f"{task} pipeline" and run.data.tags["tlpipe.task"] == task
    assert experiment_name(project) == "insects-bright-dark"  # DVC left the override in params.yaml


def test_no_prefect_url_for_the_stages_is_a_logged_fallback(caplog) -> None:
    """When the flow cannot tell its own Prefect server, the stages pick theirs: said in a warning, not silently."""
    import logging

    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_ALLOW_EPHEMERAL_MODE, temporary_settings

    from tasks.pipeline import current_prefect_api_url

    logger = logging.getLogger("tlpipe")  # Prefect's logging setup may stop it propagating to caplog's root handler
    logger.addHandler(caplog.handler)
    # no URL and no ephemeral server: Prefect's client cannot be opened
    try:
        with temporary_settings(updates={PREFECT_SERVER_ALLOW_EPHEMERAL_MODE: False},
                                restore_defaults={PREFECT_API_URL}), caplog.at_level("WARNING", logger="tlpipe"):
            assert current_prefect_api_url() is None
    finally:
        logger.removeHandler(caplog.handler)
    warnings = [record.getMessage() for record in caplog.records if record.levelname == "WARNING"]
    warnings = list(dict.fromkeys(warnings))  # one record may reach caplog twice (its handler and the root)
    assert len(warnings) == 1 and "Prefect API URL" in warnings[0] and "No Prefect API URL provided" in warnings[0]
    assert "stages" in warnings[0]
