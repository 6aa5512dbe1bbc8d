"""A model logged by the code before the package split (issue 21) still loads and predicts."""

from __future__ import annotations

from pathlib import Path

import numpy as np

LEGACY_MODEL = Path(__file__).resolve().parents[1] / "fixtures" / "legacy_model" / "model"


def test_legacy_model_loads_and_predicts():
    """The pickled ``tlpipe.svm.LinearSVM`` and the logged ``tlpipe.pyfunc`` import resolve to the new modules."""
    import mlflow

    from tlpipe.serving.classifier import to_image_frame

    model = mlflow.pyfunc.load_model(str(LEGACY_MODEL))
    image = np.full((1, 40, 40, 3), 200, dtype=np.uint8)
    frame = model.predict(to_image_frame(image))
    assert frame["error"].isna().all()
    assert frame["class"].tolist()[0] in {"ants", "bees"}
    assert 0.0 <= float(frame["probability"].iloc[0]) <= 1.0


def test_old_module_paths_are_the_new_modules():
    """An old dotted path imports the new module object itself (so unpickled classes are today's classes)."""
    import importlib

    assert importlib.import_module("tlpipe.svm") is importlib.import_module("tlpipe.train.svm")
    assert importlib.import_module("tlpipe.backbones.common") is importlib.import_module(
        "tlpipe.features.backbones.common")
    assert importlib.import_module("tlpipe.models").MODEL_NAMES == importlib.import_module(
        "tlpipe.core.names").MODEL_NAMES
