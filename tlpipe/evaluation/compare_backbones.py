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

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from tlpipe.core.errors import UserError
from tlpipe.core.paths import metrics_file

DEFAULT_BACKBONES = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")
PIXEL_MODEL = "svm_pixels"
EVALUATE_METRICS = metrics_file("evaluate")
FEATURES_METRICS = metrics_file("features")
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


