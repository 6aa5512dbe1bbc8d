"""Tests for the SVM core: the two equivalent C searches, input loading and train_svms."""

from __future__ import annotations

import json
from pathlib import Path

import joblib
import numpy as np
import pandas as pd
import pytest

from tests.tiny_data import CLASSES, SIZE, write_separable_features, write_tiny_store
from tlpipe import store
from tlpipe.config import CGrid, SvmParams
from tlpipe.evaluate import predict_svm
from tlpipe.svm import (
    CV_COLUMNS,
    SVM_MODELS,
    choose_search,
    load_inputs,
    load_pixels,
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
    assert 0.0 <= small.min() and small.max() <= 1.0


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
    assert model.kernel == "linear" and model.probability
    X = load_inputs(store_dir, features_dir, "test", "pixels", SIZE)
    y_pred, proba = predict_svm(out / "svm_pixels.joblib", X)
    assert y_pred.shape == (2 * COUNTS["test"],) and set(y_pred) <= {0, 1}
    assert proba.shape == (2 * COUNTS["test"], 2)


def test_train_svms_rejects_unknown_names(tiny: tuple[Path, Path], tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown SVM models"):
        train_svms(*tiny, tmp_path / "svm", PARAMS, names=("svm_rbf",))
    assert not (tmp_path / "svm").exists()
