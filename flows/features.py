"""Features stage flow: image store -> pooled final and mid-level backbone features."""

from __future__ import annotations

from prefect import flow

from tasks.features import check_backbone_weights, extract, log_features, write_metrics
from tlpipe.core.paths import project_paths
from tlpipe.core.task import load_stage_params
from tlpipe.data import store
from tlpipe.data.ingest import hash_manifest
from tlpipe.tracking.runs import stage_run


@flow(name="features")
def features_flow(root: str | None = None) -> dict:
    """Extract features for train/val/test into ``data/features``; log to MLflow.

    Args:
        root: Project root (default: found from the working directory).
    """
    paths = project_paths(root)
    params = load_stage_params(paths.params, paths.selection)
    data_hash = hash_manifest(store.load_manifest(paths.store))
    # the stage run spans the work; opening it checks the store first (fails fast when unreachable)
    with stage_run("features", paths.root, {"features": params.features.model_dump()}, data_hash) as run_id:
        image_size = store.read_npy_header(store.split_path(paths.store, "train"))[0][1]
        check_backbone_weights(params.features, image_size)
        meta = extract(paths.store, paths.features, params.features)
        write_metrics(meta, paths.metrics / "features.json")
        log_features(run_id, paths.root, params.features, meta, paths.features, paths.store, params.data.source)
    return meta


if __name__ == "__main__":
    from flows.common import run_stage

    run_stage(features_flow)
