"""Stage flows under the Prefect test harness, on a tiny project copy (real MLflow SQLite store)."""

from __future__ import annotations

import json

import pytest

from tests.conftest import make_project
from tlpipe.tracking.connection import experiment_name


@pytest.fixture
def project(tmp_path, tiny_source, prefect_server, project_env, monkeypatch):
    """A tiny project whose stage flows run in-process."""
    root = make_project(tmp_path / "project", tiny_source)
    monkeypatch.setenv("TLPIPE_ROOT", str(root))
    return root


def test_ingest_and_features_flows_write_outputs_and_track(project):
    from mlflow import MlflowClient

    from flows.features import features_flow
    from flows.ingest import ingest_flow

    summary = ingest_flow(root=str(project))
    assert summary["images_kept"] == 24 and summary["rejected"] == 1
    assert (project / "data" / "store" / "manifest.csv").exists()
    assert json.loads((project / "metrics" / "ingest.json").read_text())["rejected"] == 1

    meta = features_flow(root=str(project))
    assert meta["final_dim"] == 1280 and meta["mid_dim"] == 240
    assert (project / "data" / "features" / "test_mid.npy").exists()

    client = MlflowClient(f"sqlite:///{project}/mlflow.db")
    experiment = client.get_experiment_by_name(experiment_name(project))  # the task's experiment
    runs = client.search_runs([experiment.experiment_id])
    stages = {r.data.tags.get("tlpipe.stage"): r for r in runs}
    assert {"ingest", "features"} <= set(stages)
    ingest_run = stages["ingest"]
    assert ingest_run.info.status == "FINISHED"
    params = ingest_run.data.params  # dvc.yaml's params of ingest, and the select stage's choice it used
    assert params["selection.image_size"] == "32" and params["data.seed"] == "42" and "data.image_size" not in params
    assert ingest_run.data.metrics["images_kept"] == 24
    assert ingest_run.data.tags["tlpipe.data_hash"] == summary["data_hash"]
    assert stages["features"].data.metrics["images_per_second"] > 0
    contexts = sorted({t.key: t.value for t in item.tags}["mlflow.data.context"]
                      for item in ingest_run.inputs.dataset_inputs)
    assert contexts == ["test", "train", "validation"]
    assert experiment.artifact_location == (project / "mlartifacts").as_uri()


def test_unreachable_tracking_fails_clearly_and_keeps_outputs(project, monkeypatch):
    import os

    from flows.ingest import ingest_flow

    ingest_flow(root=str(project))
    store_dir = project / "data" / "store"
    store_file = store_dir / "train.npy"
    before = store_file.read_bytes()
    # a rebuild would publish a new folder (new inode) with new files (new mtimes), even with equal bytes
    stamps = [(os.stat(p).st_ino, os.stat(p).st_mtime_ns) for p in (store_dir, store_file)]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")
    with pytest.raises(Exception, match=r"http://127\.0\.0\.1:9 is unreachable after 3 attempts"):
        ingest_flow(root=str(project))
    assert store_file.read_bytes() == before
    assert [(os.stat(p).st_ino, os.stat(p).st_mtime_ns) for p in (store_dir, store_file)] == stamps, "store rebuilt"
    assert not list((project / "data").glob(".store.tmp-*"))


def test_bad_params_fail_naming_the_key(project):
    from flows.ingest import ingest_flow
    from tlpipe.core.params import ConfigError

    params = project / "params.yaml"
    params.write_text(params.read_text().replace("test_fraction: 0.2", "test_fraction: 1.5"))
    with pytest.raises(ConfigError, match="data.test_fraction"):
        ingest_flow(root=str(project))


def test_finetune_flow_trains_both_networks_and_the_saved_models_reload(project):
    """One epoch of each network through the flow; the saved .keras and the logged pyfunc agree."""
    import keras
    import mlflow
    import numpy as np
    from mlflow import MlflowClient

    import tlpipe.features.backbones  # noqa: F401  (registers the custom layers for load_model)
    from flows.finetune import finetune_flow
    from flows.ingest import ingest_flow
    from tlpipe.data import store
    from tlpipe.serving.classifier import to_image_frame

    params = project / "params.yaml"
    params.write_text(params.read_text().replace("epochs: 2", "epochs: 1"))
    ingest_flow(root=str(project))
    results = finetune_flow(root=str(project))
    assert set(results) == {"frozen", "concat", "finetuned"}
    images, labels = store.load_split(project / "data" / "store", "val")
    classes = store.load_classes(project / "data" / "store")
    client = MlflowClient(f"sqlite:///{project}/mlflow.db")
    experiment = client.get_experiment_by_name(experiment_name(project))
    mlflow.set_tracking_uri(f"sqlite:///{project}/mlflow.db")
    for kind in ("frozen", "concat"):
        history = (project / "models" / "finetune" / f"{kind}_history.csv").read_text().splitlines()
        assert len(history) == 2  # header + one epoch
        model = keras.saving.load_model(project / "models" / "finetune" / f"{kind}.keras")
        probs = model.predict(images, verbose=0)
        assert (probs.argmax(1) == labels).mean() == results[kind]["best_val_accuracy"]
        run = client.search_runs([experiment.experiment_id],
                                 filter_string=f"tags.`tlpipe.model` = '{kind}' and tags.`tlpipe.kind` = 'model'")[0]
        assert run.data.metrics["best_val_accuracy"] == results[kind]["best_val_accuracy"]
        assert [p.step for p in client.get_metric_history(run.info.run_id, "val_accuracy")] == [1]  # epoch 1
        assert run.data.tags["tlpipe.pyfunc_uri"] == f"models:/{run.data.tags['tlpipe.model_id']}"
        served = mlflow.pyfunc.load_model(run.data.tags["tlpipe.pyfunc_uri"]).predict(to_image_frame(images))
        assert list(served["class"]) == [classes[i] for i in probs.argmax(1)]
        np.testing.assert_allclose(served[[f"p_{c}" for c in classes]].to_numpy(), probs, rtol=1e-4, atol=1e-5)
