"""Class probabilities made comparable before they are averaged (the ``ensemble`` model).

An SVM's probabilities are calibrated already: Platt scaling fitted on out-of-fold
decision values of the train split (:class:`tlpipe.train.svm.LinearSVM`). A network's
softmax may be over- or under-confident; temperature scaling (Guo et al. 2017)
divides its log-probabilities by one number ``T`` fitted by log-loss on held-out
images. It changes how sure a network is, never which class it picks.

Pure functions on arrays (numpy, and scipy for the 1-d search), shared by the
evaluate stage (:mod:`tlpipe.evaluation.ensemble`) and the served model (:mod:`tlpipe.serving.classifier`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

EPS = 1e-7
"""Probabilities are clipped to [EPS, 1] before a logarithm."""
TEMPERATURE_RANGE = (0.05, 20.0)
"""Where :func:`fit_temperature` searches ``T``."""
CROSSFIT_FOLDS = 5
"""Folds of :func:`crossfit_temperature` (fewer when there are fewer images)."""


def scale_temperature(proba: np.ndarray, temperature: float) -> np.ndarray:
    """``softmax(log(p) / T)`` row by row: ``T > 1`` softens, ``T < 1`` sharpens, ``T = 1`` keeps ``p``.

    Args:
        proba: Class probabilities (n, n_classes).
        temperature: ``T > 0``.

    Returns:
        Probabilities (n, n_classes), float64, rows summing to 1; the argmax is unchanged.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    logits = np.log(np.clip(np.asarray(proba, dtype=np.float64), EPS, 1.0)) / float(temperature)
    logits -= logits.max(axis=1, keepdims=True)
    weights = np.exp(logits)
    return weights / weights.sum(axis=1, keepdims=True)


def log_loss(proba: np.ndarray, y: np.ndarray) -> float:
    """Mean negative log-probability of the true classes (probabilities clipped at :data:`EPS`)."""
    y = np.asarray(y, dtype=np.int64)
    if len(y) == 0:
        return float("nan")
    chosen = np.asarray(proba, dtype=np.float64)[np.arange(len(y)), y]
    return float(-np.log(np.clip(chosen, EPS, 1.0)).mean())


def fit_temperature(proba: np.ndarray, y: np.ndarray) -> float:
    """The ``T`` in :data:`TEMPERATURE_RANGE` with the lowest log-loss of :func:`scale_temperature` on ``y``.

    A bounded 1-d search over ``log T``; 1.0 when there are no images.
    """
    from scipy.optimize import minimize_scalar

    if len(y) == 0:
        return 1.0
    low, high = (math.log(bound) for bound in TEMPERATURE_RANGE)
    found = minimize_scalar(lambda log_t: log_loss(scale_temperature(proba, math.exp(log_t)), y),
                            bounds=(low, high), method="bounded", options={"xatol": 1e-4})
    return float(math.exp(found.x))


def crossfit_temperature(proba: np.ndarray, y: np.ndarray, folds: int = CROSSFIT_FOLDS,
                         seed: int = 0) -> np.ndarray:
    """Out-of-fold temperature-scaled probabilities: each fold scaled by a ``T`` fitted on the other folds.

    So scores computed on ``y`` never include the fit of their own calibration.
    Shuffled K-fold with ``min(folds, n)`` folds; with fewer than two images the
    probabilities come back unscaled (renormalised).
    """
    from sklearn.model_selection import KFold

    proba = np.asarray(proba, dtype=np.float64)
    y = np.asarray(y, dtype=np.int64)
    if len(y) < 2:
        return scale_temperature(proba, 1.0)
    scaled = np.empty_like(proba)
    for fit_rows, held_rows in KFold(min(folds, len(y)), shuffle=True, random_state=seed).split(proba):
        scaled[held_rows] = scale_temperature(proba[held_rows], fit_temperature(proba[fit_rows], y[fit_rows]))
    return scaled


def average_probabilities(probas: Sequence[np.ndarray]) -> np.ndarray:
    """The equal-weight mean of several models' probabilities (n, n_classes), rows renormalised to 1."""
    if not probas:
        raise ValueError("nothing to average")
    mean = np.mean(np.stack([np.asarray(p, dtype=np.float64) for p in probas]), axis=0)
    return mean / mean.sum(axis=1, keepdims=True)
