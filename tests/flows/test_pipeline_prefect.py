"""One pipeline execution as Prefect shows it, and two at once in one project.

The session's shared ``tlpipe repro`` (the CLI, as a user runs it; ``pipeline_baseline`` in tests/conftest.py)
of a tiny project against the session's Prefect test server: while it runs, a second ``tlpipe repro`` in the
same project stops at once with one line naming the first; the first finishes unharmed. Then, through the Prefect API: the stage flow runs of that
execution are found by its ``pipeline:<flow run id>`` tag, and the pipeline run carries the comparison
table, the promotion decision and the MLflow run links as artifacts.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import make_project
from tlpipe.core.names import MODEL_NAMES
from tlpipe.core.params import load_params
from tlpipe.tracking.connection import experiment_name

STAGES = {"select", "ingest", "features", "svm", "finetune", "evaluate"}


@pytest.mark.slow
def test_pipeline_runs_once_per_project_links_its_stage_runs_and_publishes_artifacts(pipeline_baseline,
                                                                                      prefect_server):
    """The session's shared ``tlpipe repro`` (tests/conftest.py), and the second one started while it ran."""
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

    project, name = pipeline_baseline.project, pipeline_baseline.project.name
    second = pipeline_baseline.second
    assert pipeline_baseline.first_ran_on, "the first run ended first: the second may have waited for the lock"
    assert second.returncode == 1
    assert "Traceback" not in second.stderr
    errors = [line for line in second.stderr.splitlines() if ": error: " in line]
    assert len(errors) == 1, second.stderr
    assert errors[0].startswith(f"python -m flows.cli repro: error: a tlpipe pipeline run in {project} is "
                                f"already running: pid {pipeline_baseline.pid} since "), errors[0]

    out = pipeline_baseline.output
    start = out.index('{\n  "stages_ran"')  # the CLI's summary, after DVC's streamed output
    summary = json.loads(out[start:out.index("\n}", start) + 2])
    assert summary["stages_ran"] == ["select", "ingest", "features", "svm", "finetune", "evaluate"]

    with get_client(sync_client=True) as client:
        pipelines = client.read_flow_runs(
            flow_filter=FlowFilter(name=FlowFilterName(any_=["pipeline"])),
            flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=[f"project:{name}"])))
        completed = [run for run in pipelines if run.state.is_completed()]
        assert len(completed) == 1 and len(pipelines) == 2  # the second attempt failed on the lock
        pipeline = completed[0]
        link = f"pipeline:{pipeline.id}"
        assert {"tlpipe", f"project:{name}", link} <= set(pipeline.tags)

        linked = client.read_flow_runs(flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=[link])))
        flows = {client.read_flow(run.flow_id).name: run for run in linked}
        assert set(flows) == STAGES | {"pipeline"}
        for stage in STAGES:
            assert flows[stage].state.is_completed()
            assert {"tlpipe", f"project:{name}", link} <= set(flows[stage].tags)

        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[pipeline.id])))
    by_key = {artifact.key: artifact for artifact in artifacts}
    keys = {kind: f"{name}-pipeline-{kind}" for kind in ("model-comparison", "promotion", "mlflow-runs")}
    assert set(keys.values()) <= set(by_key), sorted(by_key)

    table = by_key[keys["model-comparison"]]
    assert table.type == "table"
    rows = json.loads(table.data) if isinstance(table.data, str) else table.data
    metrics = json.loads((project / "metrics" / "evaluate.json").read_text())
    assert {row["model"] for row in rows} == set(metrics) == set(MODEL_NAMES) and len(rows) == len(MODEL_NAMES)
    for row in rows:
        recorded = metrics[row["model"]]
        assert row["test_accuracy"] == pytest.approx(recorded.get("acc", recorded.get("accuracy")), abs=1e-4)
        assert "/#/experiments/" in row["mlflow_run"]

    promotion = json.loads((project / "reports" / "evaluate" / "promotion.json").read_text())
    decision = by_key[keys["promotion"]].data
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
    links = by_key[keys["mlflow-runs"]].data
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


CHECKING_PIPELINE = """\
stages:
  ingest:  # like the real stages: reads params.yaml and rejects it when invalid, after DVC removed listing.txt
    cmd: python -c "from tlpipe.core.params import load_params; load_params('params.yaml')" && ls -lR ${data.source} > listing.txt
    deps:
      - ${data.source}
    params:
      - data
    outs:
      - listing.txt
"""


@pytest.mark.parametrize("fault", ["typo", "bad value", "missing source", "one class", "bad override"])
def test_repro_rejects_bad_params_or_source_before_dvc_removes_any_output(tmp_path, tiny_source, prefect_server,
                                                                          project_env, fault):
    """Issue 20, item 12: `tlpipe repro` checks params.yaml and the source before DVC runs anything, so the
    outputs of the last good run stay in the workspace."""
    import shutil

    project = make_project(tmp_path / "project", tiny_source)
    (project / "dvc.yaml").write_text(CHECKING_PIPELINE)
    env = {**project_env, "PREFECT_API_URL": prefect_server}
    done = subprocess.run([sys.executable, "-m", "dvc", "repro"], cwd=project, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    listing = (project / "listing.txt").read_text()
    params = project / "params.yaml"
    command = [sys.executable, "-m", "flows.cli", "repro"]
    expected = {"typo": "data.image_sise: unknown key", "bad value": "data.seed:",
                "missing source": f"source folder not found: {tiny_source}", "bad override": "data.seeed: unknown key",
                "one class": f"source folder {tiny_source} has 1 class folder(s) with files (bright)"}
    if fault == "typo":
        params.write_text(params.read_text().replace("  image_size: 32", "  image_sise: 32"))
    elif fault == "bad value":
        params.write_text(params.read_text().replace("  seed: 42", "  seed: many"))
    elif fault == "missing source":
        shutil.rmtree(tiny_source)
    elif fault == "one class":
        shutil.rmtree(tiny_source / "dark")
    else:
        command += ["-S", "data.seeed=3"]
    result = subprocess.run(command, cwd=project, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    assert expected[fault] in result.stderr, result.stderr[-3000:]
    assert "Running stage" not in result.stdout + result.stderr  # DVC never started
    assert (project / "listing.txt").read_text() == listing  # the last good run's output is still there
