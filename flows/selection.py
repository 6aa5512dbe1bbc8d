"""Select stage flow: choose the backbone and input side by a linear probe's CV accuracy on train."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from prefect import flow, unmapped
from prefect.task_runners import ThreadPoolTaskRunner

from tasks.selection import decide, decode_images, log_selection, probe, split_source, write_outputs
from tlpipe.core.params import load_params
from tlpipe.core.paths import project_paths
from tlpipe.core.task import stage_param_values
from tlpipe.tracking.runs import stage_run
from tlpipe.train import selection


@flow(name="select", task_runner=ThreadPoolTaskRunner(max_workers=1))  # one probe at a time: each uses every core
def select_flow(root: str | None = None) -> dict:
    """Race the candidate backbones and sides; write ``data/selection.json``; log to MLflow.

    Args:
        root: Project root (default: found from the working directory).
    """
    paths = project_paths(root)
    params = load_params(paths.params)
    stage_params = stage_param_values(params, paths.root, "select")  # dvc.yaml's list for the stage
    with stage_run("select", paths.root, stage_params) as run_id:
        start = time.perf_counter()
        candidates, excluded = selection.list_candidates(params), {}
        results, plan, budget = [], [], 0.0
        if len(candidates) > 1:
            with tempfile.TemporaryDirectory(prefix="tlpipe-select-") as work:
                split = split_source(params, Path(work))
                candidates, excluded = selection.afford(candidates, len(split.labels), params.select)
                if len(candidates) > 1:
                    plan, budget = selection.plan_race(params, candidates, split)
                    side = max(c.image_size for c in candidates)
                    images = decode_images(split, plan[-1], side, params, Path(work))
                    labels = split.labels[:plan[-1]]
                    alive = candidates
                    for index, count in enumerate(plan):
                        futures = probe.map(alive, unmapped(images), unmapped(labels), unmapped(count),
                                            unmapped(index), unmapped(Path(work)), unmapped(params))
                        scored = [future.result() for future in futures]
                        results += scored
                        alive = selection.next_candidates(alive, scored, params.select.eta)
        choice, table, summary = decide(candidates, results, excluded, plan, budget, time.perf_counter() - start)
        report_dir = paths.reports("select")
        write_outputs(choice, table, summary, paths.selection, report_dir, paths.stage_metrics("select"))
        log_selection(run_id, paths.root, choice, summary, report_dir)
    return selection.selection_payload(choice)


if __name__ == "__main__":
    from flows.common import run_stage

    run_stage(select_flow)
