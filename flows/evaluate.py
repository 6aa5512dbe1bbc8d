"""Evaluate stage flow: every model on the same held-out test split, the champion gate, the report."""

from __future__ import annotations

from prefect import flow

from tasks.common import check_tracking, load_stage_inputs
from tasks.evaluate import (
    evaluate_all,
    log_evaluation,
    publish_artifacts,
    register_and_gate,
    write_metrics,
    write_report,
)
from tlpipe.core.task import stage_param_values
from tlpipe.tracking.runs import stage_run


@flow(name="evaluate")
def evaluate_flow(root: str | None = None) -> dict:
    """Evaluate all models into ``reports/evaluate`` and ``metrics/evaluate*.json``; gate the champion; report.

    The gate runs once, after the (retried) logging; the report is written
    after the gate because it shows the decision.

    Args:
        root: Project root (default: found from the working directory).
    """
    stage = load_stage_inputs(root)
    paths, params, data_hash = stage.paths, stage.params, stage.data_hash
    check_tracking(paths.root)
    stage_params = stage_param_values(params, paths.root, "evaluate")  # dvc.yaml's list for the stage
    with stage_run("evaluate", paths.root, stage_params, data_hash) as run_id:  # spans the stage's work
        result = evaluate_all(paths, params)
        accuracies = write_metrics(result, paths)
        evaluation = log_evaluation(paths, params, result, data_hash, run_id)
        promotion = register_and_gate(paths, params, result, evaluation, data_hash)
        report = write_report(paths, result, promotion, evaluation, data_hash)
        publish_artifacts(paths.root, result, promotion, report, evaluation)
    return {"metrics": accuracies, "promotion": promotion, "report": report}


if __name__ == "__main__":
    from flows.common import run_stage

    run_stage(evaluate_flow)
