"""Tasks of the pipeline and retrain flows: DVC runs, tracking, source hashing."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from prefect import task

from tlpipe import tracking
from tlpipe.config import DataParams
from tlpipe.ingest import hash_source
from tlpipe.sources import list_source
from tasks.common import get_logger

STAGE_LINE = re.compile(r"Running stage '([^']+)'")


def current_prefect_api_url() -> str | None:
    """URL of the Prefect API this flow talks to (also the ephemeral server's), if any."""
    try:
        from prefect.client.orchestration import get_client

        with get_client(sync_client=True) as client:
            return str(client.api_url).rstrip("/")
    except Exception:
        return None


def dvc_command(overrides: list[str], experiment: bool, force_stages: list[str]) -> list[list[str]]:
    """The DVC command lines to run: forced stages first, then the whole pipeline."""
    dvc = [sys.executable, "-m", "dvc"]
    commands = [[*dvc, "repro", "--force", "--single-item", stage] for stage in force_stages]
    if experiment or overrides:
        commands.append([*dvc, "exp", "run", *[arg for o in overrides for arg in ("-S", o)]])
    else:
        commands.append([*dvc, "repro"])
    return commands


@task(name="open-pipeline-run", retries=2, retry_delay_seconds=[2, 8], timeout_seconds=120)
def open_pipeline_run(root: Path, overrides: list[str]) -> str:
    """Create the MLflow pipeline (parent) run that every stage run attaches to."""
    client = tracking.connect(root)
    experiment_id = tracking.ensure_experiment(client, root)
    tags = {"tlpipe.overrides": " ".join(overrides)} if overrides else {}
    return tracking.create_pipeline_run(client, experiment_id, root, tags)


@task(name="close-pipeline-run", retries=2, retry_delay_seconds=[2, 8], timeout_seconds=120)
def close_pipeline_run(root: Path, run_id: str, status: str, stages: list[str], metrics: dict) -> None:
    """Record what ran and the resulting test accuracies on the pipeline run, then end it."""
    client = tracking.connect(root)
    client.set_tag(run_id, "tlpipe.stages_ran", ",".join(stages) or "none")
    for model, values in metrics.items():
        if isinstance(values, dict) and isinstance(values.get("accuracy"), (int, float)):
            client.log_metric(run_id, f"{model}.test_accuracy", float(values["accuracy"]))
    client.set_terminated(run_id, status)


@task(name="run-dvc", timeout_seconds=6 * 3600)
def run_dvc(root: Path, overrides: list[str], experiment: bool, force_stages: list[str], env: dict) -> list[str]:
    """Run the pipeline through DVC (its cache and lock skip unchanged stages); return the stages that ran.

    Raises:
        RuntimeError: When DVC fails, with the tail of its output.
    """
    logger = get_logger()
    ran: list[str] = []
    # dvc.yaml runs `python -m flows.<stage>`: make that this interpreter, activated venv or not
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    env = {**os.environ, **env, "PATH": path}
    for command in dvc_command(overrides, experiment, force_stages):
        logger.info("$ %s", " ".join(command[2:]))
        process = subprocess.Popen(command, cwd=root, env=env, stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True, bufsize=1)
        tail: list[str] = []
        for line in process.stdout:
            sys.stdout.write(line)
            tail = (tail + [line.rstrip()])[-40:]
            if match := STAGE_LINE.search(line):
                ran.append(match.group(1))
                logger.info("stage %s started", match.group(1))
        if process.wait() != 0:
            raise RuntimeError(f"{' '.join(command[2:])} failed (exit {process.returncode}):\n" + "\n".join(tail))
    return list(dict.fromkeys(ran))


@task(name="read-results", retries=2, retry_delay_seconds=[1, 4])
def read_results(root: Path) -> tuple[dict, dict]:
    """The evaluate metrics and the promotion decision, if the pipeline produced them."""
    def read(path: Path) -> dict:
        return json.loads(path.read_text()) if path.exists() else {}

    return read(root / "metrics" / "evaluate.json"), read(root / "reports" / "evaluate" / "promotion.json")


@task(name="hash-source", retries=2, retry_delay_seconds=[2, 8], timeout_seconds=3600)
def compute_source_hash(params: DataParams) -> str:
    """Content hash of the configured source (every file's bytes, path and class)."""
    return hash_source(list_source(params.source, params.classes, params.elpv_label, params.elpv_threshold))


@task(name="read-last-source-hash")
def read_last_source_hash(root: Path) -> str | None:
    """The source hash recorded by the last ingest, if any."""
    report = root / "reports" / "ingest" / "data_report.json"
    return json.loads(report.read_text()).get("source_hash") if report.exists() else None
