"""What one pipeline execution produced, as the Prefect artifacts of its ``pipeline`` flow run show it.

Plain functions over the evaluate metrics, the promotion decision and the MLflow
runs: the comparison table rows, the promotion decision as Markdown, and links
to the MLflow runs (the MLflow UI of ``make ui``, or the tracking server).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from tlpipe.render.formats import format_score, round_score

UI_ENV = "TLPIPE_MLFLOW_UI_URL"
DEFAULT_UI = "http://127.0.0.1:5000"  # `make ui`
METRIC_ORDER = ("accuracy", "balanced_accuracy", "f1_macro", "roc_auc")
SHORT_KEYS = {"acc": "accuracy", "bal_acc": "balanced_accuracy", "f1": "f1_macro", "auc": "roc_auc"}
"""The short keys of ``metrics/evaluate*.json`` (what ``dvc metrics show`` prints) and their full names."""


@dataclass(frozen=True)
class RunLink:
    """One MLflow run to link to."""

    label: str
    run_id: str
    experiment_id: str


def artifact_key(project: str, what: str) -> str:
    """A Prefect artifact key (lowercase letters, digits, dashes) for ``what`` of ``project``."""
    slug = re.sub(r"[^a-z0-9]+", "-", project.lower()).strip("-") or "project"
    return f"{slug}-{what}"


def mlflow_ui_url() -> str:
    """Base URL of the MLflow UI: ``$TLPIPE_MLFLOW_UI_URL``, an http tracking server, or ``make ui``'s."""
    if os.environ.get(UI_ENV):
        return os.environ[UI_ENV].rstrip("/")
    uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    return uri.rstrip("/") if uri.startswith(("http://", "https://")) else DEFAULT_UI


def run_url(link: RunLink, base: str | None = None) -> str:
    """The MLflow UI page of a run."""
    from tlpipe.tracking.connection import ui_url

    return ui_url(base or mlflow_ui_url(), link.experiment_id, link.run_id)


def merge_metrics(*files: Mapping[str, object]) -> dict[str, dict]:
    """Per-model metrics from several metrics files (e.g. ``evaluate.json`` and ``evaluate_detail.json``)."""
    merged: dict[str, dict] = {}
    for content in files:
        for model, values in content.items():
            if isinstance(values, Mapping):
                merged.setdefault(model, {}).update(values)
    return merged


def comparison_rows(metrics: Mapping[str, object], model_runs: Mapping[str, RunLink] | None = None) -> list[dict]:
    """One row per model: its test metrics (the usual four first, then any other numbers) and its MLflow run.

    Short keys (``acc``, ``bal_acc``, ``f1``, ``auc``) are spelled out. Sorted by
    test accuracy, best first.
    """
    rows = []
    for model, values in metrics.items():
        if not isinstance(values, Mapping):
            continue
        numbers = {SHORT_KEYS.get(k, k): v for k, v in values.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool)}
        ordered = {f"test_{k}": round_score(numbers[k]) for k in METRIC_ORDER if k in numbers}
        ordered.update({f"test_{k}": round_score(v) for k, v in numbers.items() if k not in METRIC_ORDER})
        row = {"model": model, **ordered}
        if model_runs and model in model_runs:
            row["mlflow_run"] = run_url(model_runs[model])
        rows.append(row)
    return sorted(rows, key=lambda row: (-float(row.get("test_accuracy", float("-inf"))), row["model"]))


def format_field(value: object) -> str:
    """A decision field as text: scores (floats) with :func:`tlpipe.render.formats.format_score`, the rest as is."""
    return format_score(value) if isinstance(value, float) else str(value)


def promotion_markdown(promotion: Mapping[str, object]) -> str:
    """The promotion decision: promoted or not, the reason, then every recorded field (scores with 4 decimals)."""
    if not promotion:
        return "## Promotion decision\n\nNo decision recorded (the evaluate stage did not produce one)."
    verdict = "promoted" if promotion.get("promoted") else "not promoted"
    lines = ["## Promotion decision", "", f"**{verdict}**: {promotion.get('reason', '(no reason recorded)')}", ""]
    details = {k: v for k, v in promotion.items() if k not in ("promoted", "reason") and not isinstance(v, Mapping)}
    if details:
        lines += ["| field | value |", "| --- | --- |"] + [f"| {k} | {format_field(v)} |" for k, v in details.items()]
    return "\n".join(lines)


def links_markdown(pipeline: RunLink | None, stages: list[RunLink], models: Mapping[str, RunLink],
                   report: Path | None = None) -> str:
    """Links to the MLflow runs of this execution (and the HTML report, when there is one)."""
    base = mlflow_ui_url()
    lines = ["## MLflow runs", "", f"MLflow UI: {base} (start it with `make ui`)", ""]
    if pipeline:
        lines.append(f"- pipeline run: [{pipeline.run_id}]({run_url(pipeline, base)})")
    lines += [f"- stage {link.label}: [{link.run_id}]({run_url(link, base)})" for link in stages]
    lines += [f"- model {name}: [{link.run_id}]({run_url(link, base)})" for name, link in sorted(models.items())]
    if models:
        from tlpipe.tracking.connection import compare_url

        first = next(iter(models.values()))
        url = compare_url(base, first.experiment_id, [link.run_id for link in models.values()])
        lines += ["", f"[Compare the {len(models)} models in MLflow]({url})"]
    if report is not None and report.is_file():
        lines += ["", report_markdown(report)]
    return "\n".join(lines)


def report_markdown(report: Path) -> str:
    """Where the HTML report is, as text to copy: Prefect's UI does not open ``file://`` links."""
    return (f"HTML report: `{report.resolve()}`  \nOpen it with `.venv/bin/tlpipe report --open`, or paste "
            f"`{report.resolve().as_uri()}` into the browser's address bar.")


def find_runs(client, pipeline_run_id: str) -> tuple[RunLink | None, list[RunLink], dict[str, RunLink]]:
    """The pipeline run, its stage runs and the latest run of each model under them.

    Model runs are the runs tagged ``tlpipe.kind=model`` under a stage run (their
    ``tlpipe.model`` tag names the model); later runs of a model win.
    """
    from tlpipe.tracking.tags import KIND_TAG, STAGE_TAG

    run = client.get_run(pipeline_run_id)
    experiment = run.info.experiment_id
    pipeline = RunLink("pipeline", pipeline_run_id, experiment)

    def children(parent_ids: list[str]) -> list:
        found = []
        for parent in parent_ids:
            found += client.search_runs([experiment], f"tags.`mlflow.parentRunId` = '{parent}'", max_results=500)
        return sorted(found, key=lambda r: r.info.start_time or 0)

    stage_runs = children([pipeline_run_id])
    stages = [RunLink(r.data.tags.get(STAGE_TAG, r.info.run_name or "stage"), r.info.run_id, experiment)
              for r in stage_runs if r.data.tags.get(KIND_TAG) != "model"]
    models: dict[str, RunLink] = {}
    for candidate in [*stage_runs, *children([r.info.run_id for r in stage_runs])]:
        tags = candidate.data.tags
        if tags.get(KIND_TAG) == "model" and tags.get("tlpipe.model"):
            models[tags["tlpipe.model"]] = RunLink(tags["tlpipe.model"], candidate.info.run_id, experiment)
    return pipeline, stages, models
