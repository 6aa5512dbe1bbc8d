"""Core of ``tlpipe compare A B``: two experiments side by side (test accuracy per model, differing params).

An experiment is named by

* a DVC experiment name (``dvc exp show`` lists them), a git revision, or
  ``workspace``: its ``params.yaml`` and ``metrics/evaluate.json`` are read from
  that commit with git (DVC commits both in each experiment), or from the working tree;
* an MLflow run id (32 hex digits) of a pipeline run: its ``<model>.test_accuracy``
  metrics, and the params its stage runs logged.
"""

from __future__ import annotations

import json
import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from tlpipe.errors import UserError

RUN_ID = re.compile(r"^[0-9a-f]{32}$")
METRICS_FILE = "metrics/evaluate.json"
WORKSPACE = "workspace"


class ExperimentNotFoundError(UserError, LookupError):
    """The name is neither a DVC experiment, a git revision nor an MLflow run id."""


@dataclass(frozen=True)
class ExperimentSummary:
    """What the comparison needs of one experiment."""

    ref: str
    label: str
    accuracies: dict[str, float] = field(default_factory=dict)
    params: dict[str, str] = field(default_factory=dict)
    source: str = "dvc"  # dvc | mlflow


def flatten(value: object, prefix: str = "") -> dict[str, str]:
    """Nested mappings as dotted keys with ``str`` values (as the stages log them to MLflow)."""
    if isinstance(value, dict):
        items: dict[str, str] = {}
        for key, inner in value.items():
            items.update(flatten(inner, f"{prefix}.{key}" if prefix else str(key)))
        return items
    return {prefix: str(value)}


def accuracies_from_metrics(metrics: dict) -> dict[str, float]:
    """``{model: test accuracy}`` from the evaluate metrics (``acc``, ``accuracy`` or ``test_accuracy``)."""
    found = {}
    for model, values in metrics.items():
        if isinstance(values, dict):
            value = next((values[k] for k in ("acc", "accuracy", "test_accuracy") if k in values), None)
            if isinstance(value, (int, float)):
                found[model] = float(value)
    return found


def git(root: Path, *args: str) -> subprocess.CompletedProcess:
    """Run git in ``root``."""
    return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=60)


def experiment_refs(root: Path) -> dict[str, str]:
    """``{experiment name: commit}`` of the DVC experiments (``refs/exps/...``)."""
    listing = git(root, "for-each-ref", "--format=%(objectname) %(refname)", "refs/exps")
    refs = {}
    for line in listing.stdout.splitlines():
        commit, _, ref = line.partition(" ")
        if ref.count("/") >= 4:  # refs/exps/<ab>/<baseline>/<name>
            refs[ref.rsplit("/", 1)[1]] = commit
    return refs


def read_at(root: Path, commit: str | None, path: str) -> str | None:
    """A file's text at ``commit`` (None: the working tree), or None when absent."""
    if commit is None:
        file = root / path
        return file.read_text() if file.is_file() else None
    shown = git(root, "show", f"{commit}:{path}")
    return shown.stdout if shown.returncode == 0 else None


def resolved_params(raw: dict) -> dict:
    """params.yaml as the stages saw it (``image_size: native`` as the backbone's size, defaults filled),
    or as written when it does not parse (an old or foreign experiment)."""
    from tlpipe.config import parse_params

    try:
        return parse_params(raw).model_dump(mode="json")
    except (UserError, ValueError, TypeError):
        return raw


def load_dvc_experiment(ref: str, root: Path) -> ExperimentSummary:
    """An experiment from a DVC experiment name, a git revision, or ``workspace``."""
    if ref == WORKSPACE:
        commit, label = None, "workspace"
    else:
        exps = experiment_refs(root)
        if ref in exps:
            commit, label = exps[ref], f"{ref} (DVC experiment {exps[ref][:7]})"
        else:
            parsed = git(root, "rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}")
            if parsed.returncode != 0:
                names = ", ".join(sorted(exps)) or "none"
                raise ExperimentNotFoundError(
                    f"{ref!r} is not a DVC experiment (experiments: {names}), a git revision, "
                    "'workspace' or an MLflow run id (32 hex digits)")
            commit, label = parsed.stdout.strip(), f"{ref} (git {parsed.stdout.strip()[:7]})"
    params_text = read_at(root, commit, "params.yaml")
    metrics_text = read_at(root, commit, METRICS_FILE)
    params = flatten(resolved_params(yaml.safe_load(params_text) or {})) if params_text else {}
    accuracies = accuracies_from_metrics(json.loads(metrics_text)) if metrics_text else {}
    return ExperimentSummary(ref, label, accuracies, params)


def load_mlflow_run(run_id: str, root: Path) -> ExperimentSummary:
    """An experiment from an MLflow pipeline run: its test accuracies and its stage runs' params."""
    from mlflow.exceptions import MlflowException

    from tlpipe import tracking

    client = tracking.connect(root)
    try:
        run = client.get_run(run_id)
    except MlflowException:
        raise ExperimentNotFoundError(f"no MLflow run {run_id} in {tracking.tracking_uri(root)}") from None
    suffix = ".test_accuracy"
    accuracies = {key[:-len(suffix)]: value for key, value in run.data.metrics.items() if key.endswith(suffix)}
    params: dict[str, str] = {}
    children = client.search_runs([run.info.experiment_id], f"tags.`mlflow.parentRunId` = '{run_id}'",
                                  max_results=200)
    for child in sorted(children, key=lambda r: r.info.start_time or 0):
        params.update(child.data.params)
    params.update(run.data.params)
    kind = run.data.tags.get(tracking.KIND_TAG, "run")
    return ExperimentSummary(run_id, f"{run_id[:8]} (MLflow {kind} run)", accuracies, params, "mlflow")


def load_experiment(ref: str, root: Path) -> ExperimentSummary:
    """An experiment by DVC name, git revision, ``workspace`` or MLflow run id."""
    return load_mlflow_run(ref, root) if RUN_ID.match(ref) else load_dvc_experiment(ref, Path(root))


def canonical(value: str | None) -> str | None:
    """A param value as text that compares equal however it was written: ``10``, ``10.0`` and ``1e1`` alike."""
    if value is None:
        return None
    try:
        number = float(value)
    except ValueError:
        return value
    return str(int(number)) if number.is_integer() and abs(number) < 1e15 else repr(number)


def render_table(header: list[str], rows: list[list[str]]) -> list[str]:
    """Left-aligned text columns, two spaces apart."""
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    line = lambda row: "  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip()  # noqa: E731
    return [line(header), line(["-" * width for width in widths]), *map(line, rows)]


def compare_table(a: ExperimentSummary, b: ExperimentSummary, all_params: bool = False) -> str:
    """The comparison as terminal text: test accuracy per model (with B - A), then the params that differ."""
    def fmt(value: float | None) -> str:
        return "-" if value is None else f"{value:.4f}"

    lines = [f"A: {a.label}", f"B: {b.label}", ""]
    models = sorted(set(a.accuracies) | set(b.accuracies))
    rows = []
    for model in models:
        first, second = a.accuracies.get(model), b.accuracies.get(model)
        delta = f"{second - first:+.4f}" if first is not None and second is not None else "-"
        rows.append([model, fmt(first), fmt(second), delta])
    lines += render_table(["model", "test accuracy A", "test accuracy B", "B - A"], rows) if rows else [
        "no test accuracies recorded in either (did the evaluate stage run?)"]
    # a DVC experiment has every key of params.yaml, an MLflow run the keys its stages logged (no schedule.*):
    # across the two kinds, only keys both have can differ
    keys = sorted(set(a.params) | set(b.params) if a.source == b.source else set(a.params) & set(b.params))
    differing = [key for key in keys if canonical(a.params.get(key)) != canonical(b.params.get(key))]
    shown = keys if all_params else differing
    lines.append("")
    if shown:
        lines.append("params" if all_params else "params that differ")
        lines += render_table(["param", "A", "B"], [[key, a.params.get(key, "-"), b.params.get(key, "-")]
                                                     for key in shown])
    else:
        lines.append("no params differ" if a.params or b.params else "no params recorded")
    return "\n".join(lines)
