"""Core of the ``evaluate`` stage: every trained model on the same held-out TEST split.

Models come from :mod:`tlpipe.core.names` (the one list of names; each model's file
is :func:`tlpipe.core.names.model_file`). Missing models are skipped (and
reported), not an error; no model at all is.

Outputs in ``out_dir`` (a plain folder, each file written atomically):

* ``metrics.json``: every metric per model, per-class precision/recall/F1 and
  the confusion matrix included;
* ``comparison.csv``: one row per model (family, selection score, test metrics);
* ``predictions.csv``: one row per test image, each model's class and probability;
* ``confusion.csv`` (model, actual, predicted; DVC's confusion plot) and
  ``confusion_<model>.png`` (counts in every cell);
* ``comparison.png``; ``grid.png`` (test images as the gate's candidate model
  classifies them: mistakes from every true class, marked in red, then some
  correct ones; :func:`choose_grid_rows`);
* ``curves.csv`` and ``curves.png`` (training curves of the networks, best
  epoch marked), when the finetune folder has histories;
* ``imagenet_top1.md``, when the features folder has ``imagenet_top1.csv``;
* ``ensemble.csv`` (every ensemble try) and, when one is kept, ``ensemble.json``
  (:mod:`tlpipe.evaluation.ensemble`; the kept ``ensemble`` is then in every table above).

The evaluate tasks add ``promotion.json`` and ``report.html`` after the gate.

An SVM's predicted class is ``SVC.predict`` (the decision function); its
probabilities come from Platt scaling (``predict_proba``), which on small data
can disagree with ``predict`` near the boundary. A network's predicted class is
the argmax of its softmax.
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import joblib
import numpy as np
import pandas as pd
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    f1_score,
    precision_recall_fscore_support,
    roc_auc_score,
)

from tlpipe.render import plots
from tlpipe.render import html as report
from tlpipe.data import store
from tlpipe.core.params import DataParams, EvaluateParams
from tlpipe.core.errors import UserError
from tlpipe.render.formats import SCORE_DIGITS, format_score
from tlpipe.core.names import MODEL_NAMES, REPORTED_MODELS, SVM_MODELS, model_family, model_file
from tlpipe.core.sources import ELPV
from tlpipe.train.svm import load_inputs

DIGITS = SCORE_DIGITS
METRIC_KEYS = {"accuracy": "acc", "balanced_accuracy": "bal_acc", "f1_macro": "f1", "roc_auc": "auc"}
"""Test metric -> its short key in ``metrics/evaluate*.json`` (what ``dvc metrics show`` prints)."""
SELECTION_METRIC = {"svm": "CV accuracy", "network": "best validation accuracy",
                    "ensemble": "validation accuracy (calibrated average)"}
"""What each model family is selected by (never test accuracy)."""
SELECTION_SPLIT = {"svm": "train", "network": "val", "ensemble": "val"}
"""The split each family's selection accuracy is measured on (CV folds cover all of train)."""
WILSON_Z = 1.96
"""95 % two-sided: the candidate is ranked by the lower end of this Wilson interval."""
GATE_OUTPUTS = ("promotion.json", "report.html")
"""Files the evaluate tasks write into ``out_dir`` after the gate."""
GRID_SEED = 0
"""Seed of which test images the prediction grid shows (:func:`choose_grid_rows`)."""
GRID_CORRECT_SHARE = 0.25
"""Share of the prediction grid kept for correctly classified images."""


class NoModelsError(UserError, FileNotFoundError):
    """Raised when not one model file exists to evaluate."""


def round_float(value: float) -> float:
    """A JSON-native float rounded to :data:`DIGITS` decimals."""
    return round(float(value), DIGITS)


def compute_roc_auc(y_true: np.ndarray, proba: np.ndarray | None, n_classes: int) -> float | None:
    """ROC AUC: binary on ``proba[:, 1]``, multiclass one-vs-rest macro; None when undefined.

    Undefined means no probabilities, fewer than two classes, or a class absent
    from ``y_true``.
    """
    if proba is None or n_classes < 2 or len(np.unique(y_true)) < n_classes:
        return None
    proba = np.asarray(proba, dtype=np.float64)
    if n_classes == 2:
        return round_float(roc_auc_score(y_true, proba[:, 1]))
    proba = proba / proba.sum(axis=1, keepdims=True)
    return round_float(roc_auc_score(y_true, proba, multi_class="ovr", average="macro",
                                     labels=np.arange(n_classes)))


def compute_metrics(y_true: np.ndarray, y_pred: np.ndarray, proba: np.ndarray | None,
                    classes: list[str]) -> dict:
    """Classification metrics of one model, JSON-ready.

    Args:
        y_true: True integer labels.
        y_pred: Predicted integer labels.
        proba: (n, n_classes) class probabilities, or None.
        classes: Class names in label order.

    Returns:
        accuracy, balanced_accuracy, roc_auc (or None), f1_macro, per_class
        ({class: {precision, recall, f1, support}}) and confusion_matrix (rows:
        actual, columns: predicted, in label order).
    """
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    labels = np.arange(len(classes))
    precision, recall, f1, support = precision_recall_fscore_support(
        y_true, y_pred, labels=labels, zero_division=0)
    per_class = {
        name: {"precision": round_float(precision[i]), "recall": round_float(recall[i]),
               "f1": round_float(f1[i]), "support": int(support[i])}
        for i, name in enumerate(classes)
    }
    present = np.unique(y_true)
    return {
        "accuracy": round_float(accuracy_score(y_true, y_pred)),
        "balanced_accuracy": round_float(recall[present].mean()),
        "roc_auc": compute_roc_auc(y_true, proba, len(classes)),
        "f1_macro": round_float(f1_score(y_true, y_pred, labels=labels, average="macro", zero_division=0)),
        "per_class": per_class,
        "confusion_matrix": confusion_matrix(y_true, y_pred, labels=labels).tolist(),
    }


def dvc_metrics(metrics: dict[str, dict]) -> tuple[dict, dict]:
    """The two DVC metrics files of the stage, numbers only, short keys.

    Returns:
        ``(accuracies, details)``: ``{model: {"acc": ...}}`` for
        ``metrics/evaluate.json`` (one column per model in ``dvc metrics show``) and
        ``{model: {"bal_acc", "f1", "auc"}}`` for ``metrics/evaluate_detail.json``
        (``auc`` left out where undefined). Per-class numbers stay in the
        report folder's ``metrics.json``.
    """
    accuracies = {name: {"acc": values["accuracy"]} for name, values in metrics.items()}
    details = {name: {short: values[key] for key, short in METRIC_KEYS.items()
                      if key != "accuracy" and isinstance(values.get(key), (int, float))}
               for name, values in metrics.items()}
    return accuracies, details


def read_test_accuracies(metrics_path: Path) -> dict[str, float]:
    """``{model: test accuracy}`` from ``metrics/evaluate.json`` (empty when the file is absent)."""
    path = Path(metrics_path)
    if not path.is_file():
        return {}
    return {name: float(values["acc"]) for name, values in json.loads(path.read_text()).items()
            if isinstance(values, dict) and isinstance(values.get("acc"), (int, float))}


def predict_svm(model_path: Path, X: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """Predict with a saved SVM: labels from ``predict``, probabilities when it has them."""
    model = joblib.load(model_path)
    proba = model.predict_proba(X) if hasattr(model, "predict_proba") else None  # SVC without probability: False
    return model.predict(X), proba


def predict_keras(model_path: Path, store_dir: Path, split: str = "test",
                  batch_size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Predict with a saved ``.keras`` model, streaming the split's uint8 images in batches.

    The model must output class probabilities (n, n_classes); a single sigmoid
    unit is read as P(class 1).
    """
    import keras

    import tlpipe.features.backbones  # noqa: F401  registers the custom layers

    model = keras.saving.load_model(model_path, compile=False)
    batches = [np.asarray(model.predict_on_batch(batch), dtype=np.float64)
               for batch in store.iter_npy_batches(store.split_path(Path(store_dir), split), batch_size)]
    proba = np.concatenate(batches)
    if proba.shape[1] == 1:
        proba = np.concatenate([1 - proba, proba], axis=1)
    return proba.argmax(axis=1), proba


def find_models(svm_dir: Path | None, finetune_dir: Path | None) -> tuple[dict[str, Path], dict[str, str]]:
    """Which model files exist, in :data:`MODEL_NAMES` order, and which are missing."""
    found, skipped = {}, {}
    for name in MODEL_NAMES:
        folder = svm_dir if model_family(name) == "svm" else finetune_dir
        if folder is None:
            skipped[name] = f"no {model_family(name)} model folder given"
            continue
        path = model_file(Path(svm_dir or "."), Path(finetune_dir or "."), name)
        if path.is_file():
            found[name] = path
        else:
            skipped[name] = f"no model file {path}"
    return found, skipped


def predict_model(name: str, path: Path, store_dir: Path, features_dir: Path,
                  pixel_size: int, split: str = "test") -> tuple[np.ndarray, np.ndarray | None]:
    """Predict one split (default: test) with one trained model, whatever its family."""
    if model_family(name) == "network":
        return predict_keras(path, store_dir, split)
    X = load_inputs(store_dir, features_dir, split, SVM_MODELS[name], pixel_size)
    return predict_svm(path, X)


def check_predictions(name: str, y_pred: np.ndarray, proba: np.ndarray | None, rows: int, n_classes: int) -> None:
    """Fail clearly when a model's outputs do not match the test split or the class list."""
    if len(y_pred) != rows:
        raise ValueError(f"{name}: {len(y_pred)} predictions for {rows} test images")
    if proba is not None and proba.shape != (rows, n_classes):
        raise ValueError(f"{name}: probabilities of shape {proba.shape}, expected ({rows}, {n_classes}) "
                         f"(one column per class of the store)")


def choose_best(metrics: dict[str, dict]) -> str:
    """The best model on the test split: highest accuracy, then balanced accuracy, then first in order."""
    return max(metrics, key=lambda m: (metrics[m]["accuracy"], metrics[m]["balanced_accuracy"],
                                       -REPORTED_MODELS.index(m)))


def selection_scores(svm_dir: Path | None, finetune_dir: Path | None, models: list[str]) -> dict[str, float]:
    """What each model is selected by (see :data:`SELECTION_METRIC`), for the models given, in their order.

    SVMs: ``cv_accuracy`` in ``<svm_dir>/summary.json``; networks:
    ``best_val_accuracy`` in ``<finetune_dir>/<name>_metrics.json``. Models
    without a recorded score are left out.
    """
    scores: dict[str, float] = {}
    summary = Path(svm_dir) / "summary.json" if svm_dir is not None else None
    svm_summaries = json.loads(summary.read_text()) if summary is not None and summary.is_file() else {}
    for name in models:
        if model_family(name) == "svm" and "cv_accuracy" in svm_summaries.get(name, {}):
            scores[name] = float(svm_summaries[name]["cv_accuracy"])
        elif model_family(name) == "network" and finetune_dir is not None:
            path = Path(finetune_dir) / f"{name}_metrics.json"
            if path.is_file():
                scores[name] = float(json.loads(path.read_text())["best_val_accuracy"])
    return scores


def wilson_lower(accuracy: float, n: int, z: float = WILSON_Z) -> float:
    """The lower end of the Wilson score interval of an accuracy measured on ``n`` images (0 when n is 0)."""
    if n <= 0:
        return 0.0
    p = min(max(float(accuracy), 0.0), 1.0)
    centre = p + z * z / (2 * n)
    margin = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return (centre - margin) / (1 + z * z / n)


def selection_bounds(scores: dict[str, float], split_sizes: dict[str, int]) -> dict[str, float]:
    """Each score's :func:`wilson_lower` bound, ``n`` = the size of the split it was measured on.

    Args:
        scores: :func:`selection_scores`.
        split_sizes: Images per split (``train``, ``val``).
    """
    return {name: round(wilson_lower(score, split_sizes.get(SELECTION_SPLIT[model_family(name)], 0)), DIGITS)
            for name, score in scores.items()}


def choose_candidate(scores: dict[str, float], metrics: dict[str, dict],
                     split_sizes: dict[str, int] | None = None) -> str:
    """The model put forward to the gate, by its selection accuracy (never test accuracy).

    With ``split_sizes`` the models are ranked by the lower end of the 95 % Wilson interval of
    that accuracy (:func:`selection_bounds`), so a network's accuracy on a small validation split
    (1.0 on 24 images: bound 0.86) does not outrank an SVM's CV accuracy over a larger train split
    (0.96 on 221 images: bound 0.93); on equal sizes the order is the plain scores' order. Ties go
    to the first in :data:`MODEL_NAMES` order. Without any selection score (models trained outside
    the pipeline) the best on test is taken.
    """
    from tlpipe.tracking.registry import select_best

    ranked = selection_bounds(scores, split_sizes) if split_sizes is not None else scores
    ordered = {name: ranked[name] for name in REPORTED_MODELS if name in ranked and name in metrics}
    return select_best(ordered) if ordered else choose_best(metrics)


def load_test_rows(store_dir: Path) -> pd.DataFrame:
    """The manifest rows of the test split, in row order."""
    manifest = store.load_manifest(store_dir)
    return manifest[manifest["split"] == "test"].sort_values("index").reset_index(drop=True)


def count_images(manifest: pd.DataFrame, classes: list[str]) -> list[dict]:
    """Images per class and split: one row per class in label order, then an 'all classes' row.

    Each row: ``class``, one count per split of :data:`tlpipe.data.store.SPLITS`, ``total``.
    """
    rows = []
    for name in [*classes, None]:
        part = manifest if name is None else manifest[manifest["class_name"] == name]
        splits = {split: int((part["split"] == split).sum()) for split in store.SPLITS}
        rows.append({"class": "all classes" if name is None else name, **splits, "total": int(len(part))})
    return rows


def package_version(name: str) -> str:
    """An installed distribution's version, or 'not installed'."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


def name_source(data: DataParams) -> tuple[str, str]:
    """The data set's name and source as the report shows them, from the ``data`` params.

    ELPV: ``elpv (defect labels, defect probability >= 0.5)`` or ``elpv (module-type labels)``, from
    the elpv-dataset package and its version; a folder: the folder's name, from its path as given.
    """
    if data.source == ELPV:
        labels = (f"defect labels, defect probability >= {data.elpv_threshold:g}" if data.elpv_label == "defect"
                  else "module-type labels")
        return f"elpv ({labels})", f"Python package elpv-dataset {package_version('elpv-dataset')}"
    folder = Path(data.source).expanduser()
    return folder.name or str(folder), f"image folder {folder}"


def describe_dataset(store_dir: Path, data: DataParams) -> dict:
    """What the report's data-set section shows: name, source, task (when named) and images per class and split."""
    name, source = name_source(data)
    counts = count_images(store.load_manifest(store_dir), store.load_classes(store_dir))
    return {"name": name, "source": source, "task": None, "counts": counts}


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


def evaluate_models(store_dir: Path, features_dir: Path, svm_dir: Path | None, finetune_dir: Path | None,
                    out_dir: Path, params: EvaluateParams, pixel_size: int) -> dict:
    """Evaluate every existing model on the test split and write the reports.

    Args:
        store_dir: The image store.
        features_dir: The features folder (SVM inputs, ``imagenet_top1.csv``).
        svm_dir: Folder of ``<name>.joblib`` SVMs and ``summary.json`` (None: no SVMs).
        finetune_dir: Folder of ``<name>.keras`` networks with their histories (None: no networks).
        out_dir: Where the reports go (created if needed).
        params: The evaluate params (``grid_images``).
        pixel_size: Side of the raw-pixel inputs of ``svm_pixels``.

    Returns:
        ``{"metrics": {model: metrics}, "skipped": {model: reason},
        "best": {"model", "accuracy", "balanced_accuracy"}`` (best on test),
        ``"selection": {model: score}``, ``"candidate"`` (the model the gate
        considers, chosen by selection score), ``"classes"``, ``"test_images"``,
        ``"grid": {"model", "caption"}`` (what ``grid.png`` shows, :func:`describe_grid`),
        ``"ensemble"`` (every ensemble try and the keep decision, :func:`tlpipe.evaluation.ensemble.add_ensemble`;
        when kept, ``ensemble`` is in ``metrics`` and ``selection`` like any model)}.

    Raises:
        NoModelsError: When no model file exists.
    """
    store_dir, out_dir = Path(store_dir), Path(out_dir)
    found, skipped = find_models(svm_dir, finetune_dir)
    if not found:
        raise NoModelsError(f"no model to evaluate: looked for {list(MODEL_NAMES)} as "
                            f"{svm_dir}/<name>.joblib and {finetune_dir}/<name>.keras")
    classes = store.load_classes(store_dir)
    y_true = store.split_labels(store_dir, "test")
    predictions = {name: predict_model(name, path, store_dir, features_dir, pixel_size)
                   for name, path in found.items()}
    for name, (y_pred, proba) in predictions.items():
        check_predictions(name, y_pred, proba, len(y_true), len(classes))
    metrics = {name: compute_metrics(y_true, y_pred, proba, classes) for name, (y_pred, proba) in predictions.items()}
    scores = selection_scores(svm_dir, finetune_dir, list(metrics))
    counts = store.load_manifest(store_dir)["split"].value_counts()
    sizes = {split: int(counts.get(split, 0)) for split in ("train", "val")}
    from tlpipe.evaluation import ensemble  # built on this module's predictions and bounds (it imports them)

    tried = ensemble.add_ensemble(found, store_dir, features_dir, pixel_size, predictions, metrics, scores, sizes,
                                  y_true, classes)
    best, candidate = choose_best(metrics), choose_candidate(scores, metrics, sizes)
    out_dir.mkdir(parents=True, exist_ok=True)
    remove_stale(out_dir, list(metrics))
    write_outputs(out_dir, metrics, predictions, load_test_rows(store_dir), classes, scores)
    ensemble.write_outputs(out_dir, tried, classes)
    grid = write_grid(store_dir, out_dir, candidate, y_true, predictions[candidate][0], classes, params.grid_images)
    write_curves(finetune_dir, out_dir)
    write_imagenet_table(features_dir, out_dir)
    return {"metrics": metrics, "skipped": skipped,
            "best": {"model": best, "accuracy": metrics[best]["accuracy"],
                     "balanced_accuracy": metrics[best]["balanced_accuracy"]},
            "selection": scores, "selection_bounds": selection_bounds(scores, sizes), "selection_sizes": sizes,
            "candidate": candidate, "classes": list(classes), "test_images": int(len(y_true)),
            "grid": {"model": candidate, "caption": grid}, "ensemble": tried}


def describe_sizes(sizes: dict[str, int] | None) -> str:
    """' (CV over N train images, validation on M)' for the report, or '' when unknown."""
    if not sizes:
        return ""
    return f" (CV over {sizes.get('train', '?')} train images, validation on {sizes.get('val', '?')})"


def read_png(path: Path) -> bytes | None:
    """A PNG's bytes, or None when the file is absent."""
    return Path(path).read_bytes() if Path(path).is_file() else None


def dataset_section(dataset: dict | None) -> report.DataSet | None:
    """The report's data-set section from :func:`describe_dataset`'s dict (None: no section)."""
    if not dataset:
        return None
    columns = {"class": "class", **{split: split for split in store.SPLITS}, "total": "total"}
    return report.DataSet(dataset["name"], dataset["source"], report.Table(columns, dataset["counts"]),
                          dataset.get("task"))


def build_report(out_dir: Path, result: dict, decision: dict | None, features_dir: Path | None,
                 facts: list[tuple[str, str]] | None = None, links: list[tuple[str, str]] | None = None,
                 max_imagenet_rows: int = 200, sections: list[report.TableSection] | None = None,
                 ) -> report.ReportData:
    """Gather the report's content from an :func:`evaluate_models` result and its output folder.

    The data-set section comes from ``result["dataset"]`` (:func:`describe_dataset`, added by the
    evaluate task), the grid's caption from ``result["grid"]``.

    Args:
        out_dir: The folder :func:`evaluate_models` wrote.
        result: Its return value.
        decision: The gate's decision (``promotion.json``), or None.
        features_dir: Where ``imagenet_top1.csv`` is (None: no ImageNet table).
        facts: Extra header facts (label, value), e.g. data hash and run ids.
        links: (label, where) pairs for the "Where to look next" section.
        max_imagenet_rows: Rows of the ImageNet table shown (the rest is counted).
        sections: Extra table sections, shown after the model comparison.
    """
    out_dir = Path(out_dir)
    metrics, candidate = result["metrics"], result["candidate"]
    comparison = build_comparison(metrics, result.get("selection", {}))
    columns = {"model": "model", "family": "family", "selected_by": "selected by",
               "selection_score": "selection score", "accuracy": "test accuracy",
               "balanced_accuracy": "balanced accuracy", "f1_macro": "macro F1", "roc_auc": "ROC AUC"}
    table = report.Table(columns, comparison.to_dict(orient="records"), highlight=[candidate])
    chart = read_png(out_dir / "comparison.png")
    confusions = [report.Picture(model, png, f"test accuracy {format_score(metrics[model]['accuracy'])}")
                  for model in metrics if (png := read_png(out_dir / f"confusion_{model}.png"))]
    curves = read_png(out_dir / "curves.png")
    grid = read_png(out_dir / "grid.png")
    imagenet, notes = None, {}
    frame = read_imagenet_table(features_dir) if features_dir is not None else None
    if frame is not None:
        shown = frame.head(max_imagenet_rows)
        imagenet = report.Table({"index": "index", "relpath": "image", "class_name": "true class",
                                 "imagenet_top1": "ImageNet top-1", "imagenet_probability": "probability"},
                                shown.to_dict(orient="records"))
        if len(frame) > len(shown):
            notes["imagenet"] = f"First {len(shown)} of {len(frame)} test images (all in imagenet_top1.md)."
    notes["comparison"] = (f"{result.get('test_images', '?')} test images. The highlighted row is the model put "
                           "forward to the champion gate: chosen by CV accuracy (SVMs) or best validation accuracy "
                           "(networks), never by test accuracy, ranked by the lower end of its 95 % Wilson "
                           "interval, so an accuracy measured on few images counts for less"
                           f"{describe_sizes(result.get('selection_sizes'))}.")
    notes["predictions"] = ("Each image is titled with its true and predicted class; mistakes come first, in red "
                            "with a ✗ and a red frame, then correctly classified images.")
    now = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    dataset = dataset_section(result.get("dataset"))
    header = [("Generated", now), *([("Data set", dataset.name)] if dataset else []),
              ("Classes", ", ".join(result.get("classes", []))), *(facts or [])]
    return report.ReportData(
        title="tlpipe: model comparison and promotion", facts=header, dataset=dataset, decision=decision,
        comparison=table, sections=sections or [],
        comparison_chart=report.Picture("Test accuracy per model", chart, "dotted line: always predicting the "
                                        "majority class") if chart else None,
        confusions=confusions,
        curves=report.Picture("Training curves", curves, "colour = network, line style = split") if curves else None,
        grid=report.Picture(f"Test images as {candidate} sees them", grid,
                            result.get("grid", {}).get("caption", "")) if grid else None,
        imagenet=imagenet, skipped=result.get("skipped", {}), links=links or [], notes=notes)
