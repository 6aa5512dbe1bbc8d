"""Tasks of the features stage."""

from __future__ import annotations

from pathlib import Path

from prefect import task

from tasks.common import get_logger, report_progress, reports_tracking_outage
from tlpipe.core.params import FeaturesParams
from tlpipe.data import store
from tlpipe.features import extraction as features
from tlpipe.tracking.connection import get_client
from tlpipe.tracking.records import log_datasets, log_metrics, set_tags


@task(name="check-weights")
def check_backbone_weights(params: FeaturesParams, store_dir: Path) -> None:
    """Fail before any work when the backbone's weights cannot be found (for the store's image size)."""
    from tlpipe.features.backbones import check_weights, get_spec

    image_size = store.image_size(store_dir)
    spec = get_spec(params.backbone)
    check_weights(params.backbone, features.normalise_weights(params.weights),
                  include_top=spec.has_classifier and image_size == spec.default_size)


@task(name="extract-features")
def extract(store_dir: Path, out_dir: Path, params: FeaturesParams) -> dict:
    """Stream every split through the backbone; write pooled final and mid features."""
    meta = features.extract_features(store_dir, out_dir, params, progress=report_progress("features"))
    get_logger().info("%s on %s (%s): %.1f images/s, final %d-d, mid %d-d (%s)", meta["backbone"],
                      meta["device"], meta["precision"], meta["images_per_second"], meta["final_dim"],
                      meta["mid_dim"], meta["mid_layer"])
    return meta


@task(name="write-features-metrics", retries=2, retry_delay_seconds=[1, 4])
def write_metrics(meta: dict, metrics_path: Path) -> None:
    """Write the features metrics file (throughput and shapes)."""
    store.write_json(metrics_path, {k: meta[k] for k in ("images_per_second", "seconds", "final_dim", "mid_dim")})


@task(name="log-features", timeout_seconds=300)
@reports_tracking_outage("logging the features stage")
def log_features(run_id: str, root: Path, params: FeaturesParams, meta: dict, out_dir: Path, store_dir: Path,
                 source: str) -> None:
    """Log throughput, feature shapes, the ImageNet top-1 table and the splits it read onto the stage run."""
    client = get_client(root)
    log_metrics(client, run_id, {
        "images_per_second": meta["images_per_second"], "seconds": meta["seconds"],
        "final_dim": meta["final_dim"], "mid_dim": meta["mid_dim"],
        **{f"count.{s}": n for s, n in meta["counts"].items()}})
    set_tags(client, run_id, {"tlpipe.device": meta["device"], "tlpipe.precision": meta["precision"],
                              "tlpipe.keras_backend": meta["keras_backend"], "tlpipe.mid_layer": meta["mid_layer"]})
    client.log_artifact(run_id, str(out_dir / "meta.json"), "features")
    if (out_dir / "imagenet_top1.csv").exists():
        client.log_artifact(run_id, str(out_dir / "imagenet_top1.csv"), "features")
    log_datasets(client, run_id, store_dir, source, store.SPLITS)
