"""Pipeline flow: run every stage through DVC (``dvc repro`` / ``dvc exp run``) under one MLflow run."""

from __future__ import annotations

from prefect import flow

from flows.common import TAGS_ENV, stage_tags
from tasks.common import get_logger
from tasks.pipeline import (
    check_inputs,
    close_pipeline_run,
    current_prefect_api_url,
    open_pipeline_run,
    publish_artifacts,
    read_results,
    run_dvc,
    tag_pipeline_run,
)
from tlpipe.core.paths import ProjectPaths, project_paths
from tlpipe.ops.lock import pipeline_lock
from tlpipe.tracking.connection import EXPERIMENT_ENV, tracking_uri
from tlpipe.tracking.tags import PARENT_ENV


@flow(name="pipeline")
def pipeline_flow(root: str | None = None, overrides: list[str] | None = None, experiment: bool = False,
                  force_stages: list[str] | None = None) -> dict:
    """Run the DVC pipeline; report the stages that ran, the metrics and the promotion decision.

    One pipeline run at a time per project: a second one fails at once, naming the
    first (an OS file lock, released by the kernel even if the holder is killed).
    The stage flow runs carry the tag ``pipeline:<this flow run id>`` (and ``tlpipe``,
    ``project:<name>``); the comparison table, the promotion decision and the MLflow
    run links are published as Prefect artifacts of this run.

    Args:
        root: Project root (resolved explicitly: deployments may run elsewhere).
        overrides: ``key=value`` param overrides, run as ``dvc exp run -S ...``.
        experiment: Run as a DVC experiment even without overrides.
        force_stages: Stages to force first (e.g. ``["ingest"]`` when the source changed).
    """
    paths = project_paths(root)
    with pipeline_lock(paths.root):
        return run_pipeline(paths, list(overrides or []), experiment, list(force_stages or []))


def run_pipeline(paths: ProjectPaths, overrides: list[str], experiment: bool, force_stages: list[str]) -> dict:
    """The body of :func:`pipeline_flow`, under the project's pipeline lock."""
    from prefect.runtime import flow_run

    tags = tag_pipeline_run([*stage_tags(paths.root), f"pipeline:{flow_run.id}"])
    check_inputs(paths.root, overrides)  # before DVC removes any output
    parent, experiment_name = open_pipeline_run(paths.root, overrides)  # the task's MLflow experiment
    env = {PARENT_ENV: parent, EXPERIMENT_ENV: experiment_name, "TLPIPE_ROOT": str(paths.root),
           TAGS_ENV: ",".join(tags), "MLFLOW_TRACKING_URI": tracking_uri(paths.root)}  # the parent run's store
    if api_url := current_prefect_api_url():
        env["PREFECT_API_URL"] = api_url  # stage flows report to this flow's Prefect server
    status, stages = "FAILED", []
    metrics, promotion = {}, {}
    try:
        stages = run_dvc(paths.root, overrides, experiment, force_stages, env)
        metrics, promotion = read_results(paths.root)
        if "evaluate" not in stages:  # DVC skipped it: the recorded decision is from an earlier run
            promotion = {"promoted": False, "reason": "evaluate did not run (its inputs are unchanged): "
                         "champion kept", "previous": promotion}
        status = "FINISHED"
    finally:
        close_pipeline_run(paths.root, parent, status, stages, metrics)
    publish_artifacts(paths.root, parent, metrics, promotion)
    logger = get_logger()
    logger.info("stages ran: %s", ", ".join(stages) or "none (everything up to date)")
    for model, values in metrics.items():
        logger.info("%-14s test accuracy %.4f", model, values.get("acc", float("nan")))
    if promotion:
        logger.info("promotion: %s", promotion.get("reason", promotion))
    return {"stages_ran": stages, "metrics": metrics, "promotion": promotion, "mlflow_run_id": parent}


if __name__ == "__main__":
    from flows.common import run_stage

    run_stage(pipeline_flow)
