"""Tasks of the svm stage."""

from __future__ import annotations

from pathlib import Path

from prefect import task

from tlpipe import store, svm, tracking
from tlpipe.config import Params
from tasks.common import get_logger, log_image_model


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


@task(name="log-svms", retries=2, retry_delay_seconds=[2, 8], timeout_seconds=1800)
def log_svms(root: Path, params: Params, summaries: dict, svm_dir: Path, store_dir: Path, features_dir: Path,
             data_hash: str) -> str:
    """One MLflow run per SVM: params, CV table, sklearn model and the image pyfunc."""
    import mlflow
    from mlflow.models import infer_signature

    with tracking.stage_run("svm", root, {"svm": params.svm.model_dump()}, data_hash) as run_id:
        for name, summary in summaries.items():
            with tracking.model_run(name, {"tlpipe.data_hash": data_hash}):
                model = svm.joblib.load(svm_dir / f"{name}.joblib")
                X = svm.load_inputs(store_dir, features_dir, "val", svm.SVM_MODELS[name], params.svm.pixel_size)
                mlflow.log_params({"C": summary["best_C"], "input": svm.SVM_MODELS[name],
                                   "n_features": summary["n_features"], "cv_folds": params.svm.cv_folds})
                mlflow.log_metrics({"cv_accuracy": summary["cv_accuracy"], "cv_std": summary["cv_std"],
                                    "fit_seconds": summary["fit_seconds"],
                                    "val_accuracy": float(model.score(X, store.split_labels(store_dir, "val")))})
                mlflow.log_artifact(str(svm_dir / f"{name}_cv.csv"), "cv")
                mlflow.sklearn.log_model(model, name=f"{name}-sklearn", input_example=X[:2],
                                         signature=infer_signature(X[:2], model.predict(X[:2])))
                log_image_model(name, svm_dir / f"{name}.joblib", store_dir, features_dir, params)
        return run_id
