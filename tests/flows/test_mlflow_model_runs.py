"""Acceptance: the trained models as MLflow model runs, after the session's tiny pipeline (``pipeline_baseline``).

The shared ``tlpipe repro`` of a tiny project (tests/conftest.py) ran every stage under the session's Prefect
test server with the project's own SQLite MLflow store; checked here, through the MLflow client and the
Prefect API, is what a user compares in the MLflow UI: one run per model with shared params, training and
test metrics, dataset inputs and exactly one logged model carrying the test metrics; stage runs within their
stage flows; the experiment in the model-training view; artifacts in ``mlartifacts/``; epochs numbered 1..N
everywhere.
"""

from __future__ import annotations

import json
from datetime import timedelta

import pytest

from tests.conftest import TINY_PARAMS
from tlpipe.core.names import MODEL_NAMES, NETWORK_MODELS, SVM_MODELS
from tlpipe.tracking.connection import experiment_name

pytestmark = pytest.mark.slow

STAGES = ("select", "ingest", "features", "svm", "finetune", "evaluate")


def epochs_of(model: str) -> int:
    """Epochs a tiny network trains: ``finetune.epochs``; ``finetuned`` its own head plus tuning epochs."""
    tiny = TINY_PARAMS["finetune"]
    return tiny["finetuned_head_epochs"] + tiny["finetuned_epochs"] if model == "finetuned" else tiny["epochs"]


REQUIRED_TEST_METRICS = {"test_accuracy", "test_balanced_accuracy", "test_f1_macro"}  # ROC AUC can be undefined
SHARED_PARAMS = {"model", "family", "model_kind", "input", "backbone", "weights", "mid_layer", "image_size",
                 "resize_mode", "data_hash", "classes", "n_classes", "seed", "n_train"}
TEST_METRICS = {"test_accuracy", "test_balanced_accuracy", "test_f1_macro", "test_roc_auc"}


@pytest.fixture(scope="module")
def pipeline(pipeline_baseline, prefect_server):
    """(project root, {stage: its Prefect flow run}, {stage: that flow run's logs}) of the shared pipeline run."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName, FlowRunFilter, FlowRunFilterTags

    root = pipeline_baseline.project
    with get_client(sync_client=True) as client:
        pipelines = client.read_flow_runs(
            flow_filter=FlowFilter(name=FlowFilterName(any_=["pipeline"])),
            flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=[f"project:{root.name}"])))
        [pipeline] = [run for run in pipelines if run.state.is_completed()]
        linked = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=[f"pipeline:{pipeline.id}"])))
        runs = {client.read_flow(run.flow_id).name: run for run in linked}
        runs.pop("pipeline", None)
        logs = {stage: client.read_logs(log_filter=_log_filter(run.id)) for stage, run in runs.items()}
    assert set(runs) == set(STAGES), sorted(runs)
    return root, runs, logs


def _log_filter(flow_run_id):
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    return LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id]))


@pytest.fixture(scope="module")
def store(pipeline):
    """(client, experiment, runs) of the project's MLflow store."""
    from mlflow import MlflowClient

    root = pipeline[0]
    client = MlflowClient(f"sqlite:///{root}/mlflow.db")
    experiment = client.get_experiment_by_name(experiment_name(root))  # the task's experiment
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    return client, experiment, runs


def expected_test_metrics(root) -> dict[str, dict[str, float]]:
    """``{model: {test_<metric>: value}}`` from the evaluate stage's report (metrics it could compute)."""
    report = json.loads((root / "reports" / "evaluate" / "metrics.json").read_text())
    return {name: {f"test_{k}": values[k] for k in ("accuracy", "balanced_accuracy", "f1_macro", "roc_auc")
                   if values.get(k) is not None} for name, values in report.items()}


def model_runs(runs) -> dict:
    """The model runs by model name (asserting one each)."""
    found = [r for r in runs if r.data.tags.get("tlpipe.kind") == "model"]
    names = [r.data.tags["tlpipe.model"] for r in found]
    assert sorted(names) == sorted(MODEL_NAMES), names
    return {r.data.tags["tlpipe.model"]: r for r in found}


def test_five_model_runs_hold_params_training_and_test_metrics(store, pipeline):
    client, experiment, runs = store
    by_name = model_runs(runs)
    assert not [r for r in runs if r.info.run_name.endswith("-test")], "separate <model>-test runs are gone"
    stage_ids = {r.data.tags["tlpipe.stage"]: r.info.run_id for r in runs if r.data.tags.get("tlpipe.kind") == "stage"}
    evaluate = expected_test_metrics(pipeline[0])
    for name, run in by_name.items():
        assert run.info.status == "FINISHED"
        params = run.data.params
        assert len(params) >= 8, params
        assert set(params) >= SHARED_PARAMS, SHARED_PARAMS - set(params)  # same keys: they compare side by side
        metrics = run.data.metrics
        assert set(metrics) >= REQUIRED_TEST_METRICS, metrics
        assert {k: v for k, v in metrics.items() if k in TEST_METRICS} == evaluate[name]
        assert 0 <= metrics["validation_score"] <= 1
        if name in SVM_MODELS:
            assert run.data.tags["mlflow.parentRunId"] == stage_ids["svm"]
            assert params["family"] == "svm" and params["input"] == SVM_MODELS[name]
            assert {"svm.C", "svm.cv_folds"} <= set(params) and params["svm.C_grid"] == "logspace(-2, 2, 3)"
            assert metrics["cv_accuracy"] == metrics["validation_score"]
        else:
            assert run.data.tags["mlflow.parentRunId"] == stage_ids["finetune"]
            assert params["family"] == "network" and params["net.optimizer"] == "rmsprop"
            assert params["net.epochs"] == str(epochs_of(name))
            if name == "finetuned":  # the shared keys hold what it used, not the course models' settings
                assert params["net.learning_rate"] == params["net.finetuned_head_learning_rate"] == "0.001"
                assert params["net.augment.zoom"] == "0.0" and params["net.augment.horizontal_flip"] == "True"
                assert params["net.unfreeze_layers"] == "2" and params["net.finetuned_blocks"] == "2"
            else:
                assert params["net.augment.zoom"] == "0.1" and params["net.unfreeze_layers"] == "0"
            assert {"net.learning_rate", "net.batch_size", "net.head_units", "net.augment.zoom"} <= set(params)
            assert metrics["best_val_accuracy"] == metrics["validation_score"]
    assert by_name["svm_concat"].data.params["mid_layer"] == by_name["concat"].data.params["mid_layer"] \
        == "block5_expand_relu"
    assert by_name["svm_pixels"].data.params["backbone"] == "none"


def test_network_curves_use_epochs_one_to_n_everywhere(store, pipeline):
    import pandas as pd

    client, _, runs = store
    root, _, logs = pipeline
    messages = [log.message for log in logs["finetune"]]
    for name in NETWORK_MODELS:
        run = model_runs(runs)[name]
        history = pd.read_csv(root / "models" / "finetune" / f"{name}_history.csv")
        last = epochs_of(name)
        epochs = list(range(1, last + 1))
        assert history["epoch"].tolist() == epochs
        for key in ("loss", "accuracy", "val_loss", "val_accuracy"):
            points = client.get_metric_history(run.info.run_id, key)
            assert sorted(p.step for p in points) == epochs, key
            assert [p.value for p in sorted(points, key=lambda p: p.step)] == pytest.approx(history[key].tolist())
        assert [m for m in messages if m.startswith(f"{name} epoch ")] == [
            m for m in messages if any(m.startswith(f"{name} epoch {e}:") for e in epochs)]
        assert any(m.startswith(f"{name} epoch {last}:") for m in messages)
        assert not any(m.startswith(f"{name} epoch {last + 1}:") for m in messages)


def test_dataset_inputs_name_the_splits_and_link_the_test_metrics(store):
    client, _, runs = store
    digests = {}
    for name, run in model_runs(runs).items():
        contexts = {}
        for item in run.inputs.dataset_inputs:
            tags = {t.key: t.value for t in item.tags}
            contexts[tags["mlflow.data.context"]] = item.dataset
            assert int(tags["tlpipe.images"]) == json.loads(item.dataset.profile)["num_rows"] > 0
        assert set(contexts) == {"train", "validation", "test"}, name
        for context, dataset in contexts.items():
            assert dataset.name.endswith({"train": "-train", "validation": "-val", "test": "-test"}[context])
            assert digests.setdefault(context, dataset.digest) == dataset.digest  # same data for every model
        assert len(client.get_metric_history(run.info.run_id, "test_accuracy")) == 1
        model = client.get_logged_model(run.data.tags["tlpipe.model_id"])
        linked = {m.key: (m.dataset_name, m.dataset_digest) for m in model.metrics if m.key in TEST_METRICS}
        assert linked and set(linked.values()) == {(contexts["test"].name, contexts["test"].digest)}
    assert len(set(digests.values())) == 3
    stage_inputs = {r.data.tags["tlpipe.stage"]: r.inputs.dataset_inputs for r in runs
                    if r.data.tags.get("tlpipe.kind") == "stage"}
    assert len(stage_inputs["ingest"]) == 3 and len(stage_inputs["features"]) == 3


def test_one_logged_model_per_trained_model_with_its_best_and_test_metrics(store, pipeline):
    client, experiment, runs = store
    by_name = model_runs(runs)
    expected = expected_test_metrics(pipeline[0])
    logged = list(client.search_logged_models(experiment_ids=[experiment.experiment_id], max_results=100))
    assert sorted(m.name for m in logged) == sorted(MODEL_NAMES)  # one each: no `-sklearn` twins
    for model in logged:
        run = by_name[model.name]
        assert model.source_run_id == run.info.run_id
        assert run.data.tags["tlpipe.model_id"] == model.model_id
        assert run.data.tags["tlpipe.pyfunc_uri"] == f"models:/{model.model_id}"
        metrics = {m.key: m for m in model.metrics}
        assert {k: m.value for k, m in metrics.items() if k in TEST_METRICS} == expected[model.name]
        assert len([m for m in model.metrics if m.key == "test_accuracy"]) == 1
        assert metrics["test_accuracy"].dataset_name.endswith("-test")
        if model.name in NETWORK_MODELS:  # the weights it holds: the best epoch's, not the first epoch's
            best = int(run.data.metrics["best_epoch"])
            assert metrics["val_accuracy"].step == best
            assert metrics["val_accuracy"].value == run.data.metrics["best_val_accuracy"]
        else:
            assert metrics["cv_accuracy"].value == run.data.metrics["cv_accuracy"]
        assert model.params == run.data.params  # the run's params travel with the model


def test_logged_models_are_logged_from_code_into_mlartifacts(store, pipeline):
    import mlflow

    client, experiment, runs = store
    root = pipeline[0]
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    assert experiment.artifact_location == (root / "mlartifacts").as_uri()
    assert not (root / "mlruns").exists()
    model = next(iter(client.search_logged_models(experiment_ids=[experiment.experiment_id], max_results=1)))
    assert model.artifact_location.startswith((root / "mlartifacts").as_uri())
    mlflow.set_tracking_uri(f"sqlite:///{root}/mlflow.db")  # models:/ URIs resolve in the fluent store (restored)
    flavor = mlflow.models.get_model_info(f"models:/{model.model_id}").flavors["python_function"]
    assert flavor["model_code_path"].endswith("pyfunc_model.py") and "python_model" not in flavor


def test_stage_runs_span_their_stage_flows(store, pipeline):
    """Each stage run lies within its flow run, and every task started inside it ends inside it: an order of
    events on one clock (MLflow keeps milliseconds, hence the 2 ms), not a duration, so a loaded machine cannot
    break it. (A flow's preamble, e.g. checking the tracking store, runs before the stage run opens.)"""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    _, _, runs = store
    flow_runs = pipeline[1]
    stages = {r.data.tags["tlpipe.stage"]: r for r in runs if r.data.tags.get("tlpipe.kind") == "stage"}
    assert set(stages) == set(STAGES)
    tick = 0.002
    for stage, run in stages.items():
        flow_run = flow_runs[stage]
        with get_client(sync_client=True) as client:
            tasks = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run.id])))
        run_start, run_end = run.info.start_time / 1000, run.info.end_time / 1000
        assert flow_run.start_time.timestamp() - tick <= run_start <= run_end <= flow_run.end_time.timestamp() + tick
        inside = [t for t in tasks if t.start_time and t.start_time.timestamp() >= run_start - tick]
        assert inside, (stage, [t.name for t in tasks])  # the stage's work ran in its run
        for task in inside:
            assert task.end_time and task.end_time.timestamp() <= run_end + tick, (stage, task.name)
        prefect_seconds = (flow_run.end_time - flow_run.start_time).total_seconds()
        assert flow_run.total_run_time <= timedelta(seconds=prefect_seconds + 0.01)
        assert run.info.status == "FINISHED"
        assert run.data.tags["tlpipe.pid"].isdigit() and run.data.tags["tlpipe.host"]
