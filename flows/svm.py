"""SVM stage flow: linear SVMs on CNN features, concatenated features and raw pixels."""

from __future__ import annotations

from prefect import flow

from tasks.svm import log_svms, train, write_metrics
from tlpipe.core.paths import project_paths
from tlpipe.core.task import load_stage_params
from tlpipe.data import store
from tlpipe.data.ingest import hash_manifest
from tlpipe.tracking.runs import stage_run


@flow(name="svm")
def svm_flow(root: str | None = None) -> dict:
    """Fit ``svm_features``, ``svm_concat`` and ``svm_pixels`` into ``models/svm``; log to MLflow.

    Args:
        root: Project root (default: found from the working directory).
    """
    paths = project_paths(root)
    params = load_stage_params(paths.params, paths.selection)
    data_hash = hash_manifest(store.load_manifest(paths.store))
    stage_params = {"svm": params.svm.model_dump(), "data": {"resize_mode": params.data.resize_mode},
                    "features": {"backbone": params.features.backbone, "weights": params.features.weights}}
    # the stage run spans the work; opening it checks the store first (fails fast when unreachable)
    with stage_run("svm", paths.root, stage_params, data_hash) as run_id:
        summaries = train(paths.store, paths.features, paths.svm_models, params)
        write_metrics(summaries, paths.metrics / "svm.json")
        log_svms(run_id, paths.root, params, summaries, paths.svm_models, paths.store, paths.features, data_hash)
    return summaries


if __name__ == "__main__":
    from flows.common import run_stage

    run_stage(svm_flow)
