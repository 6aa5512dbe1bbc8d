"""The champion gate's decision rule and best-model selection."""

from __future__ import annotations

import pytest

from tlpipe.registry import decide, select_best


def test_select_best_by_selection_score_first_on_ties():
    assert select_best({"svm_features": 0.95, "frozen": 0.97, "concat": 0.97}) == "frozen"
    with pytest.raises(ValueError):
        select_best({})


@pytest.mark.parametrize(
    ("accuracy", "champion", "margin", "promoted"),
    [(0.9608, None, 0.0, True), (0.9608, 0.9608, 0.0, False), (0.9609, 0.9608, 0.0, True),
     (0.9700, 0.9608, 0.01, False), (0.9800, 0.9608, 0.01, True), (0.90, 0.95, 0.0, False)],
)
def test_gate_promotes_only_a_strictly_better_model(accuracy, champion, margin, promoted):
    version = None if champion is None else "3"
    result, reason = decide("frozen", accuracy, version, champion, margin)
    assert result is promoted
    assert ("promoted:" in reason) and (("not promoted" in reason) is (not promoted))


def test_unscorable_champion_is_replaced_with_a_reason():
    result, reason = decide("frozen", 0.9, "2", None, 0.0)
    assert result is True and "could not be scored" in reason
