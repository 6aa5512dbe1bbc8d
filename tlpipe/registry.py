"""Model registry and the champion quality gate.

The best model of a pipeline run (by validation accuracy, or CV accuracy for the
SVMs: never by test accuracy) is registered under one name. It becomes the
``champion`` alias only if its test accuracy beats the current champion's
accuracy measured on the *same* test split (the champion is re-scored on the
current test images through its pyfunc, so data changes cannot fool the gate).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

ALIAS = "champion"


@dataclass(frozen=True)
class Decision:
    """What the gate decided and why."""

    promoted: bool
    model: str
    version: str | None
    test_accuracy: float
    champion_version: str | None
    champion_accuracy: float | None
    reason: str

    def to_dict(self) -> dict:
        """Plain dict for JSON and MLflow."""
        return asdict(self)


def select_best(selection_scores: dict[str, float]) -> str:
    """The model with the highest selection score (ties: the first in the given order)."""
    if not selection_scores:
        raise ValueError("no model has a selection score")
    return max(selection_scores, key=lambda name: (selection_scores[name], -list(selection_scores).index(name)))


def decide(model: str, accuracy: float, champion_version: str | None, champion_accuracy: float | None,
           min_improvement: float) -> tuple[bool, str]:
    """Apply the gate: promote when there is no champion or the new model beats it."""
    if champion_version is None:
        return True, f"{model} promoted: no champion yet (test accuracy {accuracy:.4f})"
    if champion_accuracy is None:
        return True, f"{model} promoted: champion v{champion_version} could not be scored on this test split"
    if round(accuracy - champion_accuracy, 4) > min_improvement:
        return True, (f"{model} promoted: test accuracy {accuracy:.4f} beats champion v{champion_version} "
                      f"({champion_accuracy:.4f}) on the same test split")
    return False, (f"{model} not promoted: test accuracy {accuracy:.4f} does not beat champion "
                   f"v{champion_version} ({champion_accuracy:.4f}"
                   + (f" + {min_improvement}" if min_improvement else "") + ") on the same test split")


def find_champion(client, name: str) -> str | None:
    """Version number of the current champion, or None."""
    from mlflow.exceptions import MlflowException

    try:
        return str(client.get_model_version_by_alias(name, ALIAS).version)
    except MlflowException:
        return None


def score_version(name: str, version: str, images: np.ndarray, labels: np.ndarray, classes: list[str]) -> float | None:
    """Test accuracy of a registered version on the given uint8 images, through its pyfunc."""
    import mlflow

    from tlpipe.pyfunc import to_image_frame

    try:
        model = mlflow.pyfunc.load_model(f"models:/{name}/{version}")
        predicted = model.predict(to_image_frame(images))["class"].to_numpy()
    except Exception:
        return None
    truth = np.asarray(classes, dtype=object)[labels]
    return round(float(np.mean(predicted == truth)), 4)  # same rounding as the evaluate metrics


def register_and_gate(client, name: str, model: str, model_uri: str, accuracy: float, images: np.ndarray,
                      labels: np.ndarray, classes: list[str], min_improvement: float,
                      tags: dict[str, str]) -> Decision:
    """Register ``model_uri`` as a new version and move the champion alias if it wins."""
    import mlflow

    champion = find_champion(client, name)
    champion_accuracy = score_version(name, champion, images, labels, classes) if champion else None
    version = mlflow.register_model(model_uri, name, tags={**tags, "tlpipe.model": model,
                                                            "test_accuracy": f"{accuracy:.4f}"}).version
    promoted, reason = decide(model, accuracy, champion, champion_accuracy, min_improvement)
    if promoted:
        client.set_registered_model_alias(name, ALIAS, version)
    client.set_model_version_tag(name, str(version), "tlpipe.gate", reason)
    return Decision(promoted, model, str(version), accuracy, champion, champion_accuracy, reason)
