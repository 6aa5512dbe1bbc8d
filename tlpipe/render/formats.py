"""One way to write a score: accuracies, balanced accuracies, F1, AUC and probabilities with 4 decimals.

Every title, table, caption, decision, plot label and artifact text of the evaluate path formats its
numbers through :func:`format_score`, so a figure's title and the table next to it show the same
``0.6375`` (never ``0.637`` in one and ``0.6375`` in the other). Files of numbers (``metrics.json``,
DVC metrics, Prefect table artifacts) keep numbers, rounded the same way by :func:`round_score`.
"""

from __future__ import annotations

import math

SCORE_DIGITS = 4
"""Decimals of every score shown or stored by the evaluate path."""
MISSING = "–"
"""What a missing or undefined score (None, NaN) reads as."""


def round_score(value: float) -> float:
    """A JSON-native float rounded to :data:`SCORE_DIGITS` decimals."""
    return round(float(value), SCORE_DIGITS)


def format_score(value: float | None) -> str:
    """A score as text with :data:`SCORE_DIGITS` decimals (``0.6375``, ``1.0000``); :data:`MISSING` when undefined."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return MISSING
    return f"{float(value):.{SCORE_DIGITS}f}"
