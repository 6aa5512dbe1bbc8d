"""The evaluate flow end to end, in-process under the Prefect test server, on a tiny prepared project.

The project holds a tiny store, separable features and one real SVM on raw pixels (``svm_pixels``, no
extractor needed), with no MLflow run behind it, so the flow logs its pyfunc itself. Checked: numbers-only
DVC metrics, the report written after the gate and showing its decision, the Prefect artifacts of the flow
run, and one registered version per evaluate execution.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import make_project
from tests.tiny_data import SIZE, write_separable_features, write_tiny_store

COUNTS = {"train": 9, "val": 2, "test": 5}


@pytest.fixture
def project(tmp_path, tiny_source, prefect_server, project_env, monkeypatch) -> Path:
    """A project copy with a store, features and a trained ``svm_pixels`` (no finetune models)."""
    from tlpipe.core.params import CGrid, SvmParams
    from tlpipe.train.svm import train_svms

    root = make_project(tmp_path / "evalproj", tiny_source, {"svm": {"pixel_size": SIZE}})
    store_dir = write_tiny_store(root / "data" / "store", COUNTS)
    write_separable_features(root / "data" / "features", store_dir)
    params = SvmParams(c_grid=CGrid(start=-1, stop=1, num=3), cv_folds=3, n_jobs=1, pixel_size=SIZE)
    train_svms(store_dir, root / "data" / "features", root / "models" / "svm", params, names=("svm_pixels",))
    monkeypatch.setenv("TLPIPE_ROOT", str(root))
    return root


@pytest.mark.slow
def test_evaluate_flow_gates_once_reports_after_the_gate_and_publishes_artifacts(project: Path) -> None:
    from mlflow import MlflowClient
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    from flows.evaluate import evaluate_flow
    from tlpipe.core.params import load_params
    from tlpipe.core.task import load_task
    from tlpipe.tracking import registry

    state = evaluate_flow(root=str(project), return_state=True)
    assert state.is_completed(), state
    first = state.result()
    out = project / "reports" / "evaluate"

    # numbers-only DVC metrics with short keys
    accuracies = json.loads((project / "metrics" / "evaluate.json").read_text())
    details = json.loads((project / "metrics" / "evaluate_detail.json").read_text())
    assert list(accuracies) == ["svm_pixels"] and set(accuracies["svm_pixels"]) == {"acc"}
    assert set(details["svm_pixels"]) == {"bal_acc", "f1", "auc"}
    assert first["metrics"] == accuracies

    # the gate: first version promoted; the report and promotion.json carry that decision
    promotion = json.loads((out / "promotion.json").read_text())
    assert promotion == first["promotion"]
    assert promotion["promoted"] is True and promotion["version"] == "1" and promotion["model"] == "svm_pixels"
    page = (out / "report.html").read_text()
    assert first["report"] == str(out / "report.html")
    assert promotion["reason"] in page and "Promoted: svm_pixels is the new champion (v1)" in page
    assert page.count("data:image/png;base64,") >= 3 and "<script" not in page
    source = Path(load_params(project / "params.yaml").data.source).expanduser()  # the data set, named by the task
    assert f"<dd>{source.name}</dd>" in page and f"<dd>image folder {source}</dd>" in page and "all classes" in page

    # the Prefect artifacts of this flow run
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[state.state_details.flow_run_id])))
    by_key = {artifact.key: artifact for artifact in artifacts}
    assert set(by_key) == {"evalproj-evaluate-model-comparison", "evalproj-evaluate-promotion",
                           "evalproj-evaluate-report", "evalproj-evaluate-mlflow-runs"}
    table = by_key["evalproj-evaluate-model-comparison"].data
    rows = json.loads(table) if isinstance(table, str) else table
    assert [(row["model"], row["candidate"]) for row in rows] == [("svm_pixels", "yes")]
    assert rows[0]["test_accuracy"] == accuracies["svm_pixels"]["acc"]
    assert list(rows[0])[-2:] in (["selection_score", "candidate"], ["candidate", "mlflow_run"])  # URL last
    assert promotion["reason"] in by_key["evalproj-evaluate-promotion"].data
    assert (out / "report.html").resolve().as_uri() in by_key["evalproj-evaluate-report"].data
    assert f"/runs/{promotion['evaluate_run_id']}?workflowType=machine_learning)" in by_key["evalproj-evaluate-mlflow-runs"].data

    # MLflow: the report is an artifact of the evaluate run; one version per execution
    client = MlflowClient(f"sqlite:///{project}/mlflow.db")
    logged = {item.path for item in client.list_artifacts(promotion["evaluate_run_id"], "evaluate")}
    assert {"evaluate/report.html", "evaluate/promotion.json"} <= logged

    second = evaluate_flow(root=str(project))["promotion"]  # a new execution: a new version, gated
    assert second["version"] == "2" and second["promoted"] is False and second["champion_version"] == "1"
    assert second["champion_accuracy"] == accuracies["svm_pixels"]["acc"]  # re-scored through its pyfunc
    name = promotion["registered_model"]  # each data set is its own task: its registered model is named after it
    assert name == load_task(project).model_name == client.get_experiment(
        client.get_run(promotion["evaluate_run_id"]).info.experiment_id).name
    versions = client.search_model_versions(f"name = '{name}'")
    assert sorted(v.tags[registry.EXECUTION_TAG] for v in versions) == sorted(
        [promotion["evaluate_run_id"], second["evaluate_run_id"]])
    assert registry.find_champion(client, name) == "1"


@pytest.fixture
def ensemble_project(tmp_path, tiny_source, prefect_server, project_env, monkeypatch) -> Path:
    """A project whose three networks are weak alone (each sees one row of pixels) and helpful together, with a
    large validation split: the evaluate stage keeps their ensemble."""
    import numpy as np

    from tests.tiny_data import write_network_summary, write_row_network
    from tlpipe.data import store
    from tlpipe.evaluation.evaluate import predict_model

    root = make_project(tmp_path / "ensproj", tiny_source, {"svm": {"pixel_size": SIZE},
                                                            "features": {"backbone": "efficientnet_lite0"}})
    store_dir = write_tiny_store(root / "data" / "store", {"train": 10, "val": 100, "test": 30}, seed=3)
    y_val = store.split_labels(store_dir, "val")
    for row, name in enumerate(("frozen", "concat", "finetuned")):
        path = write_row_network(root / "models" / "finetune" / f"{name}.keras", row)
        labels, _ = predict_model(name, path, store_dir, root / "data" / "features", SIZE, "val")
        write_network_summary(path.parent, name, float(np.mean(labels == y_val)))
    monkeypatch.setenv("TLPIPE_ROOT", str(root))
    return root


@pytest.mark.slow
def test_a_kept_ensemble_is_logged_registered_gated_and_served(ensemble_project: Path, tmp_path: Path) -> None:
    import mlflow
    import numpy as np
    from mlflow import MlflowClient
    from PIL import Image

    from flows.evaluate import evaluate_flow
    from tlpipe.data import store
    from tlpipe.serving.predict import predict_images
    from tlpipe.tracking import registry

    project = ensemble_project
    first = evaluate_flow(root=str(project))
    out = project / "reports" / "evaluate"
    accuracy = first["metrics"]["ensemble"]["acc"]  # metrics/evaluate.json: a column like any model
    promotion = first["promotion"]
    assert promotion["model"] == "ensemble" and promotion["promoted"] is True and promotion["version"] == "1"
    spec = json.loads((out / "ensemble.json").read_text())
    assert "Ensemble tries" in (out / "report.html").read_text()

    client = MlflowClient(f"sqlite:///{project}/mlflow.db")
    (run,) = client.search_runs([client.get_run(promotion["evaluate_run_id"]).info.experiment_id],
                                "tags.`tlpipe.model` = 'ensemble'")
    assert run.data.tags["mlflow.parentRunId"] == promotion["evaluate_run_id"]
    assert run.data.params["members"] == ",".join(spec["members"])
    assert run.data.metrics["val_accuracy"] == spec["val_accuracy"] and run.data.metrics["test_accuracy"] == accuracy
    assert {item.path for item in client.list_artifacts(run.info.run_id, "selection")} == {
        "selection/ensemble.json", "selection/ensemble.csv"}
    tries = client.get_metric_history(promotion["evaluate_run_id"], "ensemble_val_accuracy")
    assert sorted(metric.step for metric in tries) == [2, 3]  # every try, step = members

    # served like any model: the champion's pyfunc classifies image files
    images, labels = store.load_split(project / "data" / "store", "test")
    files = []
    for index in range(4):
        files.append(tmp_path / f"test_{index}.png")
        Image.fromarray(np.kron(images[index], np.ones((4, 4, 1), dtype=np.uint8))).save(files[-1])
    mlflow.set_tracking_uri(f"sqlite:///{project}/mlflow.db")
    rows = predict_images(f"models:/{promotion['registered_model']}@champion", [str(path) for path in files])
    assert len(rows) == 4 and all(row.get("class") in ("ants", "bees") for row in rows), rows

    # a second execution: the ensemble's run is reused, and the gate re-scores the ensemble champion through its pyfunc
    second = evaluate_flow(root=str(project))["promotion"]
    assert second["model"] == "ensemble" and second["promoted"] is False and second["champion_version"] == "1"
    assert second["champion_accuracy"] == accuracy
    assert len(client.search_runs([run.info.experiment_id], "tags.`tlpipe.model` = 'ensemble'")) == 1
    assert registry.find_champion(client, promotion["registered_model"]) == "1"
