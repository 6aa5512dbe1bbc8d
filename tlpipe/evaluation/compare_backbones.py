"""Core of ``tlpipe compare-backbones``: the course's accuracy-vs-compute chart, on your data.

The course closes on a chart of ImageNet accuracy against compute across
backbones. This module draws the same chart for the user's own data: one DVC
experiment per backbone (``dvc exp run --queue -S features.backbone=<name>``,
then ``dvc exp run --run-all``: DVC's own queue runs them one after another),
then, per backbone x model, the test accuracy from that experiment's
``metrics/evaluate.json`` against

* compute: GFLOPs per image of the backbone at the experiment's input size,
  counted from the Keras model as multiply-adds of its convolution and dense
  layers (the convention of the EfficientNet and ResNet papers, where
  EfficientNet-B0 is 0.39 "GFLOPs" and ResNet50 4.1), and
* speed: images per second of the features stage on this machine
  (``metrics/features.json`` of the same experiment: a DVC-cached output, read
  through DVC at the experiment's commit).

The raw-pixel SVM uses no backbone; it is drawn as a horizontal reference line.
Outputs: ``backbones.csv`` (one row per backbone x model) and ``backbones.png``
in ``reports/compare_backbones/``, also logged to MLflow.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import yaml

from tlpipe.core.errors import UserError
from tlpipe.evaluation.compare import experiment_refs, read_at

DEFAULT_BACKBONES = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")
PIXEL_MODEL = "svm_pixels"
EVALUATE_METRICS = "metrics/evaluate.json"
FEATURES_METRICS = "metrics/features.json"
REPORT_FOLDER = Path("reports") / "compare_backbones"
CSV_NAME = "backbones.csv"
PNG_NAME = "backbones.png"
COLUMNS = ["backbone", "model", "accuracy", "gflops", "images_per_second", "image_size", "experiment"]


class ComparisonError(UserError, RuntimeError):
    """The comparison could not run or found no results."""


@dataclass(frozen=True)
class BackboneRun:
    """One backbone's experiment and what it measured.

    Attributes:
        backbone: Backbone name.
        experiment: DVC experiment name.
        image_size: Input side the experiment ran at.
        images_per_second: Features-stage throughput on this machine.
        accuracies: ``{model: test accuracy}``.
    """

    backbone: str
    experiment: str
    image_size: int
    images_per_second: float
    accuracies: dict[str, float]


def count_macs(model) -> int:
    """Multiply-adds of one forward pass of a built Keras model for one image.

    Counts ``Conv2D`` (``out_h * out_w * k_h * k_w * in_c / groups * out_c``),
    ``DepthwiseConv2D`` (``out_h * out_w * k_h * k_w * in_c * multiplier``) and
    ``Dense`` (``in * out``) layers, descending into nested models; batch
    norm, activations, pooling and additions are left out (a few percent).

    Args:
        model: A functional Keras model with static spatial input shapes.

    Returns:
        Multiply-adds per image.
    """
    import keras

    total = 0
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            total += count_macs(layer)
        elif isinstance(layer, keras.layers.DepthwiseConv2D):
            _, out_h, out_w, _ = layer.output.shape
            k_h, k_w = layer.kernel_size
            in_c = layer.input.shape[-1]
            total += out_h * out_w * k_h * k_w * in_c * layer.depth_multiplier
        elif isinstance(layer, keras.layers.Conv2D):
            _, out_h, out_w, out_c = layer.output.shape
            k_h, k_w = layer.kernel_size
            in_c = layer.input.shape[-1]
            total += out_h * out_w * k_h * k_w * (in_c // layer.groups) * out_c
        elif isinstance(layer, keras.layers.Dense):
            total += int(layer.input.shape[-1]) * layer.units
    return int(total)


def backbone_gflops(name: str, image_size: int) -> float:
    """GFLOPs (multiply-adds, 1e9) per image of a backbone's feature model at ``image_size``.

    The feature model is what the features stage runs: everything up to the
    pooled final features (and the mid-level tap), without the ImageNet
    classifier. Built with random weights: compute does not depend on them.
    """
    from tlpipe.features.backbones import build_backbone

    return count_macs(build_backbone(name, weights=None, image_size=image_size)) / 1e9


def experiment_name(prefix: str, backbone: str) -> str:
    """The DVC experiment name of one backbone's run."""
    return f"{prefix}-{backbone.replace('_', '-')}"


def dvc_command(root: Path) -> list[str]:
    """``dvc`` of this interpreter's environment."""
    candidate = Path(sys.executable).parent / "dvc"
    return [str(candidate)] if candidate.is_file() else ["dvc"]


def run_dvc(root: Path, args: list[str], env: dict[str, str] | None = None) -> None:
    """Run one dvc command in ``root``, streaming its output.

    Raises:
        ComparisonError: When it fails.
    """
    command = [*dvc_command(root), *args]
    print("$", " ".join(command[1:]) if command[0].endswith("dvc") else " ".join(command), flush=True)
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    code = subprocess.call(command, cwd=root, env={**os.environ, **(env or {}), "PATH": path})
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


def build_table(runs: Sequence[BackboneRun], gflops: dict[tuple[str, int], float]) -> pd.DataFrame:
    """One row per backbone x model (:data:`COLUMNS`), the pixel SVM included with its backbone's row.

    Args:
        runs: The experiments.
        gflops: ``{(backbone, image_size): GFLOPs per image}``.
    """
    rows = [{"backbone": run.backbone, "model": model, "accuracy": accuracy,
             "gflops": round(gflops[(run.backbone, run.image_size)], 4),
             "images_per_second": run.images_per_second, "image_size": run.image_size, "experiment": run.experiment}
            for run in runs for model, accuracy in sorted(run.accuracies.items())]
    return pd.DataFrame(rows, columns=COLUMNS)


def draw_chart(table: pd.DataFrame, path: Path, title: str) -> None:
    """Accuracy against GFLOPs (left) and against images/s (right), one line per model, one point per backbone.

    The raw-pixel SVM, which uses no backbone, is a dashed horizontal line (its
    best accuracy over the runs).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(13, 5.2), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, 2, sharey=True)
    networks = table[table["model"] != PIXEL_MODEL]
    pixels = table[table["model"] == PIXEL_MODEL]
    markers = "osD^vP*Xh<>"
    for axis, x, label in zip(axes, ("gflops", "images_per_second"),
                              ("GFLOPs per image (multiply-adds)", "images/s, features stage, this machine")):
        for index, (model, rows) in enumerate(networks.groupby("model", sort=True)):
            rows = rows.sort_values(x)
            axis.plot(rows[x], rows["accuracy"], marker=markers[index % len(markers)], label=model)
        for backbone, rows in networks.groupby("backbone"):
            best = rows.loc[rows["accuracy"].idxmax()]
            axis.annotate(backbone.replace("efficientnet_", ""), (best[x], best["accuracy"]),
                          textcoords="offset points", xytext=(4, 6), fontsize=8)
        if len(pixels):
            axis.axhline(pixels["accuracy"].max(), color="grey", ls="--", label=f"{PIXEL_MODEL} (no backbone)")
        axis.set(xlabel=label, title=f"test accuracy vs {'compute' if x == 'gflops' else 'speed'}")
        axis.grid(alpha=0.3)
    axes[0].set_ylabel("test accuracy")
    axes[1].legend(loc="lower right", fontsize=8)
    figure.suptitle(title)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    figure.savefig(tmp, dpi=110)
    os.replace(tmp, path)


def write_report(table: pd.DataFrame, out_dir: Path, title: str) -> tuple[Path, Path]:
    """Write ``backbones.csv`` and ``backbones.png`` into ``out_dir`` (each atomically)."""
    from tlpipe.data import store

    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path, png_path = out_dir / CSV_NAME, out_dir / PNG_NAME
    store.write_csv(csv_path, table)
    draw_chart(table, png_path, title)
    return csv_path, png_path


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
