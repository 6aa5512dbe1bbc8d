"""Model registry and the champion quality gate.

The model a pipeline run puts forward (the best by validation accuracy, or CV
accuracy for the SVMs: never by test accuracy) is registered under one name. It
becomes the ``champion`` alias only if

* there is no champion yet, or
* the champion classifies the same set of classes (a model of another task is
  never compared with, nor promoted over, the champion), the champion can be
  re-scored on the *current* test images through its pyfunc (so data changes
  cannot fool the gate), and the new model's test accuracy beats that score by
  more than ``min_improvement``.

The gate fails closed: a champion that cannot be scored blocks promotion, with
the error as the reason. Registration and the gate run once per evaluate
execution: each version is tagged with the execution's key
(:data:`EXECUTION_TAG`), and calling :func:`register_and_gate` again with the
same key returns the decision already recorded on that version instead of
registering a second one.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np

ALIAS = "champion"
EXECUTION_TAG = "tlpipe.evaluate_run_id"
"""Model-version tag: the evaluate execution (its MLflow stage run id) that registered it."""
CLASSES_TAG = "tlpipe.classes"
"""Model-version tag: the JSON list of class names the model outputs, in label order."""
GATE_TAG = "tlpipe.gate"
PROMOTED_TAG = "tlpipe.promoted"
DECISION_TAG = "tlpipe.decision"


@dataclass(frozen=True)
class Champion:
    """The current champion as the gate saw it.

    ``classes`` is None when they could not be read; ``accuracy`` is None when
    it was not scored (other task, or ``error``).
    """

    version: str
    classes: list[str] | None
    accuracy: float | None = None
    error: str | None = None


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
    classes: list[str] | None = None
    champion_classes: list[str] | None = None
    blocked_by: str | None = None
    """None when promoted; else ``class_set``, ``champion_error`` or ``no_improvement``."""

    def to_dict(self) -> dict:
        """Plain dict for JSON and MLflow."""
        return asdict(self)


def select_best(selection_scores: dict[str, float]) -> str:
    """The model with the highest selection score (ties: the first in the given order)."""
    if not selection_scores:
        raise ValueError("no model has a selection score (CV accuracy or best validation accuracy)")
    return max(selection_scores, key=lambda name: (selection_scores[name], -list(selection_scores).index(name)))


def same_task(classes: Sequence[str], champion_classes: Sequence[str]) -> bool:
    """Whether two models classify the same set of class names (label order may differ)."""
    return sorted(map(str, classes)) == sorted(map(str, champion_classes))


def decide(model: str, accuracy: float, classes: Sequence[str] | None, champion: Champion | None,
           min_improvement: float, registered_name: str = "the registered model") -> tuple[bool, str, str | None]:
    """Apply the gate (pure).

    Returns:
        ``(promoted, reason, blocked_by)``; ``blocked_by`` is None when promoted,
        else ``class_set``, ``champion_error`` or ``no_improvement``.
    """
    if champion is None:
        return True, f"{model} promoted: no champion yet (test accuracy {accuracy:.4f})", None
    version = champion.version
    if classes is not None and champion.classes is not None and not same_task(classes, champion.classes):
        return False, (
            f"{model} not promoted: champion v{version} of '{registered_name}' classifies "
            f"{sorted(champion.classes)} but this model classifies {sorted(classes)}; a model of another task is "
            f"never compared with or promoted over it. To keep models of this class set, set registry.model_name "
            f"to a new name (e.g. `dvc exp run -S registry.model_name={registered_name}-{len(classes)}class`)"), \
            "class_set"
    if champion.error is not None or champion.accuracy is None:
        return False, (
            f"{model} not promoted: champion v{version} of '{registered_name}' could not be scored on this test "
            f"split ({champion.error or 'no score'}); the gate fails closed. Repair or delete that version, or move "
            f"the '{ALIAS}' alias by hand after checking the new model"), "champion_error"
    if round(accuracy - champion.accuracy, 4) > min_improvement:
        return True, (f"{model} promoted: test accuracy {accuracy:.4f} beats champion v{version} "
                      f"({champion.accuracy:.4f}) on the same test split"), None
    return False, (f"{model} not promoted: test accuracy {accuracy:.4f} does not beat champion "
                   f"v{version} ({champion.accuracy:.4f}"
                   + (f" + {min_improvement}" if min_improvement else "") + ") on the same test split"), \
        "no_improvement"


def find_champion(client, name: str) -> str | None:
    """Version number of the current champion, or None."""
    from mlflow.exceptions import MlflowException

    try:
        return str(client.get_model_version_by_alias(name, ALIAS).version)
    except MlflowException:
        return None


def read_classes_tag(tags: Mapping[str, str]) -> list[str] | None:
    """The class names recorded on a model version, or None when absent or unreadable."""
    try:
        classes = json.loads(tags[CLASSES_TAG])
    except (KeyError, ValueError):
        return None
    return [str(c) for c in classes] if isinstance(classes, list) else None


def describe(error: BaseException) -> str:
    """One line naming an exception."""
    text = str(error).strip().splitlines()[0][:300] if str(error).strip() else ""
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def score_version(name: str, version: str, images: np.ndarray, labels: np.ndarray,
                  classes: Sequence[str]) -> tuple[float, list[str]]:
    """Test accuracy of a registered version on uint8 images, through its pyfunc, and its class names.

    Raises:
        Exception: Whatever loading or predicting raised (the caller records it).
    """
    import mlflow

    from tlpipe.pyfunc import to_image_frame

    model = mlflow.pyfunc.load_model(f"models:/{name}/{version}")
    inner = model.unwrap_python_model()
    model_classes = [str(c) for c in getattr(inner, "classes", [])]
    frame = model.predict(to_image_frame(images))
    if frame["error"].notna().any():
        raise ValueError(f"{int(frame['error'].notna().sum())} test images failed: {frame['error'].dropna().iloc[0]}")
    truth = np.asarray(classes, dtype=object)[np.asarray(labels)]
    accuracy = round(float(np.mean(frame["class"].to_numpy() == truth)), 4)  # same rounding as the evaluate metrics
    return accuracy, model_classes


def inspect_champion(client, name: str, version: str, images: np.ndarray, labels: np.ndarray,
                     classes: Sequence[str]) -> Champion:
    """The champion's class names and its score on this test split; never raises.

    The class set comes from the version's :data:`CLASSES_TAG` (else from its
    pyfunc). A champion of another class set is not scored. Any error reading or
    scoring it is recorded in ``error``.
    """
    try:
        champion_classes = read_classes_tag(client.get_model_version(name, version).tags)
    except Exception as error:  # the registry itself failed: fail closed
        return Champion(version, None, None, f"cannot read the version: {describe(error)}")
    if champion_classes is not None and not same_task(classes, champion_classes):
        return Champion(version, champion_classes)
    try:
        accuracy, model_classes = score_version(name, version, images, labels, classes)
    except Exception as error:  # noqa: BLE001 - every failure blocks promotion, with its message
        return Champion(version, champion_classes, None, describe(error))
    champion_classes = champion_classes or model_classes or None
    if champion_classes is not None and not same_task(classes, champion_classes):
        return Champion(version, champion_classes)
    return Champion(version, champion_classes, accuracy)


def find_registered(client, name: str, execution_id: str):
    """The version of ``name`` already registered by evaluate execution ``execution_id``, or None."""
    from mlflow.exceptions import MlflowException

    try:
        found = client.search_model_versions(f"name = '{name}' and tags.`{EXECUTION_TAG}` = '{execution_id}'")
    except MlflowException:
        return None
    return min(found, key=lambda v: int(v.version)) if found else None


def recorded_decision(version) -> Decision | None:
    """The decision stored on a version by an earlier call, or None when the gate did not finish."""
    try:
        return Decision(**json.loads(version.tags[DECISION_TAG]))
    except (KeyError, ValueError, TypeError):
        return None


def register_and_gate(client, name: str, model: str, model_uri: str, accuracy: float, images: np.ndarray,
                      labels: np.ndarray, classes: Sequence[str], min_improvement: float,
                      tags: Mapping[str, str], execution_id: str) -> Decision:
    """Register ``model_uri`` as a new version of ``name`` once, gate it, and move the alias if it wins.

    Idempotent per ``execution_id``: a second call (a retry) finds the version
    tagged with it and returns its recorded decision (finishing an interrupted
    alias move); a version registered but not yet decided is gated, not
    registered again.

    Args:
        client: An ``MlflowClient`` on the project's registry.
        name: Registered model name (``registry.model_name``).
        model: Which of the pipeline's models this is.
        model_uri: Its logged pyfunc.
        accuracy: Its test accuracy (rounded like the evaluate metrics).
        images, labels: The current test split (uint8 images, integer labels).
        classes: Class names in label order.
        min_improvement: Margin the new model must beat the champion by.
        tags: Extra version tags (data hash, selection score, ...).
        execution_id: Key of this evaluate execution (its MLflow stage run id).
    """
    import mlflow

    classes = [str(c) for c in classes]
    existing = find_registered(client, name, execution_id)
    if existing is not None:
        decision = recorded_decision(existing)
        if decision is not None:
            if decision.promoted and find_champion(client, name) != str(existing.version):
                client.set_registered_model_alias(name, ALIAS, str(existing.version))
            return decision
    champion_version = find_champion(client, name)
    if existing is not None and champion_version == str(existing.version):
        # the alias moves after the decision is recorded, so only a hand-moved alias gets here:
        # never gate a version against itself
        return Decision(True, model, champion_version, accuracy, None, None,
                        f"{model} is already champion v{champion_version} (alias set outside the gate)", classes)
    champion = (inspect_champion(client, name, champion_version, images, labels, classes)
                if champion_version else None)
    if existing is None:
        version_tags = {**tags, "tlpipe.model": model, "test_accuracy": f"{accuracy:.4f}",
                        CLASSES_TAG: json.dumps(classes), EXECUTION_TAG: execution_id}
        version = str(mlflow.register_model(model_uri, name, tags=version_tags).version)
    else:
        version = str(existing.version)
    promoted, reason, blocked_by = decide(model, accuracy, classes, champion, min_improvement, name)
    decision = Decision(promoted, model, version, accuracy, champion.version if champion else None,
                        champion.accuracy if champion else None, reason, classes,
                        champion.classes if champion else None, blocked_by)
    client.set_model_version_tag(name, version, GATE_TAG, reason)
    client.set_model_version_tag(name, version, PROMOTED_TAG, str(promoted).lower())
    client.set_model_version_tag(name, version, DECISION_TAG, json.dumps(decision.to_dict()))
    if promoted:
        client.set_registered_model_alias(name, ALIAS, version)
    return decision
