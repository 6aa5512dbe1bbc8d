"""Retrain flow for the schedule: rerun the pipeline when DVC says its inputs changed."""

from __future__ import annotations

from prefect import flow

from flows.pipeline import pipeline_flow
from tasks.common import get_logger
from tasks.pipeline import dvc_status
from tlpipe.core.paths import project_paths
from tlpipe.core.task import check_run_inputs

UP_TO_DATE = "DVC: data and pipelines are up to date; champion kept"


def describe(stale: dict[str, list]) -> str:
    """One line per stale stage from ``dvc status --json``: ``ingest: /src (modified), ...``."""
    parts = []
    for stage, changes in stale.items():
        items = []
        for change in changes:
            if isinstance(change, dict):
                for kind, paths in change.items():
                    items += [f"{path} ({state})" for path, state in paths.items()] if isinstance(paths, dict) \
                        else [kind]
            else:
                items.append(str(change))
        parts.append(f"{stage}: {', '.join(items)}")
    return "; ".join(parts)


@flow(name="retrain")
def retrain_flow(root: str | None = None, force: bool = False) -> dict:
    """Ask DVC what is stale (``dvc status``); when anything is, or with ``force``, rerun the pipeline.

    DVC's signal is the one ``dvc repro`` acts on: images added, removed or edited in a
    folder source (ingest depends on ``${data.source}``), a new ELPV pin, code, params,
    missing outputs. The pipeline then reruns exactly the stale stages; ``force`` also
    rebuilds the store from the source (stages after it rerun only if it changed). The
    evaluate stage applies the quality gate: the new best model becomes the ``champion``
    only if it beats the current champion on the same test data.

    Returns:
        ``retrained``, ``stale`` (DVC's status: stage -> changes) and, when it ran, the
        pipeline flow's result (``stages_ran``, ``metrics``, ``promotion``, ...).
    """
    paths = project_paths(root)
    check_run_inputs(paths.root)  # a bad params.yaml or a missing source fails here, before DVC runs
    logger = get_logger()
    stale = dvc_status(paths.root)
    if not stale and not force:
        logger.info(UP_TO_DATE)
        return {"retrained": False, "stale": {}, "reason": UP_TO_DATE}
    logger.info("rerunning the pipeline: %s", describe(stale) if stale else "forced")
    result = pipeline_flow(root=str(paths.root), force_stages=["ingest"] if force else [])
    return {"retrained": True, "stale": stale, **result}


if __name__ == "__main__":
    from flows.common import run_stage

    run_stage(retrain_flow)
