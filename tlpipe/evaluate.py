"""Core of the ``evaluate`` stage: every trained model on the same held-out TEST split.

Models are found by file: ``<svm_dir>/<name>.joblib`` for the SVMs and
``<finetune_dir>/<name>.keras`` for the networks. Missing models are skipped
(and reported), not an error; no model at all is.

Outputs in ``out_dir`` (a plain folder, each file written atomically):
``metrics.json``, ``comparison.csv``, ``predictions.csv``,
``confusion/<model>.csv`` (DVC's confusion template), ``confusion_<model>.png``,
``comparison.png``, ``grid_<best>.png`` and, when the features folder has one,
``imagenet_top1.md``.

An SVM's predicted class is ``SVC.predict`` (the decision function); its
probabilities come from Platt scaling (``predict_proba``), which on small data
can disagree with ``predict`` near the boundary. A network's predicted class is
the argmax of its softmax.
"""

from __future__ import annotations

from tlpipe.errors import UserError
import os
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

from tlpipe import plots, store
from tlpipe.config import EvaluateParams
from tlpipe.svm import SVM_MODELS, load_inputs

from tlpipe.models import MODEL_NAMES, NETWORK_MODELS as KERAS_MODELS  # noqa: E402
DIGITS = 4


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


def predict_svm(model_path: Path, X: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """Predict with a saved SVM: labels from ``predict``, probabilities when it has them."""
    model = joblib.load(model_path)
    proba = model.predict_proba(X) if getattr(model, "probability", False) else None
    return model.predict(X), proba


def predict_keras(model_path: Path, store_dir: Path, split: str = "test",
                  batch_size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Predict with a saved ``.keras`` model, streaming the split's uint8 images in batches.

    The model must output class probabilities (n, n_classes); a single sigmoid
    unit is read as P(class 1).
    """
    import keras

    import tlpipe.backbones  # noqa: F401  registers the custom layers

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
        folder, suffix = (finetune_dir, ".keras") if name in KERAS_MODELS else (svm_dir, ".joblib")
        path = Path(folder) / f"{name}{suffix}" if folder is not None else None
        if path is not None and path.is_file():
            found[name] = path
        else:
            skipped[name] = f"no model file {path}" if path is not None else "no model folder given"
    return found, skipped


def predict_model(name: str, path: Path, store_dir: Path, features_dir: Path,
                  pixel_size: int) -> tuple[np.ndarray, np.ndarray | None]:
    """Predict the test split with one model, whatever its kind."""
    if name in KERAS_MODELS:
        return predict_keras(path, store_dir, "test")
    X = load_inputs(store_dir, features_dir, "test", SVM_MODELS[name], pixel_size)
    return predict_svm(path, X)


def check_predictions(name: str, y_pred: np.ndarray, proba: np.ndarray | None, rows: int, n_classes: int) -> None:
    """Fail clearly when a model's outputs do not match the test split or the class list."""
    if len(y_pred) != rows:
        raise ValueError(f"{name}: {len(y_pred)} predictions for {rows} test images")
    if proba is not None and proba.shape != (rows, n_classes):
        raise ValueError(f"{name}: probabilities of shape {proba.shape}, expected ({rows}, {n_classes}) "
                         f"(one column per class of the store)")


def choose_best(metrics: dict[str, dict]) -> str:
    """The best model: highest accuracy, then balanced accuracy, then first in order."""
    return max(metrics, key=lambda m: (metrics[m]["accuracy"], metrics[m]["balanced_accuracy"],
                                       -MODEL_NAMES.index(m)))


def load_test_rows(store_dir: Path) -> pd.DataFrame:
    """The manifest rows of the test split, in row order."""
    manifest = store.load_manifest(store_dir)
    return manifest[manifest["split"] == "test"].sort_values("index").reset_index(drop=True)


def build_predictions(rows: pd.DataFrame, predictions: dict[str, tuple], classes: list[str]) -> pd.DataFrame:
    """One row per test image: index, relpath, class_name and each model's class and probability."""
    frame = rows[["index", "relpath", "class_name"]].copy()
    names = np.asarray(classes)
    for model, (y_pred, proba) in predictions.items():
        frame[model] = names[y_pred]
        chosen = proba[np.arange(len(y_pred)), y_pred] if proba is not None else np.full(len(y_pred), np.nan)
        frame[f"{model}_probability"] = np.round(chosen.astype(float), DIGITS)
    return frame


def remove_stale(out_dir: Path, models: list[str], best: str) -> None:
    """Delete per-model outputs of earlier runs that this run will not rewrite.

    Only files this module names are touched: ``confusion_<m>.png`` and
    ``confusion/<m>.csv`` of models not evaluated now, ``grid_<m>.png`` of
    every model but the best, and ``imagenet_top1.md``.
    """
    stale = [out_dir / "imagenet_top1.md"]
    for model in MODEL_NAMES:
        if model not in models:
            stale += [out_dir / f"confusion_{model}.png", out_dir / "confusion" / f"{model}.csv"]
        if model != best:
            stale.append(out_dir / f"grid_{model}.png")
    for path in stale:
        path.unlink(missing_ok=True)


def write_text(path: Path, text: str) -> None:
    """Write a text file atomically."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def escape_markdown(value: object) -> str:
    """A table cell: pipes escaped, newlines flattened."""
    return str(value).replace("|", "\\|").replace("\n", " ")


def write_imagenet_table(features_dir: Path, out_dir: Path) -> bool:
    """Write ``imagenet_top1.md`` from the features folder's ``imagenet_top1.csv``; False if absent."""
    source = Path(features_dir) / "imagenet_top1.csv"
    if not source.is_file():
        return False
    frame = pd.read_csv(source, dtype={"relpath": str, "class_name": str, "imagenet_top1": str})
    lines = ["# What the ImageNet network sees in each test image", "",
             "| index | image | true class | ImageNet top-1 | probability |",
             "|---:|---|---|---|---:|"]
    for row in frame.itertuples(index=False):
        cells = [row.index, row.relpath, row.class_name, row.imagenet_top1, f"{row.imagenet_probability:.4f}"]
        lines.append("| " + " | ".join(escape_markdown(c) for c in cells) + " |")
    write_text(out_dir / "imagenet_top1.md", "\n".join(lines) + "\n")
    return True


def choose_grid_rows(y_true: np.ndarray, y_pred: np.ndarray, count: int) -> np.ndarray:
    """Row indices for the image grid: mistakes first, then correct ones, each in row order."""
    wrong = np.flatnonzero(y_true != y_pred)
    right = np.flatnonzero(y_true == y_pred)
    return np.concatenate([wrong, right])[:count]


def write_grid(store_dir: Path, out_dir: Path, model: str, y_true: np.ndarray, y_pred: np.ndarray,
               classes: list[str], count: int) -> None:
    """Draw ``grid_<model>.png``: test images titled 'predicted (true)', mistakes in red."""
    rows = choose_grid_rows(y_true, y_pred, count)
    images = store.read_rows(store.split_path(store_dir, "test"), rows)
    titles = [f"{classes[y_pred[i]]} ({classes[y_true[i]]})" for i in rows]
    plots.plot_image_grid(images, titles, [bool(y_pred[i] != y_true[i]) for i in rows], out_dir / f"grid_{model}.png")


def write_outputs(out_dir: Path, metrics: dict[str, dict], predictions: dict[str, tuple],
                  rows: pd.DataFrame, classes: list[str]) -> None:
    """Write metrics.json, comparison.csv, predictions.csv, confusion CSVs and the metric PNGs."""
    store.write_json(out_dir / "metrics.json", metrics)
    names = np.asarray(classes)
    for model, (y_pred, _) in predictions.items():
        confusion = pd.DataFrame({"actual": rows["class_name"].to_numpy(), "predicted": names[y_pred]})
        store.write_csv(out_dir / "confusion" / f"{model}.csv", confusion)
        plots.plot_confusion(np.asarray(metrics[model]["confusion_matrix"]), classes,
                             f"{model}: test accuracy {metrics[model]['accuracy']:.3f}",
                             out_dir / f"confusion_{model}.png")
    comparison = pd.DataFrame([{"model": m, "accuracy": v["accuracy"], "balanced_accuracy": v["balanced_accuracy"]}
                               for m, v in metrics.items()])
    store.write_csv(out_dir / "comparison.csv", comparison)
    store.write_csv(out_dir / "predictions.csv", build_predictions(rows, predictions, classes))
    majority = float(rows["class_name"].value_counts(normalize=True).max()) if len(rows) else None
    plots.plot_comparison(list(comparison["model"]), list(comparison["accuracy"]),
                          out_dir / "comparison.png", majority)


def evaluate_models(store_dir: Path, features_dir: Path, svm_dir: Path | None, finetune_dir: Path | None,
                    out_dir: Path, params: EvaluateParams, pixel_size: int) -> dict[str, dict]:
    """Evaluate every existing model on the test split and write the reports.

    Args:
        store_dir: The image store.
        features_dir: The features folder (SVM inputs, ``imagenet_top1.csv``).
        svm_dir: Folder of ``<name>.joblib`` SVMs (None: no SVMs).
        finetune_dir: Folder of ``<name>.keras`` networks (None: no networks).
        out_dir: Where the reports go (created if needed).
        params: The evaluate params (``grid_images``).
        pixel_size: Side of the raw-pixel inputs of ``svm_pixels``.

    Returns:
        ``{"metrics": {model: metrics}, "skipped": {model: reason},
        "best": {"model", "accuracy", "balanced_accuracy"}}``.

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
    best = choose_best(metrics)
    out_dir.mkdir(parents=True, exist_ok=True)
    remove_stale(out_dir, list(metrics), best)
    write_outputs(out_dir, metrics, predictions, load_test_rows(store_dir), classes)
    write_grid(store_dir, out_dir, best, y_true, predictions[best][0], classes, params.grid_images)
    write_imagenet_table(features_dir, out_dir)
    return {"metrics": metrics, "skipped": skipped,
            "best": {"model": best, "accuracy": metrics[best]["accuracy"],
                     "balanced_accuracy": metrics[best]["balanced_accuracy"]}}
