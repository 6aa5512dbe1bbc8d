"""Features stage flow: image store -> pooled final and mid-level backbone features."""

from __future__ import annotations

from prefect import flow

from tasks.common import load_stage_inputs
from tasks.features import check_backbone_weights, extract, log_features, write_metrics
from tlpipe.core.task import stage_param_values
from tlpipe.tracking.runs import stage_run


@flow(name="features")
def features_flow(root: str | None = None) -> dict:
    """Extract features for train/val/test into ``data/features``; log to MLflow.

    Args:
        root: Project root (default: found from the working directory).
    """
    stage = load_stage_inputs(root)
    paths, params = stage.paths, stage.params
    # the stage run spans the work; opening it checks the store first (fails fast when unreachable)
    stage_params = stage_param_values(params, paths.root, "features")  # dvc.yaml's list for the stage
    with stage_run("features", paths.root, stage_params, stage.data_hash) as run_id:
        check_backbone_weights(params.features, paths.store)
        meta = extract(paths.store, paths.features, params.features)
        write_metrics(meta, paths.stage_metrics("features"))
        log_features(run_id, paths.root, params.features, meta, paths.features, paths.store, params.data.source)
    return meta


if __name__ == "__main__":
    from flows.common import run_stage

    run_stage(features_flow)
