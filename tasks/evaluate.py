"""Tasks of the evaluate stage: test metrics, MLflow logging, the champion gate, the report, Prefect artifacts.

Order (see ``flows/evaluate.py``): evaluate every model; write the DVC metrics;
log to MLflow (retried: it only logs); register and gate (never retried, and
idempotent per evaluate execution: :func:`tlpipe.tracking.registry.register_and_gate`);
write ``promotion.json`` and ``report.html`` (the report shows the decision, so
it comes after the gate); publish the Prefect artifacts.
"""

from __future__ import annotations

from pathlib import Path

from prefect import task

from tasks.common import get_logger, log_image_model
from tlpipe.core.hashing import file_sha256
from tlpipe.core.names import ENSEMBLE_MODEL, model_file
from tlpipe.core.params import Params
from tlpipe.core.paths import ProjectPaths
from tlpipe.core.task import resolve_task
from tlpipe.data import store
from tlpipe.evaluation import ensemble, evaluate
from tlpipe.evaluation.metrics import dvc_metrics
from tlpipe.evaluation.report import build_report
from tlpipe.ops.pause import pause_point
from tlpipe.render.formats import format_score, round_score
from tlpipe.tracking import registry
from tlpipe.tracking.connection import connect, ensure_experiment
from tlpipe.tracking.records import find_model_run, log_datasets, log_metrics, log_params, log_test_metrics, set_tags
from tlpipe.tracking.runs import model_run
from tlpipe.tracking.tags import MODEL_ID_TAG, MODEL_SHA_TAG, MODEL_TAG, PYFUNC_URI_TAG, TASK_TAG
from tlpipe.train import selection

DETAIL_METRICS = "evaluate_detail"
"""Second metrics file of the stage (next to ``evaluate.json``): balanced accuracy, macro F1, ROC AUC."""


@task(name="evaluate-models")
def evaluate_all(paths: ProjectPaths, params: Params) -> dict:
    """Every existing model on the held-out test split; writes reports/evaluate."""
    result = evaluate.evaluate_models(paths.store, paths.features, paths.svm_models, paths.finetune_models,
                                      paths.reports("evaluate"), params.evaluate, params.svm.pixel_size)
    result["dataset"] = evaluate.describe_dataset(paths.store, params.data)
    logger = get_logger()
    for name, values in result["metrics"].items():
        logger.info("%-14s test accuracy %s  balanced %s", name, format_score(values["accuracy"]),
                    format_score(values["balanced_accuracy"]))
    for name, reason in result["skipped"].items():
        logger.warning("not evaluated: %s (%s)", name, reason)
    return result


@task(name="write-evaluate-metrics", retries=2, retry_delay_seconds=[1, 4])
def write_metrics(result: dict, paths: ProjectPaths) -> dict:
    """Write ``metrics/evaluate.json`` (``{model: {acc}}``) and ``metrics/evaluate_detail.json``; numbers only."""
    accuracies, details = dvc_metrics(result["metrics"])
    store.write_json(paths.stage_metrics("evaluate"), accuracies)
    store.write_json(paths.stage_metrics(DETAIL_METRICS), details)
    return accuracies


def model_path(paths: ProjectPaths, name: str) -> Path:
    """A model's file: a trained model's ``.joblib``/``.keras``, or the kept ensemble's ``ensemble.json``."""
    if name == ENSEMBLE_MODEL:
        return ensemble.spec_path(paths.reports("evaluate"))
    return model_file(paths.svm_models, paths.finetune_models, name)


def find_model_runs(client, experiment_id: str, paths: ProjectPaths, models: list[str]) -> dict[str, dict]:
    """The MLflow run that logged each model file (matched by the file's hash): run id and pyfunc URI."""
    found = {}
    for name in models:
        ref = find_model_run(client, experiment_id, model_path(paths, name))
        if ref is not None:
            found[name] = {"run_id": ref.run_id, "pyfunc_uri": ref.model_uri}
    return found


@task(name="log-evaluation", retries=2, retry_delay_seconds=[2, 8], timeout_seconds=1800)
def log_evaluation(paths: ProjectPaths, params: Params, result: dict, data_hash: str, stage_run_id: str) -> dict:
    """Log test metrics per model and the report folder; make sure the gate's candidate has a logged pyfunc.

    Only logs (a retry logs again, registers nothing), onto the evaluate stage run
    ``stage_run_id`` that the flow opened. Returns that run id (the key of this
    execution for the gate), the experiment id, the candidate's pyfunc URI and each
    model's MLflow run.
    """
    pause_point("evaluate.logging")  # metrics published, not yet logged: a fault test acts here
    out_dir = paths.reports("evaluate")
    client = connect(paths.root)
    experiment_id = ensure_experiment(client, paths.root)
    run_id = stage_run_id
    log_ensemble_tries(client, run_id, result.get("ensemble"))
    if ENSEMBLE_MODEL in result["metrics"]:  # its own model run first, so its test metrics land on it below
        log_ensemble(client, experiment_id, run_id, paths, params, result, data_hash)
    for name, values in result["metrics"].items():  # onto each model's own run and logged model
        log_test_metrics(client, experiment_id, model_path(paths, name), values, paths.store, params.data.source)
    client.log_artifacts(run_id, str(out_dir), "evaluate")
    candidate = result["candidate"]
    model_runs = find_model_runs(client, experiment_id, paths, list(result["metrics"]))
    uri = model_runs.get(candidate, {}).get("pyfunc_uri")
    if uri is None:  # trained outside this store: log its pyfunc here, once per attempt, never registered twice
        uri = log_image_model(client, run_id, candidate,
                              model_file(paths.svm_models, paths.finetune_models, candidate),
                              paths.store, paths.features, params)
    set_tags(client, run_id, {"tlpipe.candidate": candidate, "tlpipe.best_on_test": result["best"]["model"]})
    return {"run_id": run_id, "experiment_id": experiment_id, "model_uri": uri,
            "model_runs": {name: found["run_id"] for name, found in model_runs.items()}}


def log_ensemble_tries(client, stage_run_id: str, plan: dict | None) -> None:
    """Every ensemble try on the evaluate stage run: ``ensemble_val_accuracy``, ``_val_log_loss``,
    ``_val_bound``, ``_test_accuracy`` and ``_kept`` at step k (the number of members)."""
    for entry in (plan or {}).get("tries", []):
        values = {f"ensemble_{key}": entry.get(key) for key in
                  ("val_accuracy", "val_log_loss", "val_bound", "test_accuracy")}
        log_metrics(client, stage_run_id, {**values, "ensemble_kept": float(entry["kept"])}, step=entry["k"])


def log_ensemble(client, experiment_id: str, stage_run_id: str, paths: ProjectPaths, params: Params, result: dict,
                 data_hash: str) -> str:
    """The kept ensemble's own model run under the evaluate stage run, with its logged pyfunc; returns the URI.

    The run records the members and temperatures (params), the validation scores it
    was kept by, ``ensemble.json`` and ``ensemble.csv`` (under ``selection/``), and one
    logged model holding every member (:func:`tlpipe.tracking.logged_models.log_ensemble_classifier`).
    A run that already logged this very ``ensemble.json`` (same members, member files
    and temperatures, matched by hash) is reused, so a retry logs nothing twice.
    """
    from tlpipe.tracking.logged_models import log_ensemble_classifier

    spec = ensemble.spec_path(paths.reports("evaluate"))
    logged = find_model_run(client, experiment_id, spec)
    if logged is not None and logged.model_uri:
        return logged.model_uri
    plan, sha = result["ensemble"], file_sha256(spec)
    members = {name: model_file(paths.svm_models, paths.finetune_models, name) for name in plan["members"]}
    with model_run(client, ENSEMBLE_MODEL, stage_run_id, {"tlpipe.data_hash": data_hash,
                                                          "tlpipe.family": "ensemble"}) as run_id:
        log_params(client, run_id, ensemble.run_params(plan, result["classes"], data_hash))
        val = log_datasets(client, run_id, paths.store, params.data.source, ("val",))["val"]
        scores = {key: plan[key] for key in ("val_accuracy", "val_log_loss", "val_bound")}
        log_metrics(client, run_id, {**scores, "validation_score": plan["val_accuracy"]}, dataset=val)
        for path in (spec, spec.with_name(ensemble.TRIES_FILE)):
            client.log_artifact(run_id, str(path), "selection")
        info = log_ensemble_classifier(client, run_id, ENSEMBLE_MODEL, members, plan["temperatures"], paths.store,
                                       paths.features, params, model_type="ensemble",
                                       tags={MODEL_TAG: ENSEMBLE_MODEL, MODEL_SHA_TAG: sha})
        set_tags(client, run_id, {MODEL_SHA_TAG: sha, PYFUNC_URI_TAG: info.model_uri, MODEL_ID_TAG: info.model_id})
    get_logger().info("ensemble (%s): logged to MLflow run %s", " + ".join(plan["members"]), run_id)
    return info.model_uri


@task(name="register-and-gate", retries=0, timeout_seconds=1800)
def register_and_gate(paths: ProjectPaths, params: Params, result: dict, evaluation: dict, data_hash: str) -> dict:
    """Register the candidate once and apply the champion gate; never retried, idempotent per execution.

    The key of this evaluate execution is its MLflow stage run id: a second
    call with it (a retry, a rerun of this task) returns the decision already
    recorded instead of registering another version. Nothing else happens
    here, so nothing after the registration can fail and trigger a repeat.
    """
    candidate = result["candidate"]
    data_task = resolve_task(params, paths.root)
    model_name = data_task.model_name
    client = connect(paths.root)
    images, labels = store.load_split(paths.store, "test")
    score = result["selection"].get(candidate)
    decision = registry.register_and_gate(
        client, model_name, candidate, evaluation["model_uri"],
        result["metrics"][candidate]["accuracy"], images, labels, result["classes"],
        params.registry.min_improvement,
        {"tlpipe.data_hash": data_hash, "selection_score": "none" if score is None else format_score(score),
         TASK_TAG: data_task.name},
        execution_id=evaluation["run_id"])
    get_logger().info(decision.reason)
    return {**decision.to_dict(), "selection_scores": result["selection"],
            "selection_bounds": result.get("selection_bounds", {}),
            "registered_model": model_name, "evaluate_run_id": evaluation["run_id"]}


def run_link(evaluation: dict, label: str, run_id: str):
    """A link to one MLflow run of this evaluation's experiment (see :mod:`tlpipe.evaluation.pipeline_summary`)."""
    from tlpipe.evaluation.pipeline_summary import RunLink

    return RunLink(label, run_id, evaluation["experiment_id"])


@task(name="write-report", retries=2, retry_delay_seconds=[2, 8], timeout_seconds=600)
def write_report(paths: ProjectPaths, result: dict, promotion: dict, evaluation: dict, data_hash: str) -> str:
    """Write ``promotion.json`` and the self-contained ``report.html`` (atomically); log both to the stage run."""
    out_dir = paths.reports("evaluate")
    store.write_json(out_dir / "promotion.json", promotion)
    from tlpipe.evaluation.pipeline_summary import run_url

    runs = [("evaluate stage run", run_url(run_link(evaluation, "evaluate", evaluation["run_id"])))]
    runs += [(f"{name} run", run_url(run_link(evaluation, name, run_id)))
             for name, run_id in evaluation["model_runs"].items()]
    facts = [("Registered model", promotion["registered_model"]), ("Data hash", data_hash[:16]),
             ("MLflow evaluate run", evaluation["run_id"])]
    links = [*runs, ("Report folder", str(out_dir)),
             ("DVC", "dvc metrics show · make exps · dvc plots show")]
    section = selection.report_section(paths.reports("select"))
    data = build_report(out_dir, result, promotion, paths.features, facts, links,
                                 sections=[section] if section else None)
    data = ensemble.add_report_section(data, result)
    path = out_dir / "report.html"
    from tlpipe.render.html import write_report as write_html

    write_html(path, data)
    client = connect(paths.root)
    for name in ("promotion.json", "report.html"):
        client.log_artifact(evaluation["run_id"], str(out_dir / name), "evaluate")
    client.set_tag(evaluation["run_id"], "tlpipe.promoted", str(promotion["promoted"]))
    client.set_tag(evaluation["run_id"], "tlpipe.report", str(path))
    return str(path)


def comparison_rows(result: dict, evaluation: dict) -> list[dict]:
    """Rows of the comparison table artifact: test metrics and MLflow run per model, plus what the gate saw."""
    from tlpipe.evaluation.pipeline_summary import comparison_rows as rows_of

    links = {name: run_link(evaluation, name, run_id) for name, run_id in evaluation["model_runs"].items()}
    rows = rows_of(result["metrics"], links)
    for row in rows:
        run = row.pop("mlflow_run", None)
        score = result["selection"].get(row["model"])
        row["selection_score"] = None if score is None else round_score(score)
        row["candidate"] = "yes" if row["model"] == result["candidate"] else ""
        if run is not None:
            row["mlflow_run"] = run  # last: a long URL, the columns that matter stay in view
    return rows


@task(name="publish-evaluate-artifacts", retries=2, retry_delay_seconds=[1, 4], timeout_seconds=120)
def publish_artifacts(root: Path, result: dict, promotion: dict, report_path: str, evaluation: dict) -> dict:
    """Prefect artifacts of the evaluate flow run: the comparison table, the decision, the report, the MLflow runs.

    Keys are ``<project>-evaluate-*`` (the pipeline flow publishes ``<project>-*`` ones).

    Returns:
        ``{artifact key: artifact id}``.
    """
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    from tlpipe.evaluation import pipeline_summary as summary
    from tlpipe.ops.prefect_server import main_project_root

    project = main_project_root(root).name
    key = {what: summary.artifact_key(project, f"evaluate-{what}")
           for what in ("model-comparison", "promotion", "report", "mlflow-runs")}
    report = Path(report_path)
    models = {name: run_link(evaluation, name, run_id) for name, run_id in evaluation["model_runs"].items()}
    ids = {
        key["model-comparison"]: create_table_artifact(
            comparison_rows(result, evaluation), key=key["model-comparison"],
            description=f"Test metrics per model of {project}, best first; candidate = the model put forward to "
                        "the champion gate (by CV or validation accuracy, never test accuracy)"),
        key["promotion"]: create_markdown_artifact(
            summary.promotion_markdown(promotion) + "\n\n" + summary.report_markdown(report),
            key=key["promotion"], description=str(promotion.get("reason", ""))[:500]),
        key["report"]: create_markdown_artifact(
            "## Evaluation report\n\n" + summary.report_markdown(report), key=key["report"],
            description="Self-contained HTML page: open the file (`tlpipe report --open`)"),
        key["mlflow-runs"]: create_markdown_artifact(
            summary.links_markdown(None, [run_link(evaluation, "evaluate", evaluation["run_id"])], models, report),
            key=key["mlflow-runs"], description=f"MLflow runs of this {project} evaluation and of each model"),
    }
    return {name: str(value) for name, value in ids.items()}
