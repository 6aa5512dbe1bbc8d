"""Tests for the ensemble: calibration math, the keep rule, the evaluate stage's tries and the ensemble pyfunc.

The pure functions run on tiny arrays. The evaluate and pyfunc tests use a tiny store with a large validation
split and three real Keras networks that each see one row of pixels (weak, mostly different mistakes), so an
ensemble of them helps; a real ``svm_pixels`` joins the pyfunc test.
"""

from __future__ import annotations

import json
from pathlib import Path

import joblib
import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow import MlflowClient

from tests.tiny_data import CLASSES, SIZE, write_network_summary, write_row_network, write_tiny_store
from tlpipe.core.names import ENSEMBLE_MODEL, MODEL_NAMES, REPORTED_MODELS, model_family, model_file
from tlpipe.core.params import CGrid, EvaluateParams, Params, SvmParams
from tlpipe.data import store
from tlpipe.evaluation.choice import wilson_lower
from tlpipe.evaluation.ensemble import (
    SPEC_FILE,
    TRIES_FILE,
    add_report_section,
    apply_temperatures,
    choose_try,
    plan_ensemble,
    rank_members,
    score_on_test,
)
from tlpipe.evaluation.evaluate import evaluate_models, predict_model
from tlpipe.evaluation.outputs import build_comparison
from tlpipe.serving.calibration import (
    average_probabilities,
    crossfit_temperature,
    fit_temperature,
    log_loss,
    scale_temperature,
)

NETWORKS = {"frozen": 0, "concat": 1, "finetuned": 2}  # each sees one row of pixels
COUNTS = {"train": 10, "val": 100, "test": 30}  # per class: a large validation split
rng = np.random.default_rng


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax."""
    weights = np.exp(logits - logits.max(axis=1, keepdims=True))
    return weights / weights.sum(axis=1, keepdims=True)


def noisy_member(y: np.ndarray, seed: int, signal: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """A weak binary classifier's (labels, probabilities): the true class's logit plus independent noise."""
    logits = np.stack([-signal * (2 * y - 1), signal * (2 * y - 1)], axis=1) + rng(seed).normal(0, 1.2, (len(y), 2))
    proba = softmax(logits)
    return proba.argmax(axis=1), proba


# ---------------------------------------------------------------- calibration


def test_scale_temperature_softens_or_sharpens_and_keeps_the_class() -> None:
    proba = np.array([[0.9, 0.1], [0.3, 0.7], [0.5, 0.5]])
    np.testing.assert_allclose(scale_temperature(proba, 1.0), proba)
    soft, sharp = scale_temperature(proba, 2.0), scale_temperature(proba, 0.5)
    assert soft[0, 0] == pytest.approx(3 / 4)  # sqrt(0.9) / (sqrt(0.9) + sqrt(0.1))
    assert sharp[0, 0] == pytest.approx(0.81 / 0.82)
    np.testing.assert_allclose(soft.sum(axis=1), 1.0)
    assert (soft.argmax(axis=1) == proba.argmax(axis=1)).all() and (sharp.argmax(axis=1) == proba.argmax(axis=1)).all()
    with pytest.raises(ValueError, match="temperature"):
        scale_temperature(proba, 0.0)


def test_fit_temperature_recovers_an_overconfident_networks_temperature() -> None:
    logits = rng(0).normal(0, 2, (4000, 3))
    y = np.array([rng(1 + i).choice(3, p=p) for i, p in enumerate(softmax(logits))])  # calibrated at T = 1
    overconfident = softmax(3 * logits)
    assert fit_temperature(overconfident, y) == pytest.approx(3.0, rel=0.1)
    assert log_loss(scale_temperature(overconfident, 3.0), y) < log_loss(overconfident, y)
    assert fit_temperature(softmax(logits), y) == pytest.approx(1.0, rel=0.1)


def test_crossfit_temperature_never_uses_a_rows_own_label() -> None:
    y = np.tile([0, 1], 20)
    proba = noisy_member(y, 2, signal=2.0)[1]  # informative and overconfident: T is fitted inside its range
    scaled = crossfit_temperature(proba, y)
    flipped = y.copy()
    flipped[7] = 1 - flipped[7]
    rescaled = crossfit_temperature(proba, flipped)
    np.testing.assert_allclose(rescaled[7], scaled[7])  # row 7's temperature was fitted without row 7
    assert not np.allclose(rescaled, scaled)  # the other folds' temperatures did see the change
    np.testing.assert_allclose(crossfit_temperature(proba[:1], y[:1]), proba[:1])


def test_average_probabilities_by_hand() -> None:
    average = average_probabilities([np.array([[0.8, 0.2]]), np.array([[0.4, 0.6]]), np.array([[0.3, 0.7]])])
    np.testing.assert_allclose(average, [[0.5, 0.5]])


# ---------------------------------------------------------------- the keep rule


def test_members_are_ranked_by_their_selection_bound_with_ties_in_model_order() -> None:
    predictions = {name: (None, np.ones((1, 2)) / 2) for name in ("svm_features", "svm_pixels", "frozen", "concat")}
    predictions["svm_pixels"] = (None, None)  # no probabilities: cannot join
    bounds = {"svm_features": 0.8, "svm_pixels": 0.9, "frozen": 0.85, "concat": 0.8, "finetuned": 0.99}
    assert rank_members(bounds, predictions) == ["frozen", "svm_features", "concat"]  # finetuned: not evaluated


def test_choose_try_keeps_only_a_try_that_beats_the_best_single_model_on_both_counts() -> None:
    tries = [{"members": ["a", "b"], "k": 2, "val_accuracy": 0.90, "val_log_loss": 0.30, "val_bound": 0.85},
             {"members": ["a", "b", "c"], "k": 3, "val_accuracy": 0.90, "val_log_loss": 0.25, "val_bound": 0.85}]
    assert choose_try(tries, best_bound=0.80, best_val_accuracy=0.88)[0] == 1  # same bound: lower log-loss
    assert choose_try(tries, best_bound=0.85, best_val_accuracy=0.80)[0] is None  # a tie does not help
    index, reason = choose_try(tries, best_bound=0.70, best_val_accuracy=0.90)  # no better than one model on val
    assert index is None and reason.startswith("dropped") and "0.9000" in reason
    assert choose_try([], 0.5, 0.5)[0] is None


def test_an_ensemble_that_helps_on_val_is_kept_and_one_that_does_not_is_dropped() -> None:
    y = np.tile([0, 1], 150)
    val = {"frozen": noisy_member(y, 1), "concat": noisy_member(y, 2), "finetuned": noisy_member(y, 3)}
    single = max(np.mean(labels == y) for labels, _ in val.values())
    bounds = {name: round(wilson_lower(float(np.mean(labels == y)), len(y)), 4) for name, (labels, _) in val.items()}
    plan = plan_ensemble(val, y, bounds)
    assert [entry["k"] for entry in plan["tries"]] == [2, 3]
    assert plan["kept"] and plan["val_accuracy"] > single and plan["val_bound"] > max(bounds.values())
    assert [entry["kept"] for entry in plan["tries"]].count(True) == 1
    assert set(plan["temperatures"]) == set(plan["members"]) and all(t > 0 for t in plan["temperatures"].values())
    assert json.loads(json.dumps(plan)) == plan  # JSON-ready (it travels as a task result)

    copies = {name: val["frozen"] for name in ("frozen", "concat", "finetuned")}  # three copies: nothing to gain
    dropped = plan_ensemble(copies, y, {name: bounds["frozen"] for name in copies})
    assert not dropped["kept"] and dropped["members"] == [] and dropped["reason"].startswith("dropped")
    # an SVM's cross-validated bound on a large train split outranks the same accuracy on val: dropped too
    svm_first = plan_ensemble(val, y, {**bounds, "frozen": 0.99})
    assert not svm_first["kept"]


def test_the_test_split_never_changes_the_decision() -> None:
    y_val = np.tile([0, 1], 150)
    val = {"frozen": noisy_member(y_val, 1), "concat": noisy_member(y_val, 2), "finetuned": noisy_member(y_val, 3)}
    bounds = {name: round(wilson_lower(float(np.mean(labels == y_val)), len(y_val)), 4)
              for name, (labels, _) in val.items()}
    y_test = np.tile([0, 1], 50)
    test = {name: noisy_member(y_test, 10 + i) for i, name in enumerate(val)}
    decisions = []
    for labels in (y_test, 1 - y_test):  # the true labels, and labels under which every try is wrong most of the time
        plan = plan_ensemble(val, y_val, bounds)
        kept = score_on_test(plan, test, labels)
        decisions.append((plan["kept"], plan["members"], [entry["kept"] for entry in plan["tries"]]))
        assert kept is not None
    assert decisions[0] == decisions[1]
    scored = plan_ensemble(val, y_val, bounds)
    score_on_test(scored, test, 1 - y_test)
    assert all(entry["test_accuracy"] < 0.5 for entry in scored["tries"])  # the test labels favoured dropping it

    copies = {name: val["frozen"] for name in val}  # dropped on val, even where test labels would favour keeping
    plan = plan_ensemble(copies, y_val, {name: bounds["frozen"] for name in copies})
    assert score_on_test(plan, test, y_test) is None and not plan["kept"]


# ---------------------------------------------------------------- on real models


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A store with a large validation split, three one-row networks (selection score: their real val accuracy)
    and, in its own folder, a real ``svm_pixels``."""
    from tlpipe.train.svm import train_svms

    root = tmp_path_factory.mktemp("ensemble_world")
    store_dir = write_tiny_store(root / "store", COUNTS, seed=3)
    y_val = store.split_labels(store_dir, "val")
    for name, row in NETWORKS.items():
        path = write_row_network(root / "finetune" / f"{name}.keras", row)
        labels, _ = predict_model(name, path, store_dir, root / "features", SIZE, "val")
        write_network_summary(root / "finetune", name, float(np.mean(labels == y_val)))
    params = SvmParams(c_grid=CGrid(start=-1, stop=1, num=3), cv_folds=3, n_jobs=1, pixel_size=SIZE)
    train_svms(store_dir, root / "features", root / "svm", params, names=("svm_pixels",))
    return {"root": root, "store": store_dir, "finetune": root / "finetune", "svm": root / "svm"}


@pytest.fixture(scope="module")
def evaluated(world: dict) -> tuple[Path, dict]:
    """evaluate_models over the three networks (no SVMs), into a folder holding a stale ensemble confusion matrix."""
    out = world["root"] / "evaluate"
    out.mkdir()
    result = evaluate_models(world["store"], world["root"] / "features", None, world["finetune"], out,
                             EvaluateParams(grid_images=4), SIZE)
    return out, result


def test_models_list_the_ensemble_apart_from_the_trained_models() -> None:
    assert ENSEMBLE_MODEL not in MODEL_NAMES and (*MODEL_NAMES, ENSEMBLE_MODEL) == REPORTED_MODELS
    assert model_family(ENSEMBLE_MODEL) == "ensemble"
    with pytest.raises(ValueError, match="not a trained model"):
        model_file(Path("svm"), Path("finetune"), ENSEMBLE_MODEL)


def test_evaluate_keeps_a_helpful_ensemble_as_its_own_model(evaluated: tuple[Path, dict], world: dict) -> None:
    out, result = evaluated
    plan = result["ensemble"]
    singles = plan["single_val_accuracy"]
    assert set(singles) == set(NETWORKS) and max(singles.values()) < 0.9  # weak networks
    assert plan["kept"] and plan["val_accuracy"] > max(singles.values())
    assert list(result["metrics"]) == [*NETWORKS, ENSEMBLE_MODEL]
    assert result["candidate"] == ENSEMBLE_MODEL  # the highest bound: put forward to the gate
    assert result["selection"][ENSEMBLE_MODEL] == plan["val_accuracy"]
    assert result["selection_bounds"][ENSEMBLE_MODEL] == plan["val_bound"]
    assert result["metrics"][ENSEMBLE_MODEL]["accuracy"] == next(t for t in plan["tries"] if t["kept"])["test_accuracy"]

    comparison = pd.read_csv(out / "comparison.csv")
    row = comparison[comparison["model"] == ENSEMBLE_MODEL].iloc[0]
    assert row["family"] == "ensemble" and row["selection_score"] == plan["val_accuracy"]
    assert set(json.loads((out / "metrics.json").read_text())) == {*NETWORKS, ENSEMBLE_MODEL}
    assert (out / f"confusion_{ENSEMBLE_MODEL}.png").is_file()
    predictions = pd.read_csv(out / "predictions.csv")
    assert set(predictions[ENSEMBLE_MODEL]) <= set(CLASSES)

    tries = pd.read_csv(out / TRIES_FILE)
    assert tries["members"].tolist() == ["+".join(t["members"]) for t in plan["tries"]] and len(tries) == 2
    assert tries["kept"].sum() == 1 and tries["test_accuracy"].between(0, 1).all()
    spec = json.loads((out / SPEC_FILE).read_text())
    assert spec["members"] == plan["members"] and spec["temperatures"] == plan["temperatures"]
    assert {name: spec["files"][name]["file"] for name in plan["members"]} == {
        name: f"{name}.keras" for name in plan["members"]}
    from tlpipe.core.hashing import file_sha256

    assert all(spec["files"][name]["sha256"] == file_sha256(world["finetune"] / f"{name}.keras")
               for name in plan["members"])


def test_an_unhelpful_ensemble_leaves_no_model_behind(world: dict, evaluated: tuple[Path, dict],
                                                      tmp_path: Path) -> None:
    """The same networks, each claiming a perfect validation score: no try can beat that; the earlier run's
    ensemble files are removed."""
    out, _ = evaluated
    finetune = tmp_path / "finetune"
    for name in NETWORKS:
        finetune.mkdir(exist_ok=True)
        (finetune / f"{name}.keras").write_bytes((world["finetune"] / f"{name}.keras").read_bytes())
        write_network_summary(finetune, name, 1.0)
    stale = tmp_path / "out"
    stale.mkdir()
    for name in (SPEC_FILE, f"confusion_{ENSEMBLE_MODEL}.png"):
        (stale / name).write_bytes((out / name).read_bytes())
    result = evaluate_models(world["store"], tmp_path / "features", None, finetune, stale,
                             EvaluateParams(grid_images=4), SIZE)
    assert not result["ensemble"]["kept"] and ENSEMBLE_MODEL not in result["metrics"]
    assert result["candidate"] in NETWORKS
    assert len(pd.read_csv(stale / TRIES_FILE)) == 2
    assert not (stale / SPEC_FILE).exists() and not (stale / f"confusion_{ENSEMBLE_MODEL}.png").exists()
    assert ENSEMBLE_MODEL not in build_comparison(result["metrics"], result["selection"])["model"].tolist()


def test_report_shows_every_try(evaluated: tuple[Path, dict]) -> None:
    from tlpipe.render.html import ReportData, render_html

    _, result = evaluated
    data = add_report_section(ReportData(title="t"), result)
    (section,) = data.sections
    assert section.anchor == "ensemble" and len(section.table.rows) == 2
    assert list(section.table.highlight) == [" + ".join(result["ensemble"]["members"])]
    page = render_html(data)
    assert "Ensemble tries" in page and 'href="#ensemble"' in page and "Kept: " in page
    assert add_report_section(ReportData(title="t"), {"ensemble": {"tries": []}}).sections == ()


@pytest.fixture
def tracking_store(tmp_path: Path):
    """A fresh SQLite MLflow store with one active experiment."""
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    experiment = MlflowClient().create_experiment("ensemble", artifact_location=(tmp_path / "art").as_uri())
    mlflow.set_experiment(experiment_id=experiment)
    yield tmp_path
    mlflow.set_tracking_uri(previous)


def test_logged_ensemble_loads_and_predicts_like_its_members_averaged(world: dict, tracking_store: Path) -> None:
    """Two networks and an SVM on pixels, one temperature-scaled: the pyfunc's probabilities are the members'
    calibrated probabilities averaged, from any input form."""
    from mlflow import MlflowClient

    from tlpipe.serving.classifier import to_image_frame
    from tlpipe.tracking.logged_models import log_ensemble_classifier

    members = {"svm_pixels": model_file(world["svm"], world["finetune"], "svm_pixels"),
               "frozen": world["finetune"] / "frozen.keras", "concat": world["finetune"] / "concat.keras"}
    temperatures = {"svm_pixels": None, "frozen": 1.7, "concat": 0.6}
    params = Params.model_validate({"svm": {"pixel_size": SIZE}})
    with mlflow.start_run() as run:
        info = log_ensemble_classifier(MlflowClient(), run.info.run_id, ENSEMBLE_MODEL, members, temperatures, world["store"], None, params)
    model = mlflow.pyfunc.load_model(info.model_uri)
    images = np.load(store.split_path(world["store"], "test"))
    frame = model.predict(to_image_frame(images))

    test = {name: predict_model(name, path, world["store"], world["root"] / "features", SIZE)
            for name, path in members.items()}
    expected = average_probabilities(list(apply_temperatures({n: p for n, (_, p) in test.items()},
                                                             temperatures).values()))
    got = frame[[f"p_{name}" for name in CLASSES]].to_numpy(dtype=float)
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert frame["class"].tolist() == [CLASSES[i] for i in expected.argmax(axis=1)]
    assert frame["error"].isna().all()
    svm = joblib.load(members["svm_pixels"])
    assert not np.allclose(expected, svm.predict_proba(images.reshape(len(images), -1) / 255))  # not one member
