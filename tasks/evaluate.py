"""Tasks of the evaluate stage: test metrics, MLflow logging, the champion gate, the report, Prefect artifacts.

Order (see ``flows/evaluate.py``): evaluate every model; write the DVC metrics;
log to MLflow (retried: it only logs); register and gate (never retried, and
idempotent per evaluate execution: :func:`tlpipe.registry.register_and_gate`);
write ``promotion.json`` and ``report.html`` (the report shows the decision, so
it comes after the gate); publish the Prefect artifacts.
"""

from __future__ import annotations

import os
from pathlib import Path

from prefect import task

from tlpipe import evaluate, registry, store, tracking
from tlpipe.config import Params
from tlpipe.models import model_file
from tlpipe.paths import ProjectPaths
from tasks.common import get_logger, log_image_model

SCALARS = ("accuracy", "balanced_accuracy", "f1_macro", "roc_auc")
DETAIL_METRICS = "evaluate_detail.json"
"""Second metrics file of the stage (next to ``evaluate.json``): balanced accuracy, macro F1, ROC AUC."""
MLFLOW_UI = "http://127.0.0.1:5000"
"""Where ``make ui`` serves MLflow by default (links when the store is a local file)."""


@task(name="evaluate-models")
def evaluate_all(paths: ProjectPaths, params: Params) -> dict:
    """Every existing model on the held-out test split; writes reports/evaluate."""
    result = evaluate.evaluate_models(paths.store, paths.features, paths.svm_models, paths.finetune_models,
                                      paths.reports("evaluate"), params.evaluate, params.svm.pixel_size)
    logger = get_logger()
    for name, values in result["metrics"].items():
        logger.info("%-14s test accuracy %.4f  balanced %.4f", name, values["accuracy"], values["balanced_accuracy"])
    for name, reason in result["skipped"].items():
        logger.warning("not evaluated: %s (%s)", name, reason)
    return result


@task(name="write-evaluate-metrics", retries=2, retry_delay_seconds=[1, 4])
def write_metrics(result: dict, metrics_dir: Path) -> dict:
    """Write ``metrics/evaluate.json`` (``{model: {acc}}``) and ``metrics/evaluate_detail.json``; numbers only."""
    accuracies, details = evaluate.dvc_metrics(result["metrics"])
    store.write_json(Path(metrics_dir) / "evaluate.json", accuracies)
    store.write_json(Path(metrics_dir) / DETAIL_METRICS, details)
    return accuracies


def find_model_runs(client, experiment_id: str, paths: ProjectPaths, models: list[str]) -> dict[str, dict]:
    """The MLflow run that logged each model file (matched by the file's hash): run id and pyfunc URI."""
    found = {}
    for name in models:
        ref = tracking.find_model_run(client, experiment_id, model_file(paths.svm_models, paths.finetune_models, name))
        if ref is not None:
            found[name] = {"run_id": ref.run_id, "pyfunc_uri": ref.model_uri}
    return found


@task(name="log-evaluation", retries=2, retry_delay_seconds=[2, 8], timeout_seconds=1800)
def log_evaluation(paths: ProjectPaths, params: Params, result: dict, data_hash: str) -> dict:
    """Log test metrics per model and the report folder; make sure the gate's candidate has a logged pyfunc.

    Only logs (a retry logs again, registers nothing). Returns the evaluate
    stage run id (the key of this execution for the gate), the experiment id,
    the candidate's pyfunc URI and each model's MLflow run.
    """
    import mlflow

    out_dir = paths.reports("evaluate")
    client = tracking.connect(paths.root)
    experiment_id = tracking.ensure_experiment(client, paths.root)
    stage_params = {"evaluate": params.evaluate.model_dump(), "registry": params.registry.model_dump()}
    with tracking.stage_run("evaluate", paths.root, stage_params, data_hash, client=client) as run_id:
        for name, values in result["metrics"].items():  # onto each model's own run and logged model
            tracking.log_test_metrics(client, experiment_id, model_file(paths.svm_models, paths.finetune_models, name),
                                      values, paths.store, params.data.source)
        mlflow.log_artifacts(str(out_dir), "evaluate")
        candidate = result["candidate"]
        model_runs = find_model_runs(client, experiment_id, paths, list(result["metrics"]))
        uri = model_runs.get(candidate, {}).get("pyfunc_uri")
        if uri is None:  # trained outside this store: log its pyfunc here, once per attempt, never registered twice
            uri = log_image_model(candidate, model_file(paths.svm_models, paths.finetune_models, candidate),
                                  paths.store, paths.features, params)
        mlflow.set_tags({"tlpipe.candidate": candidate, "tlpipe.best_on_test": result["best"]["model"]})
    return {"run_id": run_id, "experiment_id": experiment_id, "model_uri": uri,
            "model_runs": {name: found["run_id"] for name, found in model_runs.items()}}


@task(name="register-and-gate", retries=0, timeout_seconds=1800)
def register_and_gate(paths: ProjectPaths, params: Params, result: dict, evaluation: dict, data_hash: str) -> dict:
    """Register the candidate once and apply the champion gate; never retried, idempotent per execution.

    The key of this evaluate execution is its MLflow stage run id: a second
    call with it (a retry, a rerun of this task) returns the decision already
    recorded instead of registering another version. Nothing else happens
    here, so nothing after the registration can fail and trigger a repeat.
    """
    candidate = result["candidate"]
    client = tracking.connect(paths.root)
    images, labels = store.load_split(paths.store, "test")
    score = result["selection"].get(candidate)
    decision = registry.register_and_gate(
        client, params.registry.model_name, candidate, evaluation["model_uri"],
        result["metrics"][candidate]["accuracy"], images, labels, result["classes"],
        params.registry.min_improvement,
        {"tlpipe.data_hash": data_hash, "selection_score": "none" if score is None else f"{score:.4f}"},
        execution_id=evaluation["run_id"])
    get_logger().info(decision.reason)
    return {**decision.to_dict(), "selection_scores": result["selection"],
            "registered_model": params.registry.model_name, "evaluate_run_id": evaluation["run_id"]}


def mlflow_run_url(root: Path, experiment_id: str, run_id: str) -> str:
    """A link to a run in the MLflow UI (the tracking server's, or ``make ui``'s default address)."""
    uri = tracking.tracking_uri(root)
    base = uri.rstrip("/") if uri.startswith(("http://", "https://")) else MLFLOW_UI
    return f"{base}/#/experiments/{experiment_id}/runs/{run_id}"


@task(name="write-report", retries=2, retry_delay_seconds=[2, 8], timeout_seconds=600)
def write_report(paths: ProjectPaths, result: dict, promotion: dict, evaluation: dict, data_hash: str) -> str:
    """Write ``promotion.json`` and the self-contained ``report.html`` (atomically); log both to the stage run."""
    out_dir = paths.reports("evaluate")
    store.write_json(out_dir / "promotion.json", promotion)
    runs = [("evaluate stage run", mlflow_run_url(paths.root, evaluation["experiment_id"], evaluation["run_id"]))]
    runs += [(f"{name} run", mlflow_run_url(paths.root, evaluation["experiment_id"], run_id))
             for name, run_id in evaluation["model_runs"].items()]
    facts = [("Registered model", promotion["registered_model"]), ("Data hash", data_hash[:16]),
             ("MLflow evaluate run", evaluation["run_id"])]
    links = [*runs, ("Report folder", str(out_dir)),
             ("DVC", "dvc metrics show metrics/evaluate.json · make exps · dvc plots show")]
    data = evaluate.build_report(out_dir, result, promotion, paths.features, facts, links)
    path = out_dir / "report.html"
    from tlpipe.report import write_report as write_html

    write_html(path, data)
    client = tracking.connect(paths.root)
    for name in ("promotion.json", "report.html"):
        client.log_artifact(evaluation["run_id"], str(out_dir / name), "evaluate")
    client.set_tag(evaluation["run_id"], "tlpipe.promoted", str(promotion["promoted"]))
    client.set_tag(evaluation["run_id"], "tlpipe.report", str(path))
    return str(path)


def comparison_rows(result: dict) -> list[dict]:
    """Rows of the comparison table artifact: one per model, the candidate marked."""
    rows = []
    for name, values in result["metrics"].items():
        score = result["selection"].get(name)
        rows.append({"model": name, "candidate": "yes" if name == result["candidate"] else "",
                     "selection_score": score, **{key: values.get(key) for key in SCALARS}})
    return rows


def decision_markdown(promotion: dict, report_path: str) -> str:
    """The promotion decision as Markdown."""
    verdict = "**Promoted**" if promotion["promoted"] else "**Not promoted** (champion kept)"
    lines = [f"# {verdict}: {promotion['model']} v{promotion['version']}", "", promotion["reason"], "",
             "| | |", "|---|---|",
             f"| registered model | `{promotion['registered_model']}` |",
             f"| candidate test accuracy | {promotion['test_accuracy']:.4f} |",
             f"| champion before | {promotion.get('champion_version') or '–'} |",
             f"| champion accuracy on this test split | {promotion.get('champion_accuracy') or '–'} |",
             f"| report | `{report_path}` |"]
    return "\n".join(lines) + "\n"


@task(name="publish-evaluate-artifacts", retries=2, retry_delay_seconds=[1, 4], timeout_seconds=120)
def publish_artifacts(root: Path, result: dict, promotion: dict, report_path: str, evaluation: dict) -> None:
    """Prefect artifacts: the comparison table, the decision, the report's path and the MLflow runs."""
    from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact

    create_table_artifact(comparison_rows(result), key="tlpipe-model-comparison",
                          description="Test metrics per model; candidate = put forward to the champion gate "
                                      "(by CV / validation accuracy, never test accuracy)")
    create_markdown_artifact(decision_markdown(promotion, report_path), key="tlpipe-promotion",
                             description=promotion["reason"][:500])
    create_link_artifact(Path(report_path).resolve().as_uri(), link_text=f"evaluation report ({report_path})",
                         key="tlpipe-evaluation-report",
                         description="Self-contained HTML report (open the file; `tlpipe report` prints its path)")
    lines = ["| run | MLflow |", "|---|---|",
             f"| evaluate stage | [{evaluation['run_id']}]"
             f"({mlflow_run_url(root, evaluation['experiment_id'], evaluation['run_id'])}) |"]
    lines += [f"| {name} | [{run_id}]({mlflow_run_url(root, evaluation['experiment_id'], run_id)}) |"
              for name, run_id in evaluation["model_runs"].items()]
    note = "" if os.environ.get("MLFLOW_TRACKING_URI") else "\n\nLocal store: start the UI with `make ui` first.\n"
    create_markdown_artifact("\n".join(lines) + note, key="tlpipe-mlflow-runs",
                             description="MLflow runs of this evaluation and of each model")
