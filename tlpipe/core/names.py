"""The one list of trained models: names, families, inputs and where each one's file lives.

Every stage, task, report and test reads model names from here, so adding a
model is one edit. SVMs are ``.joblib`` files under ``models/svm``; networks are
``.keras`` files under ``models/finetune``. The evaluate stage's ``ensemble`` is
listed apart (:data:`ENSEMBLE_MODEL`, :data:`REPORTED_MODELS`): code that walks the
trained models walks :data:`MODEL_NAMES`, which does not hold it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

Family = Literal["svm", "network", "ensemble"]

SVM_MODELS: dict[str, str] = {"svm_features": "final", "svm_concat": "concat", "svm_pixels": "pixels"}
"""SVM model name -> the input it is trained on (pooled final features, final+mid, raw pixels)."""

NETWORK_MODELS: tuple[str, ...] = ("frozen", "concat", "finetuned")
"""Keras networks of the finetune stage: the course's two, then ``finetuned`` (top blocks fine-tuned, flip TTA)."""

MODEL_NAMES: tuple[str, ...] = (*SVM_MODELS, *NETWORK_MODELS)
"""Every trained model (each has a file the svm or finetune stage writes), in report order."""

ENSEMBLE_MODEL = "ensemble"
"""Built by the evaluate stage from the trained models (:mod:`tlpipe.evaluation.ensemble`), never trained by a stage; it
exists only in runs where it helps on the validation split, saved as ``reports/evaluate/ensemble.json``."""

REPORTED_MODELS: tuple[str, ...] = (*MODEL_NAMES, ENSEMBLE_MODEL)
"""Every model the evaluate stage can report, in report order: the trained ones, then the ensemble."""


def model_family(name: str) -> Family:
    """``svm``, ``network`` or ``ensemble``.

    Raises:
        ValueError: For a name not in :data:`REPORTED_MODELS`.
    """
    if name in SVM_MODELS:
        return "svm"
    if name in NETWORK_MODELS:
        return "network"
    if name == ENSEMBLE_MODEL:
        return "ensemble"
    raise ValueError(f"unknown model {name!r}; expected one of {list(REPORTED_MODELS)}")


def model_file(svm_dir: Path, finetune_dir: Path, name: str) -> Path:
    """Where a trained model's file lives: ``<svm_dir>/<name>.joblib`` or ``<finetune_dir>/<name>.keras``.

    Raises:
        ValueError: For the ensemble (its file is :func:`tlpipe.evaluation.ensemble.spec_path`) or an unknown name.
    """
    if model_family(name) == "ensemble":
        raise ValueError("the ensemble is not a trained model: its file is reports/evaluate/ensemble.json")
    if model_family(name) == "svm":
        return Path(svm_dir) / f"{name}.joblib"
    return Path(finetune_dir) / f"{name}.keras"

TEST_METRICS = ("accuracy", "balanced_accuracy", "f1_macro", "roc_auc")
"""The evaluate stage's scalar test metrics, the one list: DVC metrics (short keys), MLflow ``test_<name>``."""
