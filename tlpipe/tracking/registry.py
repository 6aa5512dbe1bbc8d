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

Gates of one registered model never interleave on one machine: reading the
champion, scoring against it and moving the alias happen under a file lock keyed
by tracking store and model name (:func:`gate_lock_path`), so two evaluate stages
at once (``dvc queue start -j 2``) gate one after the other and the second is
scored against the first one's result. Before moving the alias the gate reads it
again and, if it moved meanwhile, gates again against the new champion
(compare-and-set). Gates on *several machines* sharing a tracking server are not
serialised by the lock: the re-read narrows the race to the moment between that
read and the move (MLflow has no atomic compare-and-set of an alias), so run
their evaluate stages one at a time, or check the champion after.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from tlpipe.ops.lock import file_lock
from tlpipe.serving.predict import CLASSES_TAG, read_classes_tag

ALIAS = "champion"
EXECUTION_TAG = "tlpipe.evaluate_run_id"
"""Model-version tag: the evaluate execution (its MLflow stage run id) that registered it."""
GATE_TAG = "tlpipe.gate"
PROMOTED_TAG = "tlpipe.promoted"
DECISION_TAG = "tlpipe.decision"
GATE_LOCK_WAIT_S = 1500.0
"""How long a gate waits for another gate of the same registered model (the gate task times out at 1800 s)."""
GATE_ATTEMPTS = 3
"""Times a gate scores its model when the champion alias keeps moving under it; then it is not promoted."""


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
    """None when promoted; else ``class_set``, ``champion_error``, ``no_improvement`` or ``champion_moved``."""

    def to_dict(self) -> dict:
        """Plain dict for JSON and MLflow."""
        return asdict(self)


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
            f"never compared with or promoted over it. With registry.task and registry.model_name auto, each class "
            f"set is its own task; else set registry.model_name to a new name "
            f"(e.g. `dvc exp run -S registry.model_name={registered_name}-{len(classes)}class`)"), \
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


def describe(error: BaseException) -> str:
    """One line naming an exception."""
    text = str(error).strip().splitlines()[0][:300] if str(error).strip() else ""
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def score_version(client, name: str, version: str, images: np.ndarray, labels: np.ndarray,
                  classes: Sequence[str]) -> tuple[float, list[str]]:
    """Test accuracy of a registered version on uint8 images, through its pyfunc, and its class names.

    Raises:
        Exception: Whatever loading or predicting raised (the caller records it).
    """
    import mlflow

    from tlpipe.serving.classifier import to_image_frame
    from tlpipe.tracking.fluent import use_store

    use_store(client)  # a models:/ URI resolves through the fluent store
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
        accuracy, model_classes = score_version(client, name, version, images, labels, classes)
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


def gate_lock_path(tracking_uri: str, name: str) -> Path:
    """The lock serialising the gates of registered model ``name`` in the store ``tracking_uri``.

    In the temporary folder, keyed by both (like :func:`tlpipe.tracking.sqlite_store.lock_path`): every
    gate on this machine into the same registered model takes it, whichever project copy (a
    queued DVC experiment's workspace) it runs in.
    """
    key = hashlib.sha256(f"{tracking_uri}\n{name}".encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"tlpipe-gate-{key}.lock"


def record_decision(client, name: str, version: str, decision: Decision) -> None:
    """Tag ``version`` with the gate's reason, outcome and whole decision."""
    client.set_model_version_tag(name, version, GATE_TAG, decision.reason)
    client.set_model_version_tag(name, version, PROMOTED_TAG, str(decision.promoted).lower())
    client.set_model_version_tag(name, version, DECISION_TAG, json.dumps(decision.to_dict()))


def finish_recorded(client, name: str, decision: Decision) -> bool:
    """Finish a decision an earlier call recorded; False when the version must be gated again.

    A promoted decision whose alias move was lost (a crash between the two) is
    finished only while the champion is still the one it beat: if another gate
    moved the alias since, moving it back would undo a newer decision.
    """
    current = find_champion(client, name)
    if not decision.promoted or current == decision.version:
        return True
    if current != decision.champion_version:
        return False
    client.set_registered_model_alias(name, ALIAS, decision.version)
    return True


def gate_version(client, name: str, model: str, version: str, accuracy: float, images: np.ndarray,
                 labels: np.ndarray, classes: list[str], min_improvement: float) -> Decision:
    """Gate registered ``version`` against the champion, record the decision, and move the alias if it wins.

    Compare-and-set: right before the move the champion is read again; if it
    moved since it was scored, the version is gated again against the new one
    (at most :data:`GATE_ATTEMPTS` times, then it is not promoted).
    """
    for _ in range(GATE_ATTEMPTS):
        champion_version = find_champion(client, name)
        if champion_version == version:
            # the alias moves after the decision is recorded, so only a hand-moved alias gets here:
            # never gate a version against itself
            return Decision(True, model, version, accuracy, None, None,
                            f"{model} is already champion v{version} (alias set outside the gate)", classes)
        champion = (inspect_champion(client, name, champion_version, images, labels, classes)
                    if champion_version else None)
        promoted, reason, blocked_by = decide(model, accuracy, classes, champion, min_improvement, name)
        decision = Decision(promoted, model, version, accuracy, champion.version if champion else None,
                            champion.accuracy if champion else None, reason, classes,
                            champion.classes if champion else None, blocked_by)
        record_decision(client, name, version, decision)
        if not promoted:
            return decision
        if find_champion(client, name) == champion_version:
            client.set_registered_model_alias(name, ALIAS, version)
            return decision
    decision = Decision(False, model, version, accuracy, None, None, (
        f"{model} not promoted: the '{ALIAS}' alias of '{name}' moved {GATE_ATTEMPTS} times while this model "
        f"was gated (gates on other machines?); move it by hand after checking the new model"), classes,
        blocked_by="champion_moved")
    record_decision(client, name, version, decision)
    return decision


def register_and_gate(client, name: str, model: str, model_uri: str, accuracy: float, images: np.ndarray,
                      labels: np.ndarray, classes: Sequence[str], min_improvement: float,
                      tags: Mapping[str, str], execution_id: str) -> Decision:
    """Register ``model_uri`` as a new version of ``name`` once, gate it, and move the alias if it wins.

    Idempotent per ``execution_id``: a second call (a retry) finds the version
    tagged with it and returns its recorded decision (finishing an interrupted
    alias move while the champion is still the one it beat; else gating it again);
    a version registered but not yet decided is gated, not registered again.
    The whole call holds :func:`gate_lock_path` (waiting up to
    :data:`GATE_LOCK_WAIT_S` for another gate of ``name``), and the alias moves
    only if the champion did not change since it was scored (:func:`gate_version`).

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

    Raises:
        tlpipe.ops.lock.LockHeldError: Another gate of ``name`` held the lock for :data:`GATE_LOCK_WAIT_S`.
    """
    import mlflow

    from tlpipe.tracking.fluent import use_store

    classes = [str(c) for c in classes]
    with file_lock(gate_lock_path(client.tracking_uri, name), f"the champion gate of '{name}'",
                   wait_s=GATE_LOCK_WAIT_S):
        existing = find_registered(client, name, execution_id)
        decision = recorded_decision(existing) if existing is not None else None
        if decision is not None and finish_recorded(client, name, decision):
            return decision
        if existing is None:
            version_tags = {**tags, "tlpipe.model": model, "test_accuracy": f"{accuracy:.4f}",
                            CLASSES_TAG: json.dumps(classes), EXECUTION_TAG: execution_id}
            use_store(client)  # register_model has no client argument: it uses the fluent store
            version = str(mlflow.register_model(model_uri, name, tags=version_tags).version)
        else:
            version = str(existing.version)
        return gate_version(client, name, model, version, accuracy, images, labels, classes, min_improvement)
