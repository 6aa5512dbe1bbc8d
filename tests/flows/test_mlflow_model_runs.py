"""Acceptance: the five trained models as MLflow model runs, after the stage flows ran on a tiny source.

Runs ingest, features, svm, finetune and evaluate in-process under the session's
Prefect test server, on a tiny project copy with its own SQLite MLflow store, and
checks through the MLflow client (and the Prefect API) what a user compares in the
MLflow UI: one run per model with shared params, training and test metrics,
dataset inputs and exactly one logged model carrying the test metrics; stage runs
as long as their stage flows; the experiment in the model-training view; artifacts
in ``mlartifacts/``; epochs numbered 1..N everywhere.
"""

from __future__ import annotations

import json
from datetime import timedelta

import pytest

from tests.conftest import make_project
from tlpipe.core.names import MODEL_NAMES, NETWORK_MODELS, SVM_MODELS
from tlpipe.tracking.connection import experiment_name

pytestmark = pytest.mark.slow

STAGES = ("ingest", "features", "svm", "finetune", "evaluate")
REQUIRED_TEST_METRICS = {"test_accuracy", "test_balanced_accuracy", "test_f1_macro"}  # ROC AUC can be undefined
SHARED_PARAMS = {"model", "family", "model_kind", "input", "backbone", "weights", "mid_layer", "image_size",
                 "resize_mode", "data_hash", "classes", "n_classes", "seed", "n_train"}
TEST_METRICS = {"test_accuracy", "test_balanced_accuracy", "test_f1_macro", "test_roc_auc"}


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, prefect_server):
    """Run the five stage flows once on a tiny project; yield (project root, {stage: Prefect flow run})."""
    import mlflow

    from tests.conftest import make_source

    base = tmp_path_factory.mktemp("mlflow_runs")
    root = make_project(base / "project", make_source(base / "source"), {"finetune": {"epochs": 3}})
    previous_uri = mlflow.get_tracking_uri()
    with pytest.MonkeyPatch.context() as patch:
        for key in ("MLFLOW_TRACKING_URI", "TLPIPE_PARENT_RUN_ID"):
            patch.delenv(key, raising=False)
        patch.setenv("TLPIPE_ROOT", str(root))
        from prefect.client.orchestration import get_client
        from prefect.logging.handlers import APILogWorker

        from flows.evaluate import evaluate_flow
        from flows.features import features_flow
        from flows.finetune import finetune_flow
        from flows.ingest import ingest_flow
        from flows.svm import svm_flow

        flows = {"ingest": ingest_flow, "features": features_flow, "svm": svm_flow, "finetune": finetune_flow,
                 "evaluate": evaluate_flow}
        states = {}
        for stage in STAGES:
            states[stage] = flows[stage](root=str(root), return_state=True)
            assert states[stage].is_completed(), f"{stage}: {states[stage]}"
        APILogWorker.drain_all(timeout=30)  # the flows' logs reach the API before they are read
        with get_client(sync_client=True) as client:
            runs = {stage: client.read_flow_run(state.state_details.flow_run_id) for stage, state in states.items()}
            logs = {stage: client.read_logs(log_filter=_log_filter(run.id)) for stage, run in runs.items()}
        yield root, runs, logs
        mlflow.set_tracking_uri(previous_uri)


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
            assert params["net.epochs"] == "3"  # frozen, concat: epochs 3; finetuned: 2 head + 1 tuning epochs
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
        assert history["epoch"].tolist() == [1, 2, 3]
        for key in ("loss", "accuracy", "val_loss", "val_accuracy"):
            points = client.get_metric_history(run.info.run_id, key)
            assert sorted(p.step for p in points) == [1, 2, 3], key
            assert [p.value for p in sorted(points, key=lambda p: p.step)] == pytest.approx(history[key].tolist())
        assert [m for m in messages if m.startswith(f"{name} epoch ")] == [
            m for m in messages if any(m.startswith(f"{name} epoch {e}:") for e in (1, 2, 3))]
        assert any(m.startswith(f"{name} epoch 3:") for m in messages)
        assert not any(m.startswith(f"{name} epoch 4:") for m in messages)


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
    flavor = mlflow.models.get_model_info(f"models:/{model.model_id}").flavors["python_function"]
    assert flavor["model_code_path"].endswith("pyfunc_model.py") and "python_model" not in flavor


def test_stage_runs_span_their_stage_flows(store, pipeline):
    _, _, runs = store
    flow_runs = pipeline[1]
    stages = {r.data.tags["tlpipe.stage"]: r for r in runs if r.data.tags.get("tlpipe.kind") == "stage"}
    assert set(stages) == set(STAGES)
    for stage, run in stages.items():
        flow_run = flow_runs[stage]
        mlflow_seconds = (run.info.end_time - run.info.start_time) / 1000
        prefect_seconds = (flow_run.end_time - flow_run.start_time).total_seconds()
        assert flow_run.total_run_time <= timedelta(seconds=prefect_seconds + 0.01)
        assert abs(mlflow_seconds - prefect_seconds) <= 1.0, (stage, mlflow_seconds, prefect_seconds)
        assert run.info.start_time / 1000 >= flow_run.start_time.timestamp() - 0.5
        assert run.info.end_time / 1000 <= flow_run.end_time.timestamp() + 0.5
        assert run.info.status == "FINISHED"
        assert run.data.tags["tlpipe.pid"].isdigit() and run.data.tags["tlpipe.host"]
