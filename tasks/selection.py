"""Tasks of the select stage: the race's images, one probe per candidate and round, the outputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks.common import get_logger, report_progress, reports_tracking_outage, retry_unless_user_error
from tlpipe.core.params import Params
from tlpipe.data import store
from tlpipe.features.extraction import normalise_weights
from tlpipe.tracking.connection import get_client
from tlpipe.tracking.records import log_metrics, set_tags
from tlpipe.train import selection


@task(name="split-source", cache_policy=NO_CACHE, retry_condition_fn=retry_unless_user_error)
def split_source(params: Params, work_dir: Path) -> selection.TrainSplit:
    """The train split exactly as ingest will make it, in selection order."""
    split = selection.split_train(params, work_dir, report_progress("select: split"))
    get_logger().info("train split: %d of %d images", len(split.labels), split.total_images)
    return split


@task(name="decode-race-images", cache_policy=NO_CACHE)
def decode_images(split: selection.TrainSplit, count: int, side: int, params: Params, work_dir: Path) -> Path:
    """Decode the race's train images at the largest side raced."""
    path = selection.decode_race_images(split, count, side, params, work_dir)
    get_logger().info("race images: the first %d of %d train images, at %d px", count, len(split.labels), side)
    return path


@task(name="probe-candidate", cache_policy=NO_CACHE, task_run_name="probe-{candidate.name}-round-{round_index}")
def probe(candidate: selection.Candidate, images_path: Path, labels: np.ndarray, images: int, round_index: int,
          cache_dir: Path, params: Params) -> selection.ProbeResult:
    """Score one candidate: its linear probe's CV accuracy on the round's train images."""
    result = selection.probe_candidate(candidate, images_path, labels, images, round_index, cache_dir,
                                       params.select, normalise_weights(params.features.weights),
                                       params.select.batch_size)
    get_logger().info("round %d, %s on %d images: CV accuracy %.4f ± %.4f (C=%g; %.1f s features, %.1f s probe)",
                      round_index, candidate.name, images, result.cv_accuracy, result.cv_std, result.best_c,
                      result.extract_seconds, result.probe_seconds)
    return result


def decide(candidates: list[selection.Candidate], results: list, excluded: dict, plan: list[int], budget: float,
           seconds: float) -> tuple[selection.Candidate, pd.DataFrame, dict]:
    """The race's outcome: the choice (by the last round's scores), the candidates table and the summary."""
    last = [r for r in results if r.round == len(plan) - 1]
    choice = selection.choose(candidates, last)
    table = selection.candidates_table(candidates, results, choice, excluded)
    return choice, table, selection.race_summary(table, choice, plan, budget, seconds)


@task(name="write-selection", cache_policy=NO_CACHE)
def write_outputs(choice: selection.Candidate, table: pd.DataFrame, summary: dict, selection_path: Path,
                  report_dir: Path, metrics_path: Path) -> None:
    """Write the candidates table and race summary, the DVC metric, then the choice (``data/selection.json``)."""
    store.write_csv(report_dir / "candidates.csv", table)
    store.write_json(report_dir / "race.json", summary)
    store.write_json(metrics_path, selection.metrics_payload(choice, table))
    store.write_json(selection_path, selection.selection_payload(choice))  # last: it is what the next stages read
    get_logger().info("chosen: %s (%s)", choice.name,
                      "pinned in params.yaml" if len(table) == 1 else f"CV accuracy {summary['cv_accuracy']}")


@task(name="log-selection", timeout_seconds=300, cache_policy=NO_CACHE)
@reports_tracking_outage("logging the selection")
def log_selection(run_id: str, root: Path, choice: selection.Candidate, summary: dict, report_dir: Path) -> None:
    """Log the choice, each candidate's CV accuracy and the candidates table onto the stage run."""
    client = get_client(root)
    values = {"seconds": summary["seconds"], "budget_gflops": summary["budget_gflops"]}
    if summary["cv_accuracy"] is not None:
        values["cv_accuracy"] = summary["cv_accuracy"]
    for name, row in summary["candidates"].items():
        if row["cv_accuracy"] is not None:
            values[f"cv_accuracy.{name.replace('@', '_')}"] = row["cv_accuracy"]  # MLflow keys: no @
    log_metrics(client, run_id, values)
    set_tags(client, run_id, {"tlpipe.choice": choice.name, "tlpipe.backbone": choice.backbone,
                                       "tlpipe.image_size": str(choice.image_size)})
    for name in ("candidates.csv", "race.json"):
        client.log_artifact(run_id, str(report_dir / name), "select")
