"""``tlpipe compare-backbones``: one DVC experiment per backbone (DVC's queue), what each measured read back
from its commit, the accuracy-vs-compute table and chart (:mod:`tlpipe.evaluation.compare_backbones`), logged to
MLflow. Orchestration of DVC and MLflow lives here, in the entry-point layer, not in the core package.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
import yaml

from tlpipe.evaluation.compare import experiment_refs, read_at
from tlpipe.evaluation.compare_backbones import (
    DEFAULT_BACKBONES,
    EVALUATE_METRICS,
    FEATURES_METRICS,
    REPORT_FOLDER,
    BackboneRun,
    ComparisonError,
    backbone_gflops,
    build_table,
    write_report,
)
from tlpipe.ops import dvc


def run_dvc(root: Path, args: list[str], env: dict[str, str] | None = None) -> None:
    """Run one dvc command in ``root``, streaming its output (:func:`tlpipe.ops.dvc.run_dvc`).

    Raises:
        ComparisonError: When it fails.
    """
    code = dvc.run_dvc(root, args, env)
    if code != 0:
        raise ComparisonError(f"`dvc {' '.join(args)}` failed (exit {code}); see its output above")


def queue_and_run(root: Path, backbones: Sequence[str], overrides: Sequence[str], prefix: str) -> dict[str, str]:
    """Queue one DVC experiment per backbone and run the queue to completion.

    Each experiment is ``dvc exp run --queue --name <prefix>-<backbone> -S
    features.backbone=<backbone> -S <override>...``; ``dvc exp run --run-all``
    then runs the queue one experiment at a time in temporary workspaces
    (so the workspace, its params and outputs stay as they are) and blocks
    until every one finished. Stages whose inputs did not change are restored
    from DVC's run cache instead of rerun.

    Args:
        root: Project root (a git repository with dvc.yaml).
        backbones: Backbone names.
        overrides: Extra ``key=value`` params for every experiment.
        prefix: Experiment name prefix (names must be new).

    Returns:
        ``{backbone: experiment name}``.

    Raises:
        ComparisonError: When queueing or running fails, or a name is taken.
    """
    taken = experiment_refs(root)
    names = {backbone: experiment_name(prefix, backbone) for backbone in backbones}
    clash = sorted(name for name in names.values() if name in taken)
    if clash:
        raise ComparisonError(f"DVC experiments {clash} exist already: pick another --name prefix "
                              f"or remove them (dvc exp remove {' '.join(clash)})")
    for backbone, name in names.items():
        sets = [arg for item in (f"features.backbone={backbone}", *overrides) for arg in ("-S", item)]
        run_dvc(root, ["exp", "run", "--queue", "--name", name, *sets])
    run_dvc(root, ["exp", "run", "--run-all", "--jobs", "1"])
    return names


def read_output(root: Path, commit: str, path: str) -> str | None:
    """A file of the experiment at ``commit``: from git (metrics, params), else from the DVC cache
    (stage outputs such as ``metrics/features.json``, named by hash in that commit's ``dvc.lock``)."""
    text = read_at(root, commit, path)
    if text is not None:
        return text
    import dvc.api
    from dvc.exceptions import DvcException

    try:
        return dvc.api.read(path, repo=str(root), rev=commit)
    except (DvcException, OSError):
        return None


def read_run(root: Path, backbone: str, name: str) -> BackboneRun:
    """What one finished experiment measured (read from its commit).

    Raises:
        ComparisonError: When the experiment or its metrics are missing.
    """
    commit = experiment_refs(root).get(name)
    if commit is None:
        raise ComparisonError(f"DVC experiment {name!r} ({backbone}) did not finish: see `dvc queue logs {name}`")
    texts = {path: read_output(root, commit, path) for path in (EVALUATE_METRICS, FEATURES_METRICS, "params.yaml")}
    missing = [path for path, text in texts.items() if text is None]
    if missing:
        raise ComparisonError(f"DVC experiment {name!r} has no {', '.join(missing)}")
    from tlpipe.core.params import parse_params
    from tlpipe.evaluation.compare import accuracies_from_metrics

    params = parse_params(yaml.safe_load(texts["params.yaml"]) or {})
    features = json.loads(texts[FEATURES_METRICS])
    return BackboneRun(backbone, name, params.data.image_size, float(features["images_per_second"]),
                       accuracies_from_metrics(json.loads(texts[EVALUATE_METRICS])))


def log_report(root: Path, table: pd.DataFrame, csv_path: Path, png_path: Path, params: dict[str, str],
               overrides: Sequence[str] = ()) -> str:
    """Log the chart and table to MLflow as one ``compare-backbones`` run in the experiment of the task
    the runs were for (``params.yaml`` with ``overrides``).

    Returns:
        The run id.
    """
    from tlpipe.tracking.connection import connect, ensure_experiment, experiment_name
    from tlpipe.tracking.records import log_metrics, log_params
    from tlpipe.tracking.tags import KIND_TAG

    client = connect(root)
    experiment_id = ensure_experiment(client, root, experiment_name(root, list(overrides)))
    run = client.create_run(experiment_id, run_name="compare-backbones",
                            tags={KIND_TAG: "compare-backbones"})
    run_id = run.info.run_id
    try:
        log_params(client, run_id, params)
        metrics = {f"{row.backbone}.{row.model}.test_accuracy": float(row.accuracy)
                   for row in table.itertuples(index=False)}
        for backbone, rows in table.groupby("backbone"):
            metrics[f"{backbone}.gflops"] = float(rows["gflops"].iloc[0])
            metrics[f"{backbone}.images_per_second"] = float(rows["images_per_second"].iloc[0])
        log_metrics(client, run_id, metrics)
        client.log_artifact(run_id, str(csv_path), "compare_backbones")
        client.log_artifact(run_id, str(png_path), "compare_backbones")
        client.set_terminated(run_id)
    except BaseException:
        client.set_terminated(run_id, status="FAILED")
        raise
    return run_id


def compare_backbones(root: Path, backbones: Sequence[str] = DEFAULT_BACKBONES, overrides: Sequence[str] = (),
                      prefix: str | None = None, log: bool = True) -> tuple[pd.DataFrame, Path, Path]:
    """Run the pipeline once per backbone (DVC's experiment queue) and draw the accuracy-vs-compute chart.

    Args:
        root: Project root.
        backbones: Backbone names (at least one; see :func:`tlpipe.features.backbones.list_backbones`).
        overrides: Extra ``key=value`` params for every run (e.g. ``data.source=/abs/path``).
        prefix: Experiment name prefix (default ``cmp-<UTC time>``).
        log: Log the chart and table to MLflow.

    Returns:
        The table and the CSV and PNG paths.

    Raises:
        ComparisonError: On an unknown or repeated backbone, or a failed run.
    """
    from tlpipe.features.backbones import list_backbones

    unknown = [b for b in backbones if b not in list_backbones()]
    if not backbones or unknown or len(set(backbones)) != len(backbones):
        raise ComparisonError(f"backbones must be distinct names of {list_backbones()}, got {list(backbones)}")
    bad = [item for item in overrides if "=" not in item or item.startswith("features.backbone=")]
    if bad:
        raise ComparisonError(f"overrides must be key=value and not features.backbone, got {bad}")
    root = Path(root)
    prefix = prefix or time.strftime("cmp-%Y%m%d-%H%M%S", time.gmtime())
    names = queue_and_run(root, backbones, overrides, prefix)
    runs = [read_run(root, backbone, name) for backbone, name in names.items()]
    gflops = {(run.backbone, run.image_size): backbone_gflops(run.backbone, run.image_size) for run in runs}
    table = build_table(runs, gflops)
    source = next((item.split("=", 1)[1] for item in overrides if item.startswith("data.source=")), None)
    title = f"Backbones on {Path(source).name if source else 'the default data'}: test accuracy vs compute"
    settings = [item for item in overrides if not item.startswith(("data.source=", "data.max_per_class="))]
    if settings:
        title += f" ({', '.join(settings)})"
    csv_path, png_path = write_report(table, root / REPORT_FOLDER, title)
    if log:
        log_report(root, table, csv_path, png_path, {"backbones": ",".join(backbones),
                                                     "overrides": " ".join(overrides) or "-", "prefix": prefix},
                   overrides)
    return table, csv_path, png_path


def experiment_name(prefix: str, backbone: str) -> str:
    """The DVC experiment name of one backbone's run."""
    return f"{prefix}-{backbone.replace('_', '-')}"
