"""Tasks of the finetune stage."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from prefect import task

from tasks.common import get_logger, log_image_model, reports_tracking_outage, trained_model_run
from tlpipe.core.params import Params
from tlpipe.data import store
from tlpipe.features.extraction import normalise_weights
from tlpipe.tracking.connection import get_client
from tlpipe.tracking.model_params import network_model_params
from tlpipe.tracking.records import log_datasets, log_metrics, model_id_from_uri


@task(name="train-networks")
def train(store_dir: Path, out_dir: Path, params: Params, kinds: list[str]) -> dict:
    """Train the frozen-base and multi-layer-concat networks; progress per epoch in the logs."""
    from tlpipe.train.networks import training

    logger = get_logger()

    def on_epoch(kind: str, epoch: int, logs: dict) -> None:
        logger.info("%s epoch %d: loss %.4f acc %.4f val_loss %.4f val_acc %.4f", kind, epoch,  # epoch is 1-based
                    logs.get("loss", float("nan")), logs.get("accuracy", float("nan")),
                    logs.get("val_loss", float("nan")), logs.get("val_accuracy", float("nan")))

    return training.train_models(store_dir, out_dir, kinds, params.features.backbone,
                                 normalise_weights(params.features.weights), params.finetune, on_epoch=on_epoch)


@task(name="write-finetune-metrics", retries=2, retry_delay_seconds=[1, 4])
def write_metrics(results: dict, metrics_path: Path) -> None:
    """Write the finetune metrics file: the numbers of each model's summary (best epoch, validation accuracy, times).

    Numbers only (what ``dvc metrics show`` can compare); the text fields (backbone,
    weights, mode, classes) stay in ``models/finetune/<kind>_metrics.json``.
    """
    store.write_json(metrics_path, {kind: {key: value for key, value in summary.items()
                                           if isinstance(value, (int, float)) and not isinstance(value, bool)}
                                    for kind, summary in results.items()})


CURVES = {"loss": "loss", "accuracy": "accuracy", "val_loss": "val_loss", "val_accuracy": "val_accuracy",
          "seconds": "epoch_seconds"}
"""History column -> the per-epoch MLflow metric (steps 1..N, as in the CSVs, plots and logs)."""


@task(name="log-networks", timeout_seconds=1800)
@reports_tracking_outage("logging the networks")
def log_networks(stage_run_id: str, root: Path, params: Params, results: dict, out_dir: Path, store_dir: Path,
                 data_hash: str) -> dict[str, str]:
    """One MLflow run per network under the stage run: params, datasets, curves, files, one logged model.

    Per-epoch train/val curves use steps 1..N (the history CSV's ``epoch``). The
    logged model is logged at the best epoch's step, so it carries that epoch's
    metrics (the weights it holds), plus the best-epoch summary. Not retried by
    Prefect: it creates runs and logged models.

    Returns:
        ``{model name: run id}``.
    """
    client = get_client(root)
    classes = store.load_classes(store_dir)
    image_size = store.image_size(store_dir)
    log_datasets(client, stage_run_id, store_dir, params.data.source, ("train", "val"))
    runs = {}
    for kind, summary in results.items():
        run_params = network_model_params(kind, summary, params, data_hash, classes, image_size)
        with trained_model_run(client, stage_run_id, kind, "network", data_hash, run_params, store_dir,
                               params.data.source) as (run_id, datasets):
            history = pd.read_csv(out_dir / f"{kind}_history.csv")
            for row in history.to_dict(orient="records"):
                step = int(row["epoch"])
                log_metrics(client, run_id, {CURVES[k]: row[k] for k in ("loss", "accuracy", "seconds")},
                            step=step, dataset=datasets["train"])
                log_metrics(client, run_id, {CURVES[k]: row[k] for k in ("val_loss", "val_accuracy")},
                            step=step, dataset=datasets["val"])
            for suffix in ("_history.csv", "_curves.png", "_metrics.json"):
                client.log_artifact(run_id, str(out_dir / f"{kind}{suffix}"), "training")
            uri = log_image_model(client, run_id, kind, out_dir / f"{kind}.keras", store_dir, None, params,
                                  step=int(summary["best_epoch"]))
            model_id = model_id_from_uri(uri)
            log_metrics(client, run_id, {
                "best_val_accuracy": summary["best_val_accuracy"], "best_val_loss": summary["best_val_loss"],
                "validation_score": summary["best_val_accuracy"]}, model_id=model_id, dataset=datasets["val"])
            log_metrics(client, run_id, {
                "best_epoch": summary["best_epoch"], "train_seconds": summary["train_seconds"],
                "seconds_per_epoch": summary["seconds_per_epoch"], "cache_seconds": summary.get("cache_seconds")},
                model_id=model_id)
        runs[kind] = run_id
        get_logger().info("%s: logged to MLflow run %s", kind, run_id)
    return runs
