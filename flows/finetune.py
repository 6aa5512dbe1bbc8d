"""Finetune stage flow: frozen-base and multi-layer-concat networks with augmentation."""

from __future__ import annotations

from prefect import flow

from tasks.common import load_stage_inputs
from tasks.features import check_backbone_weights
from tasks.finetune import log_networks, train, write_metrics
from tlpipe.core.names import NETWORK_MODELS
from tlpipe.core.task import stage_param_values
from tlpipe.tracking.runs import stage_run


@flow(name="finetune")
def finetune_flow(root: str | None = None, kinds: list[str] | None = None) -> dict:
    """Train ``frozen`` and ``concat`` into ``models/finetune``; log to MLflow.

    Args:
        root: Project root (default: found from the working directory).
        kinds: Which networks (default both).
    """
    stage = load_stage_inputs(root)
    paths, params, data_hash = stage.paths, stage.params, stage.data_hash
    stage_params = stage_param_values(params, paths.root, "finetune")  # dvc.yaml's list for the stage
    # the stage run spans the work; opening it checks the store first (fails fast when unreachable)
    with stage_run("finetune", paths.root, stage_params, data_hash) as run_id:
        check_backbone_weights(params.features, paths.store)
        results = train(paths.store, paths.finetune_models, params, list(kinds or NETWORK_MODELS))
        write_metrics(results, paths.stage_metrics("finetune"))
        log_networks(run_id, paths.root, params, results, paths.finetune_models, paths.store, data_hash)
    return results


if __name__ == "__main__":
    from flows.common import run_stage

    run_stage(finetune_flow)
