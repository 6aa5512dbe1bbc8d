"""Tasks of the finetune stage."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from prefect import task

from tlpipe import store, tracking
from tlpipe.config import Params
from tlpipe.features import normalise_weights
from tasks.common import get_logger, log_image_model


@task(name="train-networks")
def train(store_dir: Path, out_dir: Path, params: Params, kinds: list[str]) -> dict:
    """Train the frozen-base and multi-layer-concat networks; progress per epoch in the logs."""
    from tlpipe import finetune

    logger = get_logger()

    def on_epoch(kind: str, epoch: int, logs: dict) -> None:
        logger.info("%s epoch %d: loss %.4f acc %.4f val_loss %.4f val_acc %.4f", kind, epoch + 1,
                    logs.get("loss", float("nan")), logs.get("accuracy", float("nan")),
                    logs.get("val_loss", float("nan")), logs.get("val_accuracy", float("nan")))

    return finetune.train_models(store_dir, out_dir, kinds, params.features.backbone,
                                 normalise_weights(params.features.weights), params.finetune, on_epoch=on_epoch)


@task(name="write-finetune-metrics", retries=2, retry_delay_seconds=[1, 4])
def write_metrics(results: dict, metrics_path: Path) -> None:
    """Write the finetune metrics file (best epoch, validation accuracy, time per model)."""
    store.write_json(metrics_path, results)


@task(name="log-networks", retries=2, retry_delay_seconds=[2, 8], timeout_seconds=1800)
def log_networks(root: Path, params: Params, results: dict, out_dir: Path, store_dir: Path, data_hash: str) -> str:
    """One MLflow run per network: params, per-epoch metrics, curves, the .keras file and the image pyfunc."""
    import mlflow

    stage_params = {"finetune": params.finetune.model_dump(),
                    "features": {"backbone": params.features.backbone, "weights": params.features.weights}}
    with tracking.stage_run("finetune", root, stage_params, data_hash) as run_id:
        for kind, summary in results.items():
            with tracking.model_run(kind, {"tlpipe.data_hash": data_hash}):
                mlflow.log_params({"units": getattr(params.finetune, f"{kind}_units"),
                                   "backbone": params.features.backbone})
                history = pd.read_csv(out_dir / f"{kind}_history.csv")
                for step, row in enumerate(history.to_dict(orient="records")):
                    mlflow.log_metrics({k: float(v) for k, v in row.items()
                                        if k in ("loss", "accuracy", "val_loss", "val_accuracy", "seconds")}, step=step)
                mlflow.log_metrics({k: float(v) for k, v in summary.items() if isinstance(v, (int, float))})
                for suffix in ("_history.csv", "_curves.png", "_metrics.json"):
                    mlflow.log_artifact(str(out_dir / f"{kind}{suffix}"), "training")
                log_image_model(kind, out_dir / f"{kind}.keras", store_dir, None, params)
        return run_id
