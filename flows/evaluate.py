"""Evaluate stage flow: every model on the same held-out test split, reports, registry gate."""

from __future__ import annotations

from prefect import flow

from tlpipe import store
from tlpipe.config import load_params
from tlpipe.ingest import hash_manifest
from tlpipe.paths import project_paths
from tasks.common import check_tracking
from tasks.evaluate import evaluate_all, log_evaluation, write_metrics


@flow(name="evaluate")
def evaluate_flow(root: str | None = None) -> dict:
    """Evaluate all models into ``reports/evaluate`` and ``metrics/evaluate.json``; gate the champion.

    Args:
        root: Project root (default: found from the working directory).
    """
    paths = project_paths(root)
    params = load_params(paths.params)
    check_tracking(paths.root)
    result = evaluate_all(paths, params)
    flat = write_metrics(result, paths.metrics / "evaluate.json")
    promotion = log_evaluation(paths, params, result, hash_manifest(store.load_manifest(paths.store)))
    return {"metrics": flat, "promotion": promotion}


if __name__ == "__main__":
    from flows.common import run_stage

    run_stage(evaluate_flow)
