"""The one list of trained models: names, families, inputs and where each one's file lives.

Every stage, task, report and test reads model names from here, so adding a
model is one edit. SVMs are ``.joblib`` files under ``models/svm``; networks are
``.keras`` files under ``models/finetune``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

Family = Literal["svm", "network"]

SVM_MODELS: dict[str, str] = {"svm_features": "final", "svm_concat": "concat", "svm_pixels": "pixels"}
"""SVM model name -> the input it is trained on (pooled final features, final+mid, raw pixels)."""

NETWORK_MODELS: tuple[str, ...] = ("frozen", "concat", "finetuned")
"""Keras networks of the finetune stage: the course's two, then ``finetuned`` (top blocks fine-tuned, flip TTA)."""

MODEL_NAMES: tuple[str, ...] = (*SVM_MODELS, *NETWORK_MODELS)
"""Every model, in report order."""


def model_family(name: str) -> Family:
    """``svm`` or ``network``.

    Raises:
        ValueError: For a name not in :data:`MODEL_NAMES`.
    """
    if name in SVM_MODELS:
        return "svm"
    if name in NETWORK_MODELS:
        return "network"
    raise ValueError(f"unknown model {name!r}; expected one of {list(MODEL_NAMES)}")


def model_file(svm_dir: Path, finetune_dir: Path, name: str) -> Path:
    """Where a model's file lives: ``<svm_dir>/<name>.joblib`` or ``<finetune_dir>/<name>.keras``."""
    if model_family(name) == "svm":
        return Path(svm_dir) / f"{name}.joblib"
    return Path(finetune_dir) / f"{name}.keras"
