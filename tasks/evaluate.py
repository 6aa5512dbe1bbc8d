"""Tasks of the evaluate stage: test metrics, reports, MLflow comparison and the champion gate."""

from __future__ import annotations

import json
from pathlib import Path

from prefect import task

from tlpipe import evaluate, registry, store, tracking
from tlpipe.config import Params
from tlpipe.models import NETWORK_MODELS, model_file as locate_model
from tlpipe.paths import ProjectPaths
from tasks.common import file_sha256, get_logger, log_image_model

SCALARS = ("accuracy", "balanced_accuracy", "f1_macro", "roc_auc")


@task(name="evaluate-models")
def evaluate_all(paths: ProjectPaths, params: Params) -> dict:
    """Every existing model on the held-out test split; writes reports/evaluate."""
    result = evaluate.evaluate_models(paths.store, paths.features, paths.svm_models, paths.finetune_models,
                                      paths.reports("evaluate"), params.evaluate, params.svm.pixel_size)
    logger = get_logger()
    for name, values in result["metrics"].items():
        logger.info("%-14s test accuracy %.4f  balanced %.4f", name, values["accuracy"], values["balanced_accuracy"])
    for name, reason in result["skipped"].items():
        logger.warning("not evaluated: %s (%s)", name, reason)
    return result


def flatten_metrics(metrics: dict) -> dict:
    """Scalar metrics per model (and per-class F1) for ``metrics/evaluate.json``."""
    flat = {}
    for name, values in metrics.items():
        row = {k: values[k] for k in SCALARS if values.get(k) is not None}
        for class_name, per_class in values.get("per_class", {}).items():
            row[f"f1_{class_name}"] = per_class["f1"]
        flat[name] = row
    return flat


@task(name="write-evaluate-metrics", retries=2, retry_delay_seconds=[1, 4])
def write_metrics(result: dict, metrics_path: Path) -> dict:
    """Write ``metrics/evaluate.json`` shaped ``{model: {accuracy: ...}}``."""
    flat = flatten_metrics(result["metrics"])
    store.write_json(metrics_path, flat)
    return flat


def selection_scores(paths: ProjectPaths, models: list[str]) -> dict[str, float]:
    """Validation accuracy (networks) or CV accuracy (SVMs): what the best model is chosen by."""
    scores = {}
    svm_summary = paths.svm_models / "summary.json"
    if svm_summary.exists():
        for name, summary in json.loads(svm_summary.read_text()).items():
            scores[name] = float(summary["cv_accuracy"])
    for name in NETWORK_MODELS:
        path = paths.finetune_models / f"{name}_metrics.json"
        if path.exists():
            scores[name] = float(json.loads(path.read_text())["best_val_accuracy"])
    return {name: scores[name] for name in models if name in scores}


def model_file(paths: ProjectPaths, name: str) -> Path:
    """Where a model's file lives."""
    return locate_model(paths.svm_models, paths.finetune_models, name)


def find_logged_pyfunc(client, experiment_id: str, path: Path) -> str | None:
    """The pyfunc URI logged for exactly this model file (matched by hash), if any."""
    sha = file_sha256(path)
    runs = client.search_runs([experiment_id], filter_string=f"tags.`tlpipe.model_sha` = '{sha}'",
                              order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0].data.tags.get("tlpipe.pyfunc_uri") if runs else None


@task(name="log-evaluation", retries=2, retry_delay_seconds=[2, 8], timeout_seconds=1800)
def log_evaluation(paths: ProjectPaths, params: Params, result: dict, data_hash: str) -> dict:
    """Log test metrics per model and the reports; register the best model; apply the champion gate."""
    import mlflow

    out_dir = paths.reports("evaluate")
    client = tracking.connect(paths.root)
    experiment_id = tracking.ensure_experiment(client, paths.root)
    stage_params = {"evaluate": params.evaluate.model_dump(), "registry": params.registry.model_dump()}
    with tracking.stage_run("evaluate", paths.root, stage_params, data_hash, client=client):
        for name, values in result["metrics"].items():
            with tracking.model_run(f"{name}-test", {"tlpipe.data_hash": data_hash, "tlpipe.model": name}):
                mlflow.log_metrics({f"test_{k}": float(values[k]) for k in SCALARS if values.get(k) is not None})
                mlflow.log_dict(values, f"{name}_metrics.json")
        mlflow.log_artifacts(str(out_dir), "evaluate")
        scores = selection_scores(paths, list(result["metrics"]))
        best = registry.select_best(scores)
        uri = find_logged_pyfunc(client, experiment_id, model_file(paths, best))
        if uri is None:
            uri = log_image_model(best, model_file(paths, best), paths.store, paths.features, params)
        images, labels = store.load_split(paths.store, "test")
        decision = registry.register_and_gate(
            client, params.registry.model_name, best, uri, result["metrics"][best]["accuracy"], images, labels,
            store.load_classes(paths.store), params.registry.min_improvement,
            {"tlpipe.data_hash": data_hash, "selection_score": f"{scores[best]:.4f}"})
        payload = {**decision.to_dict(), "selection_scores": scores, "registered_model": params.registry.model_name}
        mlflow.log_dict(payload, "promotion.json")
        mlflow.set_tags({"tlpipe.best_model": best, "tlpipe.promoted": str(decision.promoted)})
        store.write_json(out_dir / "promotion.json", payload)
        get_logger().info(decision.reason)
        return payload
