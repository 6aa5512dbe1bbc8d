"""Tasks of the pipeline and retrain flows: DVC runs, tracking, source hashing."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

from prefect import task

from tasks.common import get_logger, retry_unless_user_error
from tlpipe.core.errors import UserError
from tlpipe.core.paths import project_paths
from tlpipe.core.task import check_run_inputs
from tlpipe.ops.dvc import capture_dvc, dvc_command, dvc_env
from tlpipe.ops.process_group import guarded_group
from tlpipe.tracking.connection import connect, ensure_experiment, experiment_name
from tlpipe.tracking.records import log_datasets
from tlpipe.tracking.runs import create_pipeline_run

STAGE_LINE = re.compile(r"Running stage '([^']+)'")
ERROR_LINE = re.compile(r"(^tlpipe [\w-]+: error: |^ERROR: )")


class StageFailedError(UserError, RuntimeError):
    """A DVC command of the pipeline failed; its output (streamed above) holds the stage's own error."""


def current_prefect_api_url() -> str | None:
    """URL of the Prefect API this flow talks to (also the ephemeral server's), if any.

    None (with a warning) when Prefect cannot say: the stages then choose their own server.
    """
    try:
        from prefect.client.orchestration import get_client

        with get_client(sync_client=True) as client:
            return str(client.api_url).rstrip("/")
    except Exception as error:
        get_logger().warning(
            "could not read this flow's Prefect API URL (%s: %s); the stages will report to the server they "
            "find themselves ($PREFECT_API_URL, else the project's), so their flow runs may not appear beside "
            "this one", type(error).__name__, error)
        return None


def dvc_commands(overrides: list[str], experiment: bool, force_stages: list[str]) -> list[list[str]]:
    """The DVC command lines to run: forced stages first, then the whole pipeline."""
    commands = [dvc_command("repro", "--force", "--single-item", stage) for stage in force_stages]
    if experiment or overrides:
        commands.append(dvc_command("exp", "run", *[arg for o in overrides for arg in ("-S", o)]))
    else:
        commands.append(dvc_command("repro"))
    return commands


@task(name="open-pipeline-run", retries=2, retry_delay_seconds=[2, 8], timeout_seconds=120,
      retry_condition_fn=retry_unless_user_error)
@task(name="check-inputs", retries=0)
def check_inputs(root: Path, overrides: list[str]) -> None:
    """Reject a bad ``params.yaml`` (or ``-S`` override) and a missing source before DVC starts: DVC would
    remove the first stage's outputs before that stage rejects them (:func:`tlpipe.core.task.check_run_inputs`)."""
    check_run_inputs(root, overrides)


def open_pipeline_run(root: Path, overrides: list[str]) -> tuple[str, str]:
    """Create the MLflow pipeline (parent) run that every stage run attaches to, in the experiment of the
    task the run is for (``params.yaml`` with ``overrides``); return its id and that experiment's name."""
    client = connect(root)
    experiment = experiment_name(root, overrides)
    experiment_id = ensure_experiment(client, root, experiment)
    tags = {"tlpipe.overrides": " ".join(overrides)} if overrides else {}
    return create_pipeline_run(client, experiment_id, root, tags), experiment


@task(name="close-pipeline-run", retries=2, retry_delay_seconds=[2, 8], timeout_seconds=120)
def close_pipeline_run(root: Path, run_id: str, status: str, stages: list[str], metrics: dict) -> None:
    """Record what ran, the data set's splits (the runs table's Dataset column) and the resulting test
    accuracies on the pipeline run, then end it."""
    client = connect(root)
    client.set_tag(run_id, "tlpipe.stages_ran", ",".join(stages) or "none")
    log_store_splits(client, root, run_id)
    for model, values in metrics.items():
        if isinstance(values, dict) and isinstance(values.get("acc"), (int, float)):  # metrics/evaluate.json
            client.log_metric(run_id, f"{model}.test_accuracy", float(values["acc"]))
    client.set_terminated(run_id, status)


def log_store_splits(client, root: Path, run_id: str) -> None:
    """Log the project store's splits as dataset inputs of the pipeline run, when there is a store.

    Never raises (it runs while the pipeline run is closed, maybe after a failure): a problem is a warning.
    """
    from tlpipe.core.params import load_params
    from tlpipe.core.paths import project_paths
    from tlpipe.data import store

    store_dir = project_paths(root).store
    if not (store_dir / store.MANIFEST).is_file():
        return
    try:
        source = load_params(Path(root) / "params.yaml").data.source
        log_datasets(client, run_id, store_dir, source, store.SPLITS)
    except Exception as error:  # noqa: BLE001 - the pipeline's own outcome matters more
        get_logger().warning("could not log the data set on the pipeline run: %s: %s", type(error).__name__, error)


@task(name="run-dvc", timeout_seconds=6 * 3600)
def run_dvc(root: Path, overrides: list[str], experiment: bool, force_stages: list[str], env: dict) -> list[str]:
    """Run the pipeline through DVC (its cache and lock skip unchanged stages); return the stages that ran.

    Raises:
        StageFailedError: When DVC fails: the stage that failed and its error line (the
            full output was streamed already).
    """
    logger = get_logger()
    ran: list[str] = []
    env = dvc_env(env)  # dvc.yaml runs `bin/python -m flows.<stage>`: this interpreter, activated venv or not
    for command in dvc_commands(overrides, experiment, force_stages):
        logger.info("$ %s", " ".join(command[2:]))
        # its own process group, stopped (with the stage processes) however this task ends; a watchdog
        # stops it if this process is SIGKILLed (tlpipe.ops.process_group). The pipeline lock outlives it.
        with guarded_group(command, "dvc", cwd=root, env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True, bufsize=1) as process:
            tail: list[str] = []
            for line in process.stdout:
                sys.stdout.write(line)
                tail = (tail + [line.rstrip()])[-40:]
                if match := STAGE_LINE.search(line):
                    ran.append(match.group(1))
                    logger.info("stage %s started", match.group(1))
            code = process.wait()
        if code != 0:
            raise StageFailedError(failure_message(command[2:], code, ran, tail))
    return list(dict.fromkeys(ran))


def failure_message(command: list[str], code: int, ran: list[str], tail: list[str]) -> str:
    """One line: which DVC command and stage failed, and the stage's own error line when it printed one."""
    errors = [line.strip() for line in tail if ERROR_LINE.search(line.strip())]
    stage = f" in stage '{ran[-1]}'" if ran else ""
    reason = errors[0] if errors else "see its output above"
    return f"{' '.join(command)} failed (exit {code}){stage}: {reason}"


@task(name="tag-pipeline-run")
def tag_pipeline_run(tags: list[str]) -> list[str]:
    """Add ``tags`` to this flow run (the pipeline run's own id is known only once it runs); return them all."""
    from prefect.client.orchestration import get_client
    from prefect.runtime import flow_run

    with get_client(sync_client=True) as client:
        run = client.read_flow_run(flow_run.id)
        merged = list(dict.fromkeys([*(run.tags or []), *tags]))
        client.update_flow_run(run.id, tags=merged)
    return merged


@task(name="publish-artifacts", retries=2, retry_delay_seconds=[1, 4])
def publish_artifacts(root: Path, pipeline_run_id: str, metrics: dict, promotion: dict) -> dict[str, str]:
    """Publish the comparison table, the promotion decision and the MLflow run links as Prefect artifacts.

    Returns:
        ``{artifact key: artifact id}``.
    """
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    from tlpipe.evaluation import pipeline_summary as summary

    detail = project_paths(root).stage_metrics("evaluate_detail")
    metrics = summary.merge_metrics(metrics, json.loads(detail.read_text()) if detail.is_file() else {})
    client = connect(root)
    pipeline, stages, models = summary.find_runs(client, pipeline_run_id)
    project = root.name
    keys = {name: summary.artifact_key(project, f"pipeline-{name}")
            for name in ("model-comparison", "promotion", "mlflow-runs")}
    ids = {
        keys["model-comparison"]: create_table_artifact(
            table=summary.comparison_rows(metrics, models), key=keys["model-comparison"],
            description=f"Test metrics of every model of {project}, best first (MLflow pipeline run "
                        f"{pipeline_run_id})"),
        keys["promotion"]: create_markdown_artifact(
            markdown=summary.promotion_markdown(promotion), key=keys["promotion"],
            description=f"Champion gate decision of {project}"),
        keys["mlflow-runs"]: create_markdown_artifact(
            markdown=summary.links_markdown(pipeline, stages, models, root / "reports" / "evaluate" / "report.html"),
            key=keys["mlflow-runs"], description=f"MLflow runs of this {project} pipeline execution"),
    }
    return {key: str(value) for key, value in ids.items()}


@task(name="read-results", retries=2, retry_delay_seconds=[1, 4])
def read_results(root: Path) -> tuple[dict, dict]:
    """The evaluate metrics and the promotion decision, if the pipeline produced them."""
    def read(path: Path) -> dict:
        return json.loads(path.read_text()) if path.exists() else {}

    return read(project_paths(root).stage_metrics("evaluate")), read(root / "reports" / "evaluate" / "promotion.json")


class DvcStatusError(UserError, RuntimeError):
    """``dvc status`` failed (e.g. an invalid dvc.yaml or params.yaml); the message carries DVC's."""


@task(name="dvc-status", timeout_seconds=3600)
def dvc_status(root: Path) -> dict[str, list]:
    """DVC's own verdict on what is stale: ``dvc status --json``, stage -> changes; empty when up to date.

    The same signal ``dvc repro`` acts on: every file of a folder source (ingest depends on
    ``${data.source}``), the ELPV pin (``./elpv``), code, params and missing outputs. DVC hashes
    a folder source once and then only re-reads files whose size or mtime changed.

    Raises:
        DvcStatusError: When DVC fails, with its message.
    """
    result = capture_dvc(root, ["status", "--json"], timeout_s=3600)
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    if result.returncode != 0 or not lines:
        detail = (result.stderr or result.stdout).strip().splitlines()
        raise DvcStatusError(f"dvc status failed in {root} (exit {result.returncode}): "
                             f"{detail[-1] if detail else 'no output'}")
    return json.loads(lines[-1])
