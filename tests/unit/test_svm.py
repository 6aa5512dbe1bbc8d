"""Tests for the SVM core: the two equivalent C searches, the Gram-matrix final fit, input loading, train_svms."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import joblib
import numpy as np
import pandas as pd
import pytest
from sklearn.datasets import make_classification
from sklearn.model_selection import GridSearchCV
from sklearn.svm import SVC

from tests.tiny_data import SIZE, write_separable_features, write_tiny_store
from tlpipe.core.params import CGrid, SvmParams
from tlpipe.data import store
from tlpipe.evaluation.evaluate import predict_svm
from tlpipe.train.svm import (
    CV_COLUMNS,
    SVM_MODELS,
    LinearSVM,
    PrimalLinearSVC,
    choose_search,
    compute_gram,
    cv_table,
    fit_svm,
    load_inputs,
    load_pixels,
    make_folds,
    search_c,
    train_svms,
)

COUNTS = {"train": 12, "val": 2, "test": 6}  # per class
PARAMS = SvmParams(c_grid=CGrid(start=-2, stop=2, num=5), cv_folds=3, n_jobs=1, pixel_size=SIZE)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(store_dir, features_dir) of a tiny two-class data set."""
    root = tmp_path_factory.mktemp("tiny")
    store_dir = write_tiny_store(root / "store", COUNTS)
    return store_dir, write_separable_features(root / "features", store_dir)


@pytest.fixture(scope="module")
def trained(tiny: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """(svm_dir, summaries) of all three SVMs trained on the tiny data."""
    out = tmp_path_factory.mktemp("svm") / "svm"
    return out, train_svms(*tiny, out, PARAMS)


def random_problem(samples: int = 48, dims: int = 80, seed: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """A small noisy binary problem: a weak signal in the first dimension."""
    rng = np.random.default_rng(seed)
    y = np.repeat([0, 1], samples // 2)
    X = rng.normal(size=(samples, dims)).astype(np.float32)
    X[:, 0] += 0.8 * y
    return X, y


def test_precomputed_and_linear_searches_agree() -> None:
    X, y = random_problem()
    params = SvmParams(c_grid=CGrid(start=-3, stop=2, num=6), cv_folds=4, n_jobs=1)
    c_linear, linear = search_c(X, y, params, search="linear")
    c_gram, gram = search_c(X, y, params, search="precomputed")
    assert c_linear == c_gram
    np.testing.assert_allclose(gram["mean_test_score"], linear["mean_test_score"])
    np.testing.assert_allclose(gram["std_test_score"], linear["std_test_score"])
    assert gram["rank"].tolist() == linear["rank"].tolist()
    assert linear["mean_test_score"].nunique() > 1  # the grid is not trivially flat


def wide_problem(classes: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(X_train, y_train, X_test, y_test): more features than samples, like the pixel SVM."""
    X, y = make_classification(200, 300, n_informative=10, n_classes=classes, n_clusters_per_class=1,
                               random_state=seed)
    X = X.astype(np.float32)
    return X[:150], y[:150], X[150:], y[150:]


def old_platt_svc(X: np.ndarray, y: np.ndarray, c: float) -> SVC:
    """What the svm stage fitted before: ``SVC(kernel="linear", probability=True)`` (deprecated in 1.9)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return SVC(kernel="linear", C=c, probability=True, random_state=PARAMS.seed).fit(X, y)


@pytest.mark.parametrize("classes", [2, 3])
def test_fit_svm_matches_the_previous_path(classes: int) -> None:
    """Same C and CV table as GridSearchCV on a linear SVC; same predictions and weights as the linear SVC."""
    X, y, X_test, _ = wide_problem(classes)
    model, table, summary = fit_svm(X, y, PARAMS)
    assert summary["search"] == "precomputed"
    reference = GridSearchCV(SVC(kernel="linear"), {"C": PARAMS.c_grid.values()}, cv=make_folds(PARAMS),
                             scoring="accuracy", refit=False).fit(X, y)
    want = cv_table(reference.cv_results_)
    np.testing.assert_allclose(table["mean_test_score"], want["mean_test_score"])
    np.testing.assert_allclose(table["std_test_score"], want["std_test_score"])
    assert table["rank"].tolist() == want["rank"].tolist()
    assert summary["best_C"] == float(want.loc[want["rank"].idxmin(), "C"])
    old = old_platt_svc(X, y, summary["best_C"])
    np.testing.assert_array_equal(model.predict(X_test), old.predict(X_test))
    np.testing.assert_allclose(model.decision_function(X_test), old.decision_function(X_test), atol=1e-6)
    np.testing.assert_allclose(model.coef_, old.coef_, atol=1e-8)
    np.testing.assert_allclose(model.intercept_, old.intercept_, atol=1e-8)
    proba = model.predict_proba(X_test)
    assert proba.shape == (len(X_test), classes)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0)
    # Platt scaling on other folds than libsvm's internal ones: close, not equal
    assert (proba.argmax(1) == old.predict_proba(X_test).argmax(1)).mean() >= 0.9
    if classes == 2:
        assert np.abs(proba - old.predict_proba(X_test)).mean() < 0.05


def test_primal_svc_fit_and_input_check() -> None:
    X, y, X_test, _ = wide_problem(3, seed=1)
    primal = PrimalLinearSVC(C=0.5).fit(X, y)
    dual = SVC(kernel="precomputed", C=0.5).fit(compute_gram(X), y)
    np.testing.assert_array_equal(primal.predict(X_test), dual.predict(X_test.astype(np.float64) @ X.T.astype(np.float64)))
    assert primal.coef_.shape == (3, X.shape[1])
    with pytest.raises(ValueError, match=r"shape \(n, 300\)"):
        primal.predict(X_test[:, :10])


def test_linear_svm_is_fitted_from_a_given_gram_matrix() -> None:
    X, y, X_test, _ = wide_problem(2, seed=2)
    gram = compute_gram(X)
    given = LinearSVM(C=0.1, cv_folds=3).fit(X, y, gram=gram)
    computed = LinearSVM(C=0.1, cv_folds=3).fit(X, y)
    np.testing.assert_allclose(given.predict_proba(X_test), computed.predict_proba(X_test))
    assert given.n_support_.sum() > 0 and given.n_features_in_ == X.shape[1]


def test_search_c_table_has_one_row_per_c() -> None:
    X, y = random_problem()
    best, table = search_c(X, y, PARAMS)
    assert list(table.columns) == CV_COLUMNS
    np.testing.assert_allclose(table["C"], PARAMS.c_grid.values())
    assert best in PARAMS.c_grid.values()
    assert table.loc[table["C"] == best, "rank"].item() == 1


def test_search_c_rejects_unknown_search() -> None:
    X, y = random_problem()
    with pytest.raises(ValueError, match="unknown search"):
        search_c(X, y, PARAMS, search="rbf")


def test_choose_search_prefers_gram_for_wide_inputs() -> None:
    assert choose_search(220, 150_528) == "precomputed"
    assert choose_search(5_000, 1_280) == "linear"
    assert choose_search(50_000, 150_528) == "linear"  # the Gram matrix would not fit


def test_load_pixels_scales_and_resizes(tiny: tuple[Path, Path]) -> None:
    store_dir, _ = tiny
    full = load_pixels(store_dir, "train", SIZE)
    images = np.load(store.split_path(store_dir, "train"))
    assert full.dtype == np.float32 and full.shape == (len(images), SIZE * SIZE * 3)
    np.testing.assert_allclose(full, images.reshape(len(images), -1) / 255.0, rtol=1e-6)
    small = load_pixels(store_dir, "test", 4)
    assert small.shape == (store.npy_rows(store.split_path(store_dir, "test")), 4 * 4 * 3)
    assert small.min() >= 0.0 and small.max() <= 1.0


def test_load_inputs_sources(tiny: tuple[Path, Path]) -> None:
    store_dir, features_dir = tiny
    assert load_inputs(store_dir, features_dir, "val", "final", SIZE).shape == (4, 6)
    assert load_inputs(store_dir, features_dir, "val", "concat", SIZE).shape == (4, 9)
    with pytest.raises(ValueError, match="unknown SVM input source"):
        load_inputs(store_dir, features_dir, "val", "mid_only", SIZE)


def test_train_svms_writes_every_file(trained: tuple[Path, dict]) -> None:
    out, summaries = trained
    assert set(summaries) == set(SVM_MODELS)
    assert json.loads((out / "summary.json").read_text()) == summaries
    for name, summary in summaries.items():
        assert (out / f"{name}.joblib").is_file()
        assert len(pd.read_csv(out / f"{name}_cv.csv")) == PARAMS.c_grid.num
        assert summary["best_C"] in PARAMS.c_grid.values()
        assert summary["n_train"] == 2 * COUNTS["train"]
    assert summaries["svm_pixels"]["n_features"] == SIZE * SIZE * 3
    assert not list(out.parent.glob(".svm.tmp-*"))


def test_feature_svms_separate_the_test_split(tiny: tuple[Path, Path], trained: tuple[Path, dict]) -> None:
    store_dir, features_dir = tiny
    out, summaries = trained
    y_test = store.split_labels(store_dir, "test")
    for name in ("svm_features", "svm_concat"):
        X = load_inputs(store_dir, features_dir, "test", SVM_MODELS[name], SIZE)
        y_pred, proba = predict_svm(out / f"{name}.joblib", X)
        assert (y_pred == y_test).mean() == 1.0
        assert summaries[name]["cv_accuracy"] == 1.0
        np.testing.assert_allclose(proba.sum(axis=1), 1.0)


def test_pixel_svm_trains_and_predicts(tiny: tuple[Path, Path], trained: tuple[Path, dict]) -> None:
    store_dir, features_dir = tiny
    out, _ = trained
    model = joblib.load(out / "svm_pixels.joblib")
    assert isinstance(model, LinearSVM) and model.coef_.shape == (1, SIZE * SIZE * 3)
    X = load_inputs(store_dir, features_dir, "test", "pixels", SIZE)
    y_pred, proba = predict_svm(out / "svm_pixels.joblib", X)
    assert y_pred.shape == (2 * COUNTS["test"],) and set(y_pred) <= {0, 1}
    assert proba.shape == (2 * COUNTS["test"], 2)


def test_train_svms_rejects_unknown_names(tiny: tuple[Path, Path], tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown SVM models"):
        train_svms(*tiny, tmp_path / "svm", PARAMS, names=("svm_rbf",))
    assert not (tmp_path / "svm").exists()
