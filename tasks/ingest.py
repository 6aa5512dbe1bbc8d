"""Tasks of the ingest stage."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from prefect import task

from tasks.common import get_logger, report_progress, reports_tracking_outage, retry_unless_user_error
from tlpipe.core.params import DataParams
from tlpipe.core.sources import SourceListing, list_source
from tlpipe.data import ingest, store
from tlpipe.tracking.connection import get_client
from tlpipe.tracking.records import log_datasets, log_metrics, set_tags


@task(name="list-source", retries=2, retry_delay_seconds=[1, 4], timeout_seconds=600,
      retry_condition_fn=retry_unless_user_error)
def list_source_files(params: DataParams) -> SourceListing:
    """Find candidate files and their classes in the configured source."""
    listing = list_source(params.source, params.classes, params.elpv_label, params.elpv_threshold)
    get_logger().info("source %s (%s): %d candidate files, %d rejected while listing",
                      params.source, listing.kind, len(listing.candidates), len(listing.rejections))
    return listing


@task(name="build-store")
def build_store(listing: SourceListing, params: DataParams, store_dir: Path) -> dict:
    """Decode, validate, split and write the image store; return the data report."""
    report = ingest.ingest(listing, params, store_dir, progress=report_progress("decode"))
    logger = get_logger()
    logger.info("kept %d of %d files; counts %s", report["images_kept"], report["files_found"], report["counts"])
    for item in report["rejections"]:
        logger.warning("skipped %s: %s", item["relpath"], item["reason"])
    return report


@task(name="write-data-report", retries=2, retry_delay_seconds=[1, 4])
def write_data_report(report: dict, report_dir: Path, metrics_path: Path) -> list[Path]:
    """Write the data report (JSON + rejections CSV) and the ingest metrics file."""
    rejections = pd.DataFrame(report["rejections"], columns=["relpath", "class_name", "reason"])
    store.write_json(report_dir / "data_report.json", report)
    store.write_csv(report_dir / "rejections.csv", rejections)
    counts = {split: sum(per_class.values()) for split, per_class in report["counts"].items()}
    store.write_json(metrics_path, {"images_kept": report["images_kept"], "files_found": report["files_found"],
                                    "rejected": report["rejected"], **{f"{s}_images": n for s, n in counts.items()}})
    return [report_dir / "data_report.json", report_dir / "rejections.csv", metrics_path]


@task(name="log-ingest", timeout_seconds=300)
@reports_tracking_outage("logging the ingest stage")
def log_ingest(run_id: str, root: Path, params: DataParams, report: dict, artifacts: list[Path], seconds: float,
               store_dir: Path) -> None:
    """Log the ingest stage onto its stage run: counts, data hash, the data report, the splits as datasets.

    Not retried by Prefect (MLflow retries its own requests): it writes to a run
    the flow owns, and a repeat would only log the same values again.
    """
    client = get_client(root)
    metrics = {"images_kept": report["images_kept"], "files_found": report["files_found"],
               "rejected": report["rejected"], "stage_seconds": seconds,
               "images_per_second": report["files_found"] / seconds if seconds else 0.0}
    for split, per_class in report["counts"].items():
        for class_name, count in per_class.items():
            metrics[f"count.{split}.{class_name}"] = count
    log_metrics(client, run_id, metrics)
    set_tags(client, run_id, {"tlpipe.classes": ",".join(report["classes"]), "tlpipe.source": report["source"],
                                       "tlpipe.data_hash": report["data_hash"]})
    for path in artifacts:
        client.log_artifact(run_id, str(path), "ingest")
    log_datasets(client, run_id, store_dir, params.source, store.SPLITS)
