"""The evaluate stage's files in its report folder: predictions, comparison, confusions, the image grid, the
training curves and the ImageNet table (see :mod:`tlpipe.evaluation.evaluate` for the list)."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from tlpipe.core.names import MODEL_NAMES, model_family
from tlpipe.data import store
from tlpipe.evaluation.choice import SELECTION_METRIC
from tlpipe.evaluation.metrics import DIGITS, round_float
from tlpipe.render import plots
from tlpipe.render.formats import format_score

GATE_OUTPUTS = ("promotion.json", "report.html")
"""Files the evaluate tasks write into ``out_dir`` after the gate."""


GRID_SEED = 0
"""Seed of which test images the prediction grid shows (:func:`choose_grid_rows`)."""


GRID_CORRECT_SHARE = 0.25
"""Share of the prediction grid kept for correctly classified images."""


def build_predictions(rows: pd.DataFrame, predictions: dict[str, tuple], classes: list[str]) -> pd.DataFrame:
    """One row per test image: index, relpath, class_name and each model's class and probability."""
    frame = rows[["index", "relpath", "class_name"]].copy()
    names = np.asarray(classes)
    for model, (y_pred, proba) in predictions.items():
        frame[model] = names[y_pred]
        chosen = proba[np.arange(len(y_pred)), y_pred] if proba is not None else np.full(len(y_pred), np.nan)
        frame[f"{model}_probability"] = np.round(chosen.astype(float), DIGITS)
    return frame


def build_comparison(metrics: dict[str, dict], scores: dict[str, float]) -> pd.DataFrame:
    """One row per evaluated model: family, selection score and the test metrics."""
    return pd.DataFrame([{
        "model": name, "family": model_family(name), "selected_by": SELECTION_METRIC[model_family(name)],
        "selection_score": scores.get(name), "accuracy": values["accuracy"],
        "balanced_accuracy": values["balanced_accuracy"], "f1_macro": values["f1_macro"],
        "roc_auc": values["roc_auc"],
    } for name, values in metrics.items()])


def remove_stale(out_dir: Path, models: list[str]) -> None:
    """Delete outputs of earlier runs that this run will not rewrite.

    Only files this module (or the tasks after the gate) name are touched:
    ``confusion_<m>.png`` of models not evaluated now, the curve and ImageNet
    files (rewritten when their inputs exist), the gate's ``promotion.json`` and
    ``report.html``, and the per-model ``confusion/`` folder and ``grid_<m>.png``
    of older versions.
    """
    stale = [out_dir / "imagenet_top1.md", out_dir / "curves.csv", out_dir / "curves.png"]
    stale += [out_dir / name for name in GATE_OUTPUTS]
    for model in MODEL_NAMES:
        stale.append(out_dir / f"grid_{model}.png")
        if model not in models:
            stale.append(out_dir / f"confusion_{model}.png")
    for path in stale:
        path.unlink(missing_ok=True)
    shutil.rmtree(out_dir / "confusion", ignore_errors=True)


def escape_markdown(value: object) -> str:
    """A table cell: pipes escaped, newlines flattened."""
    return str(value).replace("|", "\\|").replace("\n", " ")


def read_imagenet_table(features_dir: Path) -> pd.DataFrame | None:
    """The features folder's ``imagenet_top1.csv`` (test images), or None when absent."""
    source = Path(features_dir) / "imagenet_top1.csv"
    if not source.is_file():
        return None
    return pd.read_csv(source, dtype={"relpath": str, "class_name": str, "imagenet_top1": str})


def write_imagenet_table(features_dir: Path, out_dir: Path) -> bool:
    """Write ``imagenet_top1.md`` from the features folder's ``imagenet_top1.csv``; False if absent."""
    frame = read_imagenet_table(features_dir)
    if frame is None:
        return False
    lines = ["# What the ImageNet network sees in each test image", "",
             "| index | image | true class | ImageNet top-1 | probability |",
             "|---:|---|---|---|---:|"]
    for row in frame.itertuples(index=False):
        cells = [row.index, row.relpath, row.class_name, row.imagenet_top1, format_score(row.imagenet_probability)]
        lines.append("| " + " | ".join(escape_markdown(c) for c in cells) + " |")
    store.write_atomic(out_dir / "imagenet_top1.md", "\n".join(lines) + "\n")
    return True


@dataclass(frozen=True)
class GridSample:
    """The test images a prediction grid shows, out of how many.

    ``mistakes`` and ``correct`` are row indices into the test split, each sorted by (true class, row).
    """

    mistakes: tuple[int, ...]
    correct: tuple[int, ...]
    total_mistakes: int
    total_correct: int
    mistakes_per_class: dict[int, tuple[int, int]]
    """``{true class: (mistakes shown, mistakes in all)}`` for every class with at least one mistake."""

    @property
    def rows(self) -> tuple[int, ...]:
        """Rows in grid order: the mistakes, then the correct images."""
        return self.mistakes + self.correct


def spread_over_classes(rows: np.ndarray, labels: np.ndarray, count: int,
                        rng: np.random.Generator) -> tuple[int, ...]:
    """Up to ``count`` of ``rows``, taken in turn from each class (label order), each class's rows in a seeded order.

    Returns the chosen rows sorted by (label, row), so a grid shows them class by class.
    """
    queues = [list(rng.permutation(rows[labels[rows] == label])) for label in np.unique(labels[rows])]
    chosen: list[int] = []
    while len(chosen) < count and any(queues):
        for queue in queues:
            if queue and len(chosen) < count:
                chosen.append(int(queue.pop(0)))
    return tuple(sorted(chosen, key=lambda row: (labels[row], row)))


def choose_grid_rows(y_true: np.ndarray, y_pred: np.ndarray, count: int, seed: int = GRID_SEED,
                     correct_share: float = GRID_CORRECT_SHARE) -> GridSample:
    """Which test images the prediction grid shows: mistakes spread over every true class, and some correct ones.

    ``int(count * correct_share)`` places go to correct images (fewer when there are fewer), the rest
    to mistakes taken in turn from each true class, so every class with mistakes appears while there
    are at least as many places as such classes; places left over go to the other kind. The same
    seed gives the same images.

    Args:
        y_true: True labels of the test split.
        y_pred: The model's predicted labels.
        count: Places in the grid.
        seed: Seed of the order within each class.
        correct_share: Share of the places kept for correct images.
    """
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    wrong, right = np.flatnonzero(y_true != y_pred), np.flatnonzero(y_true == y_pred)
    n_wrong = min(len(wrong), count - min(len(right), int(count * correct_share)))
    rng = np.random.default_rng(seed)
    mistakes = spread_over_classes(wrong, y_true, n_wrong, rng)
    correct = spread_over_classes(right, y_true, min(len(right), count - n_wrong), rng)
    shown = y_true[list(mistakes)] if mistakes else np.array([], dtype=int)
    per_class = {int(label): (int(np.sum(shown == label)), int(np.sum(y_true[wrong] == label)))
                 for label in np.unique(y_true[wrong])}
    return GridSample(mistakes, correct, len(wrong), len(right), per_class)


def describe_grid(sample: GridSample, classes: list[str]) -> str:
    """What a grid shows, in words: '12 of 30 mistakes, from every class with mistakes (a: 6 of 18, ...), and ...'."""
    correct = (f"{len(sample.correct)} of {sample.total_correct} correct images" if sample.total_correct
               else "no correct images (the model has none)")
    if not sample.total_mistakes:
        return f"no mistakes; {correct}"
    per_class = ", ".join(f"{classes[label]}: {shown} of {total}"
                          for label, (shown, total) in sample.mistakes_per_class.items() if shown)
    covered = sum(1 for shown, _ in sample.mistakes_per_class.values() if shown)
    which = ("every class with mistakes" if covered == len(sample.mistakes_per_class)
             else f"{covered} of {len(sample.mistakes_per_class)} classes with mistakes")
    return f"{len(sample.mistakes)} of {sample.total_mistakes} mistakes, from {which} ({per_class}), and {correct}"


def write_grid(store_dir: Path, out_dir: Path, model: str, y_true: np.ndarray, y_pred: np.ndarray,
               classes: list[str], count: int) -> str:
    """Draw ``grid.png``: test images as ``model`` classifies them (:func:`choose_grid_rows`); return its caption.

    Each image is titled with its true and predicted class; mistakes come first, in red with a ✗ and a red frame.
    """
    sample = choose_grid_rows(y_true, y_pred, count)
    rows = np.asarray(sample.rows, dtype=np.int64)
    images = store.read_rows(store.split_path(store_dir, "test"), rows)
    titles = [f"true: {classes[y_true[i]]}\npredicted: {classes[y_pred[i]]}" for i in rows]
    caption = describe_grid(sample, classes)
    plots.plot_image_grid(images, titles, [bool(y_pred[i] != y_true[i]) for i in rows], out_dir / "grid.png",
                          title=f"{model} on {len(y_true)} test images: {caption}")
    return caption


def read_histories(finetune_dir: Path | None) -> tuple[dict[str, pd.DataFrame], dict[str, int]]:
    """Per-epoch histories and best epochs of the networks that have them, in model order."""
    histories, best = {}, {}
    if finetune_dir is None:
        return histories, best
    for name in MODEL_NAMES:
        if model_family(name) != "network":
            continue
        path = Path(finetune_dir) / f"{name}_history.csv"
        if not path.is_file():
            continue
        histories[name] = pd.read_csv(path)
        summary = Path(finetune_dir) / f"{name}_metrics.json"
        if summary.is_file():
            best[name] = int(json.loads(summary.read_text())["best_epoch"])
    return histories, best


def curves_frame(histories: dict[str, pd.DataFrame], best: dict[str, int]) -> pd.DataFrame:
    """Long table for DVC's training-curve plots: model, epoch, split, accuracy, loss, best (1 at the best epoch)."""
    rows = []
    for model, history in histories.items():
        for record in history.to_dict(orient="records"):
            for split, prefix in (("train", ""), ("val", "val_")):
                rows.append({"model": model, "epoch": int(record["epoch"]), "split": split,
                             "accuracy": round_float(record[f"{prefix}accuracy"]),
                             "loss": round_float(record[f"{prefix}loss"]),
                             "best": int(split == "val" and best.get(model) == int(record["epoch"]))})
    return pd.DataFrame(rows, columns=["model", "epoch", "split", "accuracy", "loss", "best"])


def write_curves(finetune_dir: Path | None, out_dir: Path) -> bool:
    """Write ``curves.csv`` and ``curves.png`` from the networks' histories; False when there are none."""
    histories, best = read_histories(finetune_dir)
    if not histories:
        return False
    store.write_csv(out_dir / "curves.csv", curves_frame(histories, best))
    plots.plot_training_curves(histories, best, out_dir / "curves.png",
                               "Networks per epoch: solid = train, dashed = validation, ★ = kept (best) epoch")
    return True


def write_outputs(out_dir: Path, metrics: dict[str, dict], predictions: dict[str, tuple],
                  rows: pd.DataFrame, classes: list[str], scores: dict[str, float]) -> None:
    """Write metrics.json, comparison.csv, predictions.csv, confusion.csv and the metric PNGs."""
    store.write_json(out_dir / "metrics.json", metrics)
    names = np.asarray(classes)
    confusion = [pd.DataFrame({"model": model, "actual": rows["class_name"].to_numpy(), "predicted": names[y_pred]})
                 for model, (y_pred, _) in predictions.items()]
    store.write_csv(out_dir / "confusion.csv", pd.concat(confusion, ignore_index=True))
    for model in predictions:
        plots.plot_confusion(np.asarray(metrics[model]["confusion_matrix"]), classes,
                             f"{model}: test accuracy {format_score(metrics[model]['accuracy'])}",
                             out_dir / f"confusion_{model}.png")
    comparison = build_comparison(metrics, scores)
    store.write_csv(out_dir / "comparison.csv", comparison)
    store.write_csv(out_dir / "predictions.csv", build_predictions(rows, predictions, classes))
    majority = float(rows["class_name"].value_counts(normalize=True).max()) if len(rows) else None
    plots.plot_comparison(list(comparison["model"]), list(comparison["accuracy"]), out_dir / "comparison.png",
                          majority, balanced=list(comparison["balanced_accuracy"]))
