"""Tasks of the svm stage."""

from __future__ import annotations

from pathlib import Path

from prefect import task

from tasks.common import get_logger, log_image_model, reports_tracking_outage, trained_model_run
from tlpipe.core.params import Params
from tlpipe.data import store
from tlpipe.ops.pause import pause_point
from tlpipe.tracking.connection import get_client
from tlpipe.tracking.model_params import svm_model_params
from tlpipe.tracking.records import log_datasets, log_metrics
from tlpipe.train import svm


@task(name="train-svms")
def train(store_dir: Path, features_dir: Path, out_dir: Path, params: Params) -> dict:
    """Grid-search and fit the three linear SVMs (features, concat, pixels)."""
    summaries = svm.train_svms(store_dir, features_dir, out_dir, params.svm)
    for name, summary in summaries.items():
        get_logger().info("%s: C=%g, CV accuracy %.4f (%.1f s)", name, summary["best_C"],
                          summary["cv_accuracy"], summary["fit_seconds"])
    return summaries


@task(name="write-svm-metrics", retries=2, retry_delay_seconds=[1, 4])
def write_metrics(summaries: dict, metrics_path: Path) -> None:
    """Write the svm metrics file: chosen C and CV accuracy per model."""
    store.write_json(metrics_path, {name: {k: s[k] for k in ("best_C", "cv_accuracy", "cv_std", "fit_seconds")}
                                    for name, s in summaries.items()})


@task(name="log-svms", timeout_seconds=1800)
@reports_tracking_outage("logging the SVMs")
def log_svms(stage_run_id: str, root: Path, params: Params, summaries: dict, svm_dir: Path, store_dir: Path,
             features_dir: Path, data_hash: str) -> dict[str, str]:
    """One MLflow run per SVM under the stage run: params, datasets, CV metrics and table, one logged model.

    Not retried by Prefect: it creates runs and logged models, and a repeat would
    log them twice (MLflow retries its own requests).

    Returns:
        ``{model name: run id}``.
    """
    pause_point("svm.logging")  # models published, not yet logged: a fault test kills the stage here
    client = get_client(root)
    classes = store.load_classes(store_dir)
    image_size = store.image_size(store_dir)
    y_val = store.split_labels(store_dir, "val")
    log_datasets(client, stage_run_id, store_dir, params.data.source, ("train", "val"))
    runs = {}
    for name, summary in summaries.items():
        run_params = svm_model_params(name, summary, params, data_hash, classes, image_size)
        with trained_model_run(client, stage_run_id, name, "svm", data_hash, run_params, store_dir,
                               params.data.source) as (run_id, datasets):
            model = svm.joblib.load(svm_dir / f"{name}.joblib")
            X = svm.load_inputs(store_dir, features_dir, "val", svm.SVM_MODELS[name], params.svm.pixel_size)
            log_metrics(client, run_id, {"cv_accuracy": summary["cv_accuracy"], "cv_std": summary["cv_std"],
                                         "validation_score": summary["cv_accuracy"],
                                         "fit_seconds": summary["fit_seconds"],
                                         "search_seconds": summary.get("search_seconds")},
                        dataset=datasets["train"])
            log_metrics(client, run_id, {"val_accuracy": float(model.score(X, y_val))}, dataset=datasets["val"])
            client.log_artifact(run_id, str(svm_dir / f"{name}_cv.csv"), "cv")
            log_image_model(client, run_id, name, svm_dir / f"{name}.joblib", store_dir, features_dir, params, step=0)
        runs[name] = run_id
        get_logger().info("%s: logged to MLflow run %s", name, run_id)
    return runs
