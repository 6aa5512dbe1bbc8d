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

from tlpipe.core.errors import UserError
from tlpipe.core.paths import metrics_file

RUN_ID = re.compile(r"^[0-9a-f]{32}$")
METRICS_FILE = metrics_file("evaluate")
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
    task: str | None = None
    classes: list[str] | None = None


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
    from tlpipe.core.params import parse_params

    try:
        return parse_params(raw).model_dump(mode="json")
    except (UserError, ValueError, TypeError):
        return raw


def describe_task(raw: dict, root: Path) -> tuple[str | None, list[str] | None]:
    """The task and class set of params as written (:func:`tlpipe.core.task.resolve_task`); None where unknown
    (params that do not parse, a source that cannot be listed)."""
    from tlpipe.core.params import parse_params
    from tlpipe.core.sources import SourceError, name_source_task
    from tlpipe.core.task import resolve_task

    try:
        params = parse_params(raw)
        task = resolve_task(params, root)
    except (UserError, ValueError, TypeError):
        return None, None
    if task.classes is not None:
        return task.name, task.classes
    data = params.data
    try:
        return task.name, name_source_task(data.source, data.classes, data.elpv_label, data.elpv_threshold,
                                           root).classes
    except SourceError:
        return task.name, None


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
    raw = (yaml.safe_load(params_text) or {}) if params_text else {}
    params = flatten(resolved_params(raw)) if params_text else {}
    accuracies = accuracies_from_metrics(json.loads(metrics_text)) if metrics_text else {}
    task, classes = describe_task(raw, Path(root)) if params_text else (None, None)
    return ExperimentSummary(ref, label, accuracies, params, task=task, classes=classes)


def load_mlflow_run(run_id: str, root: Path) -> ExperimentSummary:
    """An experiment from an MLflow pipeline run: its test accuracies and its stage runs' params."""
    from mlflow.exceptions import MlflowException

    from tlpipe.tracking.connection import connect, tracking_uri
    from tlpipe.tracking.tags import KIND_TAG, TASK_TAG

    client = connect(root)
    try:
        run = client.get_run(run_id)
    except MlflowException:
        raise ExperimentNotFoundError(f"no MLflow run {run_id} in {tracking_uri(root)}") from None
    suffix = ".test_accuracy"
    accuracies = {key[:-len(suffix)]: value for key, value in run.data.metrics.items() if key.endswith(suffix)}
    params: dict[str, str] = {}
    children = client.search_runs([run.info.experiment_id], f"tags.`mlflow.parentRunId` = '{run_id}'",
                                  max_results=200)
    for child in sorted(children, key=lambda r: r.info.start_time or 0):
        params.update(child.data.params)
    params.update(run.data.params)
    kind = run.data.tags.get(KIND_TAG, "run")
    task = run.data.tags.get(TASK_TAG) or client.get_experiment(run.info.experiment_id).name
    return ExperimentSummary(run_id, f"{run_id[:8]} (MLflow {kind} run)", accuracies, params, "mlflow", task,
                             run_classes(client, run.info.experiment_id, [child.info.run_id for child in children]))


def run_classes(client, experiment_id: str, stage_run_ids: list[str]) -> list[str] | None:
    """The class set of a pipeline run: the ``classes`` param of a model run under one of its stage runs."""
    from tlpipe.tracking.tags import KIND_TAG

    if not stage_run_ids:
        return None
    models = client.search_runs([experiment_id], f"tags.`{KIND_TAG}` = 'model'", max_results=1000)
    for model in models:
        if model.data.tags.get("mlflow.parentRunId") in stage_run_ids and model.data.params.get("classes"):
            return sorted(model.data.params["classes"].split(","))
    return None


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


def describe_side(side: ExperimentSummary) -> str:
    """``<label>, task <name>, classes [a, b]`` (what is known of them)."""
    text = side.label + (f", task {side.task}" if side.task else "")
    return text + (f", classes [{', '.join(side.classes)}]" if side.classes else "")


def chance_level(classes: list[str]) -> float:
    """Accuracy of guessing uniformly among ``classes``: 1 / their number."""
    return 1.0 / len(classes)


def task_notice(a: ExperimentSummary, b: ExperimentSummary) -> list[str]:
    """Lines saying when A and B are different tasks, and when their class sets (so their chance levels) differ."""
    if a.classes and b.classes and sorted(a.classes) != sorted(b.classes):
        return [f"the class sets differ: test accuracies are not comparable (chance level A "
                f"{chance_level(a.classes):.4f} = 1/{len(a.classes)}, B {chance_level(b.classes):.4f} = "
                f"1/{len(b.classes)})"]
    if a.task and b.task and a.task != b.task:
        return [f"different tasks ({a.task}, {b.task}): the test accuracies are on different test sets"]
    return []


def compare_table(a: ExperimentSummary, b: ExperimentSummary, all_params: bool = False) -> str:
    """The comparison as terminal text: test accuracy per model (with B - A), then the params that differ."""
    def fmt(value: float | None) -> str:
        return "-" if value is None else f"{value:.4f}"

    lines = [f"A: {describe_side(a)}", f"B: {describe_side(b)}", *task_notice(a, b), ""]
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


# ---------------------------------------------------------------- `tlpipe exps`: every DVC experiment, compact

EXPS_KEEP = ("Experiment", "rev", "typ", "State", "Executor")
"""``dvc exp show --csv`` columns kept besides the accuracies and params (the rest: times, deps, hashes)."""
ACCURACY_SUFFIX = ".acc"


def exps_command(models: tuple[str, ...]) -> list[str]:
    """``dvc exp show`` as CSV: each model's test accuracy (``<model>.acc``) and the params that vary."""
    names = "|".join(models)
    return ["exp", "show", "--no-pager", "--only-changed", "--csv", "--keep", rf".*\{ACCURACY_SUFFIX}$",
            "--drop", rf"^(?!({'|'.join(EXPS_KEEP)})$)[^.]*$|.*/|.*:|^({names})\."]


def row_name(row: dict[str, str]) -> str:
    """An experiment row's name: the experiment's (indented under its baseline), else its revision."""
    name = row.get("Experiment") or row.get("rev") or "?"
    return f"  {name}" if row.get("typ", "").startswith("branch") else name


def format_exps(csv_text: str) -> str:
    """``dvc exp show --csv`` as a compact table: one row per experiment, a column per model headed by
    the model's name (its test accuracy, 4 decimals), then State/Executor when set, then the params that vary.

    DVC's own table heads each model's column ``<model>.acc`` and adds times; this one is about 40
    characters narrower with six models (what keeps ``make exps`` within 160 columns).
    """
    import csv
    import io

    from tlpipe.render.formats import format_score

    rows = list(csv.DictReader(io.StringIO(csv_text)))
    if not rows:
        return "no experiments (run one: dvc exp run, or tlpipe repro -S key=value)"
    columns = list(rows[0])
    models = [column for column in columns if column.endswith(ACCURACY_SUFFIX)]
    status = [column for column in ("State", "Executor") if any(row.get(column) for row in rows)]
    params = [column for column in columns if "." in column and column not in models]  # DVC's own columns: no dot

    def score(text: str) -> str:
        try:
            return format_score(float(text))
        except ValueError:
            return text or "-"

    header = ["experiment", *[m[:-len(ACCURACY_SUFFIX)] for m in models], *[s.lower() for s in status], *params]
    table = [[row_name(row), *[score(row.get(m, "")) for m in models], *[row.get(s) or "-" for s in status],
              *[row.get(p) or "-" for p in params]] for row in rows]
    return "\n".join(render_table(header, table))
