"""SVM stage flow: linear SVMs on CNN features, concatenated features and raw pixels."""

from __future__ import annotations

from prefect import flow

from tasks.common import load_stage_inputs
from tasks.svm import log_svms, train, write_metrics
from tlpipe.core.task import stage_param_values
from tlpipe.tracking.runs import stage_run


@flow(name="svm")
def svm_flow(root: str | None = None) -> dict:
    """Fit ``svm_features``, ``svm_concat`` and ``svm_pixels`` into ``models/svm``; log to MLflow.

    Args:
        root: Project root (default: found from the working directory).
    """
    stage = load_stage_inputs(root)
    paths, params, data_hash = stage.paths, stage.params, stage.data_hash
    stage_params = stage_param_values(params, paths.root, "svm")  # dvc.yaml's list for the stage
    # the stage run spans the work; opening it checks the store first (fails fast when unreachable)
    with stage_run("svm", paths.root, stage_params, data_hash) as run_id:
        summaries = train(paths.store, paths.features, paths.svm_models, params)
        write_metrics(summaries, paths.stage_metrics("svm"))
        log_svms(run_id, paths.root, params, summaries, paths.svm_models, paths.store, paths.features, data_hash)
    return summaries


if __name__ == "__main__":
    from flows.common import run_stage

    run_stage(svm_flow)
