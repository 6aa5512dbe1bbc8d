"""Ingest stage flow: source folder or package -> validated, split, uint8 image store."""

from __future__ import annotations

import time

from prefect import flow

from tasks.ingest import build_store, list_source_files, log_ingest, write_data_report
from tlpipe.core.paths import project_paths
from tlpipe.core.task import load_stage_params, stage_param_values
from tlpipe.tracking.runs import stage_run


@flow(name="ingest")
def ingest_flow(root: str | None = None) -> dict:
    """Validate the source, split it and write ``data/store``; log to MLflow.

    Args:
        root: Project root (default: found from the working directory).
    """
    paths = project_paths(root)
    params = load_stage_params(paths.params, paths.selection)
    # the stage run spans the work; opening it checks the store first (fails fast when unreachable)
    stage_params = stage_param_values(params, paths.root, "ingest")  # dvc.yaml's list for the stage
    with stage_run("ingest", paths.root, stage_params) as run_id:
        start = time.perf_counter()
        listing = list_source_files(params.data)
        report = build_store(listing, params.data, paths.store)
        artifacts = write_data_report(report, paths.reports("ingest"), paths.stage_metrics("ingest"))
        log_ingest(run_id, paths.root, params.data, report, artifacts, time.perf_counter() - start, paths.store)
    return {k: report[k] for k in ("images_kept", "files_found", "rejected", "counts", "data_hash")}


if __name__ == "__main__":
    from flows.common import run_stage

    run_stage(ingest_flow)
