"""Retrain flow for the schedule: rerun the pipeline when the source data changed."""

from __future__ import annotations

from prefect import flow

from tlpipe.config import load_params
from tlpipe.paths import project_paths
from tasks.common import get_logger
from tasks.pipeline import compute_source_hash, read_last_source_hash
from flows.pipeline import pipeline_flow


@flow(name="retrain")
def retrain_flow(root: str | None = None, force: bool = False) -> dict:
    """Hash the source; if it changed since the last ingest (or ``force``), rerun the pipeline.

    The evaluate stage applies the quality gate: the new best model becomes the
    ``champion`` only if it beats the current champion on the same test data.
    """
    paths = project_paths(root)
    params = load_params(paths.params)
    logger = get_logger()
    current = compute_source_hash(params.data)
    previous = read_last_source_hash(paths.root)
    if not force and current == previous:
        logger.info("source unchanged (%s): nothing to retrain; champion kept", current[:12])
        return {"retrained": False, "source_hash": current, "reason": "source unchanged"}
    logger.info("source changed (%s -> %s): rerunning the pipeline", (previous or "none")[:12], current[:12])
    result = pipeline_flow(root=str(paths.root), force_stages=["ingest"] if previous else [])
    return {"retrained": True, "source_hash": current, **result}


if __name__ == "__main__":
    retrain_flow()
