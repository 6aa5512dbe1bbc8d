"""tlpipe: the transfer-learning pipeline's core (plain Python; flows and tasks wire it).

Sub-packages by concern, lowest layer first (each may import only the ones before it; README "Layout"):
core, render, ops, data, features, serving, train, tracking, evaluation.
"""

from tlpipe._legacy import install_legacy_finder

install_legacy_finder()
