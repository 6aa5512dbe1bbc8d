"""The model put forward to the champion gate: chosen by selection score (CV accuracy for SVMs, best validation
accuracy for networks), never by test accuracy, ranked by the lower end of its 95 % Wilson interval."""

from __future__ import annotations

import json
import math
from pathlib import Path

from tlpipe.core.names import REPORTED_MODELS, model_family
from tlpipe.evaluation.metrics import DIGITS


def select_best(selection_scores: dict[str, float]) -> str:
    """The model with the highest selection score (ties: the first in the given order)."""
    if not selection_scores:
        raise ValueError("no model has a selection score (CV accuracy or best validation accuracy)")
    return max(selection_scores, key=lambda name: (selection_scores[name], -list(selection_scores).index(name)))


SELECTION_METRIC = {"svm": "CV accuracy", "network": "best validation accuracy",
                    "ensemble": "validation accuracy (calibrated average)"}
"""What each model family is selected by (never test accuracy)."""


SELECTION_SPLIT = {"svm": "train", "network": "val", "ensemble": "val"}
"""The split each family's selection accuracy is measured on (CV folds cover all of train)."""


WILSON_Z = 1.96
"""95 % two-sided: the candidate is ranked by the lower end of this Wilson interval."""


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
    to the first in :data:`tlpipe.core.names.MODEL_NAMES` order. Without any selection score (models trained outside
    the pipeline) the best on test is taken.
    """
    ranked = selection_bounds(scores, split_sizes) if split_sizes is not None else scores
    ordered = {name: ranked[name] for name in REPORTED_MODELS if name in ranked and name in metrics}
    return select_best(ordered) if ordered else choose_best(metrics)
