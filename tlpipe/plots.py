"""Figures of the ``evaluate`` stage, drawn with matplotlib's Agg canvas.

Figures are built with :class:`matplotlib.figure.Figure` directly (no pyplot),
so nothing here touches global matplotlib state or needs a display, and each
PNG is written atomically (temp file, then ``os.replace``).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

MISTAKE_COLOR = "tab:red"
CORRECT_COLOR = "black"


def new_figure(width: float, height: float) -> Figure:
    """A figure attached to an Agg canvas."""
    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def save_figure(figure: Figure, path: Path, dpi: int = 100) -> None:
    """Write a figure as PNG atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    figure.savefig(tmp, format="png", dpi=dpi)
    os.replace(tmp, path)


def plot_confusion(matrix: np.ndarray, classes: Sequence[str], title: str, path: Path) -> None:
    """Draw a confusion matrix with annotated counts (rows: actual, columns: predicted)."""
    matrix = np.asarray(matrix)
    side = max(3.5, 0.6 * len(classes) + 2.0)
    figure = new_figure(side + 0.8, side)
    axes = figure.add_subplot()
    image = axes.imshow(matrix, cmap="Blues", vmin=0)
    figure.colorbar(image, ax=axes, shrink=0.8)
    ticks = np.arange(len(classes))
    axes.set_xticks(ticks, labels=list(classes), rotation=45, ha="right")
    axes.set_yticks(ticks, labels=list(classes))
    axes.set_xlabel("predicted")
    axes.set_ylabel("actual")
    axes.set_title(title)
    threshold = matrix.max() / 2 if matrix.size else 0
    for (row, col), count in np.ndenumerate(matrix):
        color = "white" if count > threshold else "black"
        axes.text(col, row, str(int(count)), ha="center", va="center", color=color)
    save_figure(figure, path)


def plot_comparison(models: Sequence[str], accuracies: Sequence[float], path: Path,
                    baseline: float | None = None) -> None:
    """Bar chart of test accuracy per model, with an optional majority-class baseline."""
    figure = new_figure(max(4.0, 1.2 * len(models) + 1.5), 4.0)
    axes = figure.add_subplot()
    bars = axes.bar(list(models), list(accuracies), color="tab:blue")
    axes.bar_label(bars, labels=[f"{a:.3f}" for a in accuracies], padding=2)
    if baseline is not None:
        axes.axhline(baseline, color="gray", linestyle="--", label=f"majority class ({baseline:.3f})")
        axes.legend(loc="lower right")
    axes.set_ylim(0, 1.08)
    axes.set_ylabel("test accuracy")
    axes.set_title("Test accuracy per model")
    axes.tick_params(axis="x", rotation=20)
    save_figure(figure, path)


def plot_image_grid(images: np.ndarray, titles: Sequence[str], mistakes: Sequence[bool], path: Path) -> None:
    """A grid of images, each titled; mistakes get a red title and a red border."""
    count = len(images)
    cols = max(1, math.ceil(math.sqrt(count)))
    rows = max(1, math.ceil(count / cols))
    figure = new_figure(2.2 * cols, 2.4 * rows)
    for position, (image, title, wrong) in enumerate(zip(images, titles, mistakes, strict=True)):
        axes = figure.add_subplot(rows, cols, position + 1)
        axes.imshow(image)
        axes.set_xticks([])
        axes.set_yticks([])
        color = MISTAKE_COLOR if wrong else CORRECT_COLOR
        axes.set_title(title, color=color, fontsize=9)
        for spine in axes.spines.values():
            spine.set_visible(bool(wrong))
            spine.set_color(MISTAKE_COLOR)
            spine.set_linewidth(3)
    save_figure(figure, path)
