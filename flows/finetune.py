"""Finetune stage flow: frozen-base and multi-layer-concat networks with augmentation."""

from __future__ import annotations

from prefect import flow

from tlpipe import store
from tlpipe.config import load_params
from tlpipe.ingest import hash_manifest
from tlpipe.models import NETWORK_MODELS
from tlpipe.paths import project_paths
from tasks.common import check_tracking
from tasks.features import check_backbone_weights
from tasks.finetune import log_networks, train, write_metrics


@flow(name="finetune")
def finetune_flow(root: str | None = None, kinds: list[str] | None = None) -> dict:
    """Train ``frozen`` and ``concat`` into ``models/finetune``; log to MLflow.

    Args:
        root: Project root (default: found from the working directory).
        kinds: Which networks (default both).
    """
    paths = project_paths(root)
    params = load_params(paths.params)
    check_tracking(paths.root)
    image_size = store.read_npy_header(store.split_path(paths.store, "train"))[0][1]
    check_backbone_weights(params.features, image_size)
    results = train(paths.store, paths.finetune_models, params, list(kinds or NETWORK_MODELS))
    write_metrics(results, paths.metrics / "finetune.json")
    log_networks(paths.root, params, results, paths.finetune_models, paths.store,
                 hash_manifest(store.load_manifest(paths.store)))
    return results


if __name__ == "__main__":
    from flows.common import run_stage

    run_stage(finetune_flow)
