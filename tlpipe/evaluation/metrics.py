"""Test metrics of one model's predictions (accuracy, balanced accuracy, macro F1, ROC AUC, per class, confusion)
and the DVC metrics files made of them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    f1_score,
    precision_recall_fscore_support,
    roc_auc_score,
)

from tlpipe.core.names import TEST_METRICS
from tlpipe.render.formats import SCORE_DIGITS

DIGITS = SCORE_DIGITS


METRIC_KEYS = dict(zip(TEST_METRICS, ("acc", "bal_acc", "f1", "auc"), strict=True))
"""Each test metric's key in the DVC metrics files."""
"""Test metric -> its short key in ``metrics/evaluate*.json`` (what ``dvc metrics show`` prints)."""


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


def check_predictions(name: str, y_pred: np.ndarray, proba: np.ndarray | None, rows: int, n_classes: int) -> None:
    """Fail clearly when a model's outputs do not match the test split or the class list."""
    if len(y_pred) != rows:
        raise ValueError(f"{name}: {len(y_pred)} predictions for {rows} test images")
    if proba is not None and proba.shape != (rows, n_classes):
        raise ValueError(f"{name}: probabilities of shape {proba.shape}, expected ({rows}, {n_classes}) "
                         f"(one column per class of the store)")
