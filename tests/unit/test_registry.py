"""The champion gate: the decision rule, and the whole gate against a real SQLite registry.

The registry tests log tiny real pyfunc image classifiers (scikit-learn models on
4 x 4 raw pixels) to a SQLite MLflow store and gate them on a 4-image test split
of 3 dark and 1 bright images, where the models score exactly:
``perfect`` 1.0 (logistic regression), ``always_dark`` 0.75, ``always_bright``
0.25 (constant classifiers), re-scored by the gate through their pyfuncs.
"""

from __future__ import annotations

import json
import re
import shutil
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlparse

import joblib
import mlflow
import numpy as np
import pytest
from mlflow import MlflowClient
from sklearn.dummy import DummyClassifier
from sklearn.linear_model import LogisticRegression

from tlpipe.evaluation.choice import select_best
from tlpipe.tracking import registry
from tlpipe.tracking.logged_models import log_svm_classifier
from tlpipe.tracking.registry import ALIAS, Champion, decide, register_and_gate

CLASSES = ["dark", "bright"]
OTHER_CLASSES = ["cat", "dog", "bird"]
SIZE, PIXELS = 8, 4
LABELS = np.array([0, 0, 0, 1])


def test_select_best_by_selection_score_first_on_ties():
    assert select_best({"svm_features": 0.95, "frozen": 0.97, "concat": 0.97}) == "frozen"
    with pytest.raises(ValueError, match="no model has a selection score"):
        select_best({})


@pytest.mark.parametrize(
    ("accuracy", "champion", "margin", "promoted"),
    [(0.9608, None, 0.0, True), (0.9608, 0.9608, 0.0, False), (0.9609, 0.9608, 0.0, True),
     (0.9700, 0.9608, 0.01, False), (0.9800, 0.9608, 0.01, True), (0.90, 0.95, 0.0, False)],
)
def test_gate_promotes_only_a_strictly_better_model(accuracy, champion, margin, promoted):
    holder = None if champion is None else Champion("3", CLASSES, champion)
    result, reason, blocked_by = decide("frozen", accuracy, CLASSES, holder, margin)
    assert result is promoted
    assert reason.startswith("frozen promoted:" if promoted else "frozen not promoted:")
    assert blocked_by == (None if promoted else "no_improvement")


def test_unscorable_champion_blocks_promotion_with_the_error():
    holder = Champion("2", CLASSES, None, "OSError: No such file or directory: 'svm.joblib'")
    result, reason, blocked_by = decide("frozen", 0.99, CLASSES, holder, 0.0, "tlpipe-classifier")
    assert result is False and blocked_by == "champion_error"
    assert reason.startswith("frozen not promoted: champion v2 of 'tlpipe-classifier' could not be scored")
    assert "OSError: No such file or directory: 'svm.joblib'" in reason


def test_champion_of_another_class_set_is_never_compared():
    holder = Champion("4", OTHER_CLASSES)
    result, reason, blocked_by = decide("concat", 1.0, CLASSES, holder, 0.0, "tlpipe-classifier")
    assert result is False and blocked_by == "class_set"
    assert str(sorted(OTHER_CLASSES)) in reason and str(sorted(CLASSES)) in reason
    assert "registry.model_name" in reason
    # same classes in another label order are the same task
    assert decide("concat", 1.0, CLASSES, Champion("4", CLASSES[::-1], 0.5), 0.0)[0] is True


# --- against a real registry -------------------------------------------------------------------------------------


def solid_images(values: list[int], seed: int = 0) -> np.ndarray:
    """SIZE x SIZE RGB images of the given grey levels (+-10 noise)."""
    rng = np.random.default_rng(seed)
    base = np.asarray(values, dtype=np.int64)[:, None, None, None]
    return np.clip(base + rng.integers(-10, 11, (len(values), SIZE, SIZE, 3)), 0, 255).astype(np.uint8)


TEST_IMAGES = solid_images([40, 50, 60, 210], seed=1)


def pixel_features(images: np.ndarray) -> np.ndarray:
    """What the pyfunc feeds a ``pixels`` SVM at PIXELS x PIXELS: resized, flattened, scaled to 0..1."""
    from tlpipe.data.images import resize_batch

    return resize_batch(images, PIXELS).reshape(len(images), -1).astype(np.float32) / 255


@pytest.fixture(scope="module")
def tracking(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowClient]:
    """A fresh SQLite tracking store and registry; restores the previous tracking URI."""
    root = tmp_path_factory.mktemp("registry")
    previous = mlflow.get_tracking_uri()
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        patch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        uri = f"sqlite:///{root}/mlflow.db"
        mlflow.set_tracking_uri(uri)
        client = MlflowClient(uri)
        experiment = client.create_experiment("gate", artifact_location=(root / "mlartifacts").as_uri())
        mlflow.set_experiment(experiment_id=experiment)
        yield client
        mlflow.set_tracking_uri(previous)


@pytest.fixture(scope="module")
def models(tracking: MlflowClient, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Logged pyfunc URIs of the tiny models (one run), keyed by name."""
    folder = tmp_path_factory.mktemp("sklearn")
    train = solid_images([30, 45, 60, 190, 205, 220], seed=2)
    X, y = pixel_features(train), np.array([0, 0, 0, 1, 1, 1])
    fitted = {"perfect": LogisticRegression().fit(X, y),
              "always_dark": DummyClassifier(strategy="constant", constant=0).fit(X, y),
              "always_bright": DummyClassifier(strategy="constant", constant=1).fit(X, y),
              "broken": LogisticRegression().fit(X, y),
              "other_task": LogisticRegression().fit(np.vstack([X, X[:2]]), np.array([0, 0, 1, 1, 2, 2, 0, 1]))}
    uris = {}
    with mlflow.start_run(run_name="tiny models") as run:
        for name, estimator in fitted.items():
            path = folder / f"{name}.joblib"
            joblib.dump(estimator, path)
            classes = OTHER_CLASSES if name == "other_task" else CLASSES
            uris[name] = log_svm_classifier(MlflowClient(), run.info.run_id, name, path, "pixels", classes, SIZE, "stretch", "none", None,
                                            PIXELS).model_uri
    return uris


def gate(client: MlflowClient, name: str, model: str, uri: str, accuracy: float, execution: str,
         classes: list[str] = CLASSES) -> registry.Decision:
    """Register and gate one model on the 4-image test split."""
    return register_and_gate(client, name, model, uri, accuracy, TEST_IMAGES, LABELS, classes, 0.0,
                             {"tlpipe.data_hash": "test"}, execution_id=execution)


def champion_version(client: MlflowClient, name: str) -> str | None:
    """The version the champion alias points at."""
    return registry.find_champion(client, name)


def versions(client: MlflowClient, name: str) -> list[str]:
    """Every version number registered under ``name``."""
    return sorted(str(v.version) for v in client.search_model_versions(f"name = '{name}'"))


@pytest.mark.slow
def test_gate_against_a_real_registry(tracking: MlflowClient, models: dict[str, str]) -> None:
    client = tracking

    # no champion: the first model is promoted; its class names and execution are recorded on the version
    first = gate(client, "gate-first", "always_bright", models["always_bright"], 0.25, "exec-1")
    assert first.promoted and first.version == "1" and first.champion_version is None
    assert first.reason.startswith("always_bright promoted: no champion yet")
    tags = client.get_model_version("gate-first", "1").tags
    assert json.loads(tags[registry.CLASSES_TAG]) == CLASSES and tags[registry.EXECUTION_TAG] == "exec-1"
    assert champion_version(client, "gate-first") == "1"

    # better: the champion is re-scored through its pyfunc (0.25) and the alias moves
    better = gate(client, "gate-first", "perfect", models["perfect"], 1.0, "exec-2")
    assert better.promoted and better.version == "2"
    assert better.champion_version == "1" and better.champion_accuracy == 0.25
    assert better.reason.startswith("perfect promoted: test accuracy 1.0000 beats champion v1 (0.2500)")
    assert champion_version(client, "gate-first") == "2"

    # worse: registered, not promoted, the alias stays
    worse = gate(client, "gate-first", "always_dark", models["always_dark"], 0.75, "exec-3")
    assert not worse.promoted and worse.blocked_by == "no_improvement" and worse.champion_accuracy == 1.0
    assert worse.reason.startswith("always_dark not promoted:")
    assert champion_version(client, "gate-first") == "2" and versions(client, "gate-first") == ["1", "2", "3"]
    assert client.get_model_version("gate-first", "3").tags[registry.PROMOTED_TAG] == "false"

    # equal: not promoted either
    gate(client, "gate-equal", "always_dark", models["always_dark"], 0.75, "exec-4")
    equal = gate(client, "gate-equal", "always_dark", models["always_dark"], 0.75, "exec-5")
    assert not equal.promoted and equal.champion_accuracy == 0.75 and equal.blocked_by == "no_improvement"
    assert champion_version(client, "gate-equal") == "1"


@pytest.mark.slow
def test_gate_fails_closed_on_an_unscorable_champion(tracking: MlflowClient, models: dict[str, str]) -> None:
    client = tracking
    assert gate(client, "gate-broken", "broken", models["broken"], 0.5, "exec-b1").promoted
    source = mlflow.get_logged_model(models["broken"].removeprefix("models:/")).artifact_location
    shutil.rmtree(Path(urlparse(source).path))  # the champion's files are gone from the artifact store
    decision = gate(client, "gate-broken", "perfect", models["perfect"], 1.0, "exec-b2")
    assert not decision.promoted and decision.blocked_by == "champion_error"
    assert decision.reason.startswith("perfect not promoted: champion v1 of 'gate-broken' could not be scored")
    assert decision.champion_accuracy is None
    assert re.search(r"could not be scored on this test split \(\w+(Error|Exception): .+\)", decision.reason)
    assert champion_version(client, "gate-broken") == "1"


@pytest.mark.slow
def test_gate_never_compares_models_of_another_class_set(tracking: MlflowClient, models: dict[str, str]) -> None:
    client = tracking
    gate(client, "gate-task", "other_task", models["other_task"], 0.9, "exec-t1", OTHER_CLASSES)
    decision = gate(client, "gate-task", "perfect", models["perfect"], 1.0, "exec-t2")
    assert not decision.promoted and decision.blocked_by == "class_set"
    assert decision.champion_classes == OTHER_CLASSES and decision.classes == CLASSES
    assert decision.champion_accuracy is None  # never scored on images of another task
    assert str(sorted(OTHER_CLASSES)) in decision.reason and "registry.model_name" in decision.reason
    assert champion_version(client, "gate-task") == "1"

    # a champion registered before class names were recorded: its pyfunc names its classes
    gate(client, "gate-legacy", "other_task", models["other_task"], 0.9, "exec-l1", OTHER_CLASSES)
    client.delete_model_version_tag("gate-legacy", "1", registry.CLASSES_TAG)
    legacy = gate(client, "gate-legacy", "perfect", models["perfect"], 1.0, "exec-l2")
    assert not legacy.promoted and legacy.blocked_by == "class_set" and legacy.champion_classes == OTHER_CLASSES
    assert champion_version(client, "gate-legacy") == "1"


@pytest.mark.slow
def test_a_repeated_gate_registers_once(tracking: MlflowClient, models: dict[str, str]) -> None:
    client = tracking
    decision = gate(client, "gate-once", "always_dark", models["always_dark"], 0.75, "exec-o1")
    again = gate(client, "gate-once", "always_dark", models["always_dark"], 0.75, "exec-o1")
    assert again == decision and versions(client, "gate-once") == ["1"]

    # promoted, then the alias move was lost (a crash): the repeat finishes it, without registering or re-gating
    promoted = gate(client, "gate-once", "perfect", models["perfect"], 1.0, "exec-o2")
    assert promoted.promoted and promoted.version == "2"
    client.set_registered_model_alias("gate-once", ALIAS, "1")
    assert gate(client, "gate-once", "perfect", models["perfect"], 1.0, "exec-o2") == promoted
    assert champion_version(client, "gate-once") == "2" and versions(client, "gate-once") == ["1", "2"]

    # registered but the decision never recorded (killed between the two): gated now, not registered again
    mlflow.register_model(models["always_bright"], "gate-once",
                          tags={registry.EXECUTION_TAG: "exec-o3", registry.CLASSES_TAG: json.dumps(CLASSES)})
    late = gate(client, "gate-once", "always_bright", models["always_bright"], 0.25, "exec-o3")
    assert late.version == "3" and not late.promoted and late.champion_version == "2"
    assert versions(client, "gate-once") == ["1", "2", "3"] and champion_version(client, "gate-once") == "2"


def test_the_gate_task_is_never_retried_and_logging_never_registers() -> None:
    import inspect

    from tasks import evaluate as evaluate_tasks

    assert evaluate_tasks.register_and_gate.retries == 0
    assert evaluate_tasks.log_evaluation.retries >= 1
    logging_source = inspect.getsource(evaluate_tasks.log_evaluation.fn)
    assert not re.search(r"register_and_gate|register_model|set_registered_model_alias", logging_source)


class RacingClient(MlflowClient):
    """A real client that replays how two evaluate stages started together (``dvc queue start -j 2``) race.

    Each gate waits, after its first read of the champion, until the other gate has read it too (or 10 s
    have passed: a gate held back by the lock never gets there). A gate given ``after`` moves the alias
    only once ``after`` has moved it, when ``after`` is already gating: the lower model moves it last.
    """

    def __init__(self, uri: str, barrier: threading.Barrier, after: RacingClient | None = None) -> None:
        super().__init__(uri)
        self.barrier, self.after = barrier, after
        self.read, self.moved = threading.Event(), threading.Event()

    def get_model_version_by_alias(self, name: str, alias: str):
        version = super().get_model_version_by_alias(name, alias)
        if not self.read.is_set():
            self.read.set()
            try:
                self.barrier.wait(timeout=10)
            except threading.BrokenBarrierError:
                pass
        return version

    def set_registered_model_alias(self, name: str, alias: str, version: str) -> None:
        if self.after is not None and self.after.read.is_set():
            self.after.moved.wait(timeout=120)
        super().set_registered_model_alias(name, alias, version)
        self.moved.set()


@pytest.mark.slow
def test_two_gates_at_once_never_leave_the_lower_model_champion(tracking: MlflowClient,
                                                                models: dict[str, str]) -> None:
    name = "gate-race"
    gate(tracking, name, "always_bright", models["always_bright"], 0.25, "exec-r0")  # v1, beaten by both
    barrier = threading.Barrier(2)
    higher = RacingClient(tracking.tracking_uri, barrier)
    lower = RacingClient(tracking.tracking_uri, barrier, after=higher)
    with ThreadPoolExecutor(2) as pool:
        runs = [pool.submit(gate, higher, name, "perfect", models["perfect"], 1.0, "exec-r1"),
                pool.submit(gate, lower, name, "always_dark", models["always_dark"], 0.75, "exec-r2")]
        decisions = {decision.model: decision for decision in (run.result() for run in runs)}
    champion = tracking.get_model_version_by_alias(name, ALIAS)
    assert champion.tags["tlpipe.model"] == "perfect"
    assert decisions["perfect"].promoted
    # the gates took turns (versions are registered inside the gate): the second was scored against the
    # champion the first one left (the first always wins over v1 here), never against the stale v1
    first, second = sorted(decisions.values(), key=lambda decision: int(decision.version))
    assert first.promoted and first.champion_version == "1"
    assert second.champion_version == first.version and second.champion_accuracy == first.test_accuracy
