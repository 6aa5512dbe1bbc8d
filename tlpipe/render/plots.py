"""Figures of the ``evaluate`` stage, drawn with matplotlib's Agg canvas.

Figures are built with :class:`matplotlib.figure.Figure` directly (no pyplot),
so nothing here touches global matplotlib state or needs a display. Every
``plot_*`` function returns the PNG bytes; given a path it also writes them
atomically (:func:`tlpipe.core.files.write_atomic`).
"""

from __future__ import annotations

import io
import math
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.text import Text
from matplotlib.ticker import MaxNLocator

from tlpipe.core.files import write_atomic
from tlpipe.render.formats import format_score

MISTAKE_COLOR = "tab:red"
CORRECT_COLOR = "black"
SPLIT_STYLES = {"train": "-", "val": "--"}
"""Line style per data split in the training curves (colour is per model)."""
SPLIT_MARKERS = {"train": "o", "val": "s"}
TEXT_KEY = "Description"
"""PNG text chunk holding every title, label and annotation of a figure (:func:`figure_text`)."""


def new_figure(width: float, height: float) -> Figure:
    """A figure attached to an Agg canvas."""
    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def figure_text(figure: Figure) -> str:
    """Every visible, non-empty text of a figure (titles, axis labels, annotations, legend), one per line."""
    texts = (artist.get_text() for artist in figure.findobj(Text) if artist.get_visible())
    return "\n".join(text for text in texts if text.strip())


def save_figure(figure: Figure, path: Path | None = None, dpi: int = 100) -> bytes:
    """Render a figure as PNG; write it atomically to ``path`` when given. Returns the PNG bytes.

    The PNG carries :func:`figure_text` in its ``Description`` text chunk, so the numbers a figure
    shows can be read back (and checked) without looking at pixels.
    """
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi, metadata={TEXT_KEY: figure_text(figure)})
    data = buffer.getvalue()
    if path is not None:
        write_atomic(Path(path), data)
    return data


def plot_confusion(matrix: np.ndarray, classes: Sequence[str], title: str, path: Path | None = None) -> bytes:
    """Draw a confusion matrix with the count in every cell (rows: true class, columns: predicted)."""
    matrix = np.asarray(matrix)
    side = max(3.5, 0.6 * len(classes) + 2.0)
    figure = new_figure(side + 0.8, side)
    axes = figure.add_subplot()
    image = axes.imshow(matrix, cmap="Blues", vmin=0)
    figure.colorbar(image, ax=axes, shrink=0.8, label="test images")
    ticks = np.arange(len(classes))
    axes.set_xticks(ticks, labels=list(classes), rotation=45, ha="right")
    axes.set_yticks(ticks, labels=list(classes))
    axes.set_xlabel("predicted class")
    axes.set_ylabel("true class")
    axes.set_title(title)
    threshold = matrix.max() / 2 if matrix.size else 0
    for (row, col), count in np.ndenumerate(matrix):
        color = "white" if count > threshold else "black"
        axes.text(col, row, str(int(count)), ha="center", va="center", color=color, fontsize=11)
    return save_figure(figure, path)


def plot_comparison(models: Sequence[str], accuracies: Sequence[float], path: Path | None = None,
                    baseline: float | None = None, balanced: Sequence[float] | None = None) -> bytes:
    """Bars of test accuracy (and balanced accuracy) per model, with the majority-class baseline."""
    models = list(models)
    figure = new_figure(max(4.5, 1.3 * len(models) + 1.5), 4.2)
    axes = figure.add_subplot()
    positions = np.arange(len(models))
    width = 0.4 if balanced is not None else 0.6
    offset = width / 2 if balanced is not None else 0.0
    bars = axes.bar(positions - offset, list(accuracies), width, color="tab:blue", label="accuracy")
    axes.bar_label(bars, labels=[format_score(a) for a in accuracies], padding=2, fontsize=8)
    if balanced is not None:
        more = axes.bar(positions + offset, list(balanced), width, color="tab:orange", hatch="//",
                        label="balanced accuracy")
        axes.bar_label(more, labels=[format_score(a) for a in balanced], padding=2, fontsize=8)
    if baseline is not None:
        axes.axhline(baseline, color="gray", linestyle=":", label=f"majority class ({format_score(baseline)})")
    axes.set_xticks(positions, labels=models, rotation=20)
    axes.set_ylim(0, 1.12)
    axes.set_xlabel("model")
    axes.set_ylabel("score on the test split")
    axes.set_title("Test accuracy per model" + (" (and balanced accuracy)" if balanced is not None else ""))
    axes.legend(loc="upper center", bbox_to_anchor=(0.5, -0.25), ncols=3, fontsize=8, frameon=False)
    return save_figure(figure, path)


def plot_training_curves(histories: Mapping[str, pd.DataFrame], best_epochs: Mapping[str, int],
                         path: Path | None = None, title: str = "Training curves") -> bytes:
    """Accuracy and loss per epoch of every network: colour per model, line style per split.

    Args:
        histories: ``{model: history}`` with columns ``epoch`` (1..N), ``accuracy``,
            ``val_accuracy``, ``loss``, ``val_loss`` (and optionally ``phase``).
        best_epochs: ``{model: epoch}`` of the kept weights; marked with a star on
            the validation curve and a dotted vertical line.
        path: Where to write the PNG (None: only return the bytes).
        title: Figure title.
    """
    figure = new_figure(11, 4.2)
    panels = figure.subplots(1, 2)
    colors = [f"C{i}" for i in range(10)]
    for axes, metric in zip(panels, ("accuracy", "loss")):
        for index, (model, history) in enumerate(histories.items()):
            color = colors[index % len(colors)]
            for split, column in (("train", metric), ("val", f"val_{metric}")):
                axes.plot(history["epoch"], history[column], color=color, linestyle=SPLIT_STYLES[split],
                          marker=SPLIT_MARKERS[split], markersize=3, linewidth=1.6)
            best = best_epochs.get(model)
            if best is not None and (history["epoch"] == best).any():
                value = float(history.loc[history["epoch"] == best, f"val_{metric}"].iloc[0])
                axes.axvline(best, color=color, linestyle=":", linewidth=1)
                axes.plot([best], [value], marker="*", markersize=15, color=color, markeredgecolor="black",
                          linestyle="none")
            if "phase" in history and (history["phase"] == 2).any():
                start = history.loc[history["phase"] == 2, "epoch"].min() - 0.5
                axes.axvline(start, color="gray", linestyle="-.", linewidth=1)
        axes.set_xlabel("epoch")
        axes.set_ylabel(metric if metric == "accuracy" else "loss (cross-entropy)")
        axes.set_title(metric)
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.grid(alpha=0.3)
    handles = [Line2D([], [], color=colors[i % len(colors)], linewidth=2, label=model)
               for i, model in enumerate(histories)]
    handles += [Line2D([], [], color="black", linestyle=SPLIT_STYLES[s], marker=SPLIT_MARKERS[s], markersize=4,
                       label=f"{s} split") for s in SPLIT_STYLES]
    handles.append(Line2D([], [], color="black", marker="*", markersize=12, linestyle="none",
                          label="best epoch (kept weights)"))
    if any("phase" in h and (h["phase"] == 2).any() for h in histories.values()):
        handles.append(Line2D([], [], color="gray", linestyle="-.", label="phase 2 starts (top layers unfrozen)"))
    panels[1].legend(handles=handles, loc="upper right", fontsize=8)
    figure.suptitle(title)
    return save_figure(figure, path)


def plot_image_grid(images: np.ndarray, titles: Sequence[str], mistakes: Sequence[bool],
                    path: Path | None = None, title: str | None = None) -> bytes:
    """A grid of images, each titled; mistakes get a red title, a red border and a cross."""
    count = len(images)
    cols = max(1, math.ceil(math.sqrt(count)))
    rows = max(1, math.ceil(count / cols))
    title = textwrap.fill(title, max(30, int(10 * 2.2 * cols))) if title else None  # ~10 characters per inch
    figure = new_figure(2.2 * cols, 2.4 * rows + (0.3 + 0.25 * title.count("\n") if title else 0))
    for position, (image, label, wrong) in enumerate(zip(images, titles, mistakes, strict=True)):
        axes = figure.add_subplot(rows, cols, position + 1)
        axes.imshow(image)
        axes.set_xticks([])
        axes.set_yticks([])
        color = MISTAKE_COLOR if wrong else CORRECT_COLOR
        axes.set_title(("✗ " if wrong else "") + label, color=color, fontsize=9)
        for spine in axes.spines.values():
            spine.set_visible(bool(wrong))
            spine.set_color(MISTAKE_COLOR)
            spine.set_linewidth(4)
    if title:
        figure.suptitle(title)
    return save_figure(figure, path)
