"""Core of the ``svm`` stage: linear SVMs on CNN features and, as a baseline, on raw pixels.

The course's lesson in three models: a linear SVM on pretrained CNN features
(``svm_features``, ``svm_concat``) is excellent, while the same SVM on raw
pixels (``svm_pixels``) is near chance.

C is chosen by a stratified K-fold grid search on the TRAIN split only; the
val split is kept for the early stopping of the networks and is not seen by the
SVMs. The final model, ``SVC(kernel="linear", C=best, probability=True)``, is
refit on the whole train split.

Two searches, one result. A linear-kernel SVC computes the same dot products
for every fit of the grid; with many more features than samples (raw pixels:
150,528 dims for a few hundred images) that is slow. The precomputed search
builds the Gram matrix ``X @ X.T`` once and runs ``SVC(kernel="precomputed")``
with the same grid and folds (GridSearchCV slices kernel matrices by rows and
columns), which is mathematically the same problem. :func:`choose_search`
takes the precomputed path when ``n_features > n_samples`` and the Gram matrix
is small enough to hold, else the plain linear one.
"""

from __future__ import annotations

import logging
import shutil
import time
import warnings
from pathlib import Path

import joblib
import numpy as np
import pandas as pd
from PIL import Image
from sklearn.model_selection import GridSearchCV, StratifiedKFold
from sklearn.svm import SVC

from tlpipe import store
from tlpipe.config import SvmParams
from tlpipe.features import load_features

from tlpipe.models import SVM_MODELS  # noqa: E402  (re-exported)
SOURCES = ("final", "concat", "pixels")
SEARCHES = ("linear", "precomputed")
MAX_GRAM_SAMPLES = 20_000  # an n x n float64 Gram matrix of 3.2 GB
PIXEL_BATCH = 64
CV_COLUMNS = ["C", "mean_test_score", "std_test_score", "rank", "mean_fit_time"]

logger = logging.getLogger("tlpipe.svm")


def resize_batch(batch: np.ndarray, size: int) -> np.ndarray:
    """Resize a uint8 (n, H, W, 3) batch to (n, size, size, 3) with PIL bilinear."""
    if batch.shape[1:3] == (size, size):
        return batch
    return np.stack([np.asarray(Image.fromarray(image).resize((size, size), Image.BILINEAR))
                     for image in batch])


def load_pixels(store_dir: Path, split: str, pixel_size: int) -> np.ndarray:
    """Load one split's images as flat float32 pixel vectors in [0, 1].

    Images are streamed from the store in batches and resized (PIL bilinear)
    when ``pixel_size`` differs from the stored size.

    Returns:
        An (N, pixel_size * pixel_size * 3) float32 array aligned with the split.
    """
    path = store.split_path(Path(store_dir), split)
    rows = store.npy_rows(path)
    pixels = np.empty((rows, pixel_size * pixel_size * 3), dtype=np.float32)
    start = 0
    for batch in store.iter_npy_batches(path, PIXEL_BATCH):
        flat = resize_batch(batch, pixel_size).reshape(len(batch), -1)
        np.multiply(flat, np.float32(1 / 255), out=pixels[start:start + len(batch)], casting="unsafe")
        start += len(batch)
    return pixels


def load_inputs(store_dir: Path, features_dir: Path, split: str, source: str, pixel_size: int) -> np.ndarray:
    """Load an SVM's inputs for one split.

    Args:
        store_dir: The image store (for ``pixels``).
        features_dir: The features folder (for ``final`` and ``concat``).
        split: ``train``, ``val`` or ``test``.
        source: ``final``, ``concat`` or ``pixels``.
        pixel_size: Side of the raw-pixel images.
    """
    if source == "pixels":
        return load_pixels(store_dir, split, pixel_size)
    if source in ("final", "concat"):
        return load_features(features_dir, split, source)
    raise ValueError(f"unknown SVM input source {source!r}; expected one of {SOURCES}")


def choose_search(n_samples: int, n_features: int) -> str:
    """Pick the faster of two equivalent searches: 'precomputed' or 'linear'."""
    return "precomputed" if n_features > n_samples and n_samples <= MAX_GRAM_SAMPLES else "linear"


def build_grid_search(params: SvmParams, kernel: str) -> GridSearchCV:
    """The C search: GridSearchCV over ``params.c_grid`` with stratified shuffled folds."""
    folds = StratifiedKFold(params.cv_folds, shuffle=True, random_state=params.seed)
    return GridSearchCV(SVC(kernel=kernel), {"C": params.c_grid.values()}, cv=folds,
                        n_jobs=params.n_jobs, scoring="accuracy", refit=False)


def cv_table(results: dict) -> pd.DataFrame:
    """One row per C from ``GridSearchCV.cv_results_``."""
    return pd.DataFrame({
        "C": np.asarray(results["param_C"], dtype=float),
        "mean_test_score": results["mean_test_score"],
        "std_test_score": results["std_test_score"],
        "rank": results["rank_test_score"],
        "mean_fit_time": results["mean_fit_time"],
    })


def search_c(X: np.ndarray, y: np.ndarray, params: SvmParams, search: str | None = None) -> tuple[float, pd.DataFrame]:
    """Choose C for a linear SVM by stratified K-fold cross-validation.

    Args:
        X: Inputs (n_samples, n_features).
        y: Integer labels.
        params: Grid, folds, seed and parallelism.
        search: ``"linear"``, ``"precomputed"`` (same result on a Gram matrix)
            or None to pick the faster with :func:`choose_search`.

    Returns:
        The chosen C (best mean accuracy; ties go to the smallest C) and the CV
        table, one row per C.
    """
    search = search or choose_search(*X.shape)
    if search not in SEARCHES:
        raise ValueError(f"unknown search {search!r}; expected one of {SEARCHES}")
    inputs = X
    if search == "precomputed":
        features = np.asarray(X, dtype=np.float64)
        inputs = features @ features.T
    grid = build_grid_search(params, search)
    grid.fit(inputs, y)
    table = cv_table(grid.cv_results_)
    return float(table.loc[table["rank"].idxmin(), "C"]), table


def fit_final(X: np.ndarray, y: np.ndarray, c: float, seed: int) -> SVC:
    """Fit ``SVC(kernel="linear", C=c, probability=True)`` on all of ``X``.

    scikit-learn 1.9 deprecates ``probability=True`` (removal planned for 1.11,
    successor ``CalibratedClassifierCV(SVC(), ensemble=False)``); the pinned 1.9
    still supports it, so its FutureWarning is silenced here, and only here.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*`probability` parameter was deprecated",
                                category=FutureWarning)
        return SVC(kernel="linear", C=c, probability=True, random_state=seed).fit(X, y)


def fit_svm(X: np.ndarray, y: np.ndarray, params: SvmParams, search: str | None = None) -> tuple[SVC, pd.DataFrame, dict]:
    """Search C, then fit the final linear SVM (with Platt probabilities) on all of ``X``.

    Returns:
        The fitted ``SVC(kernel="linear", C=best, probability=True)``, the CV
        table and a summary: best_C, cv_accuracy, cv_std, fit_seconds (search
        and final fit), search_seconds, search, n_train, n_features.
    """
    search = search or choose_search(*X.shape)
    start = time.perf_counter()
    best_c, table = search_c(X, y, params, search)
    searched = time.perf_counter()
    model = fit_final(X, y, best_c, params.seed)
    best = table.loc[table["rank"].idxmin()]
    summary = {
        "best_C": best_c,
        "cv_accuracy": round(float(best["mean_test_score"]), 4),
        "cv_std": round(float(best["std_test_score"]), 4),
        "fit_seconds": round(time.perf_counter() - start, 3),
        "search_seconds": round(searched - start, 3),
        "search": search,
        "n_train": int(X.shape[0]),
        "n_features": int(X.shape[1]),
    }
    return model, table, summary


def check_names(names: tuple[str, ...]) -> None:
    """Reject unknown SVM model names."""
    unknown = [name for name in names if name not in SVM_MODELS]
    if unknown:
        raise ValueError(f"unknown SVM models {unknown}; expected some of {list(SVM_MODELS)}")


def train_svms(
    store_dir: Path, features_dir: Path, out_dir: Path, params: SvmParams,
    names: tuple[str, ...] = tuple(SVM_MODELS),
) -> dict[str, dict]:
    """Train the named SVMs on the train split and publish them at ``out_dir``.

    Writes into a staging folder published atomically: ``<name>.joblib``,
    ``<name>_cv.csv`` and ``summary.json`` (``{name: summary}``).

    Returns:
        ``{name: summary}`` as returned by :func:`fit_svm`, plus the input source.
    """
    check_names(names)
    y = store.split_labels(Path(store_dir), "train")
    staging = store.staging_dir(Path(out_dir))
    try:
        summaries = {}
        for name in names:
            X = load_inputs(store_dir, features_dir, "train", SVM_MODELS[name], params.pixel_size)
            model, table, summary = fit_svm(X, y, params)
            joblib.dump(model, staging / f"{name}.joblib")
            store.write_csv(staging / f"{name}_cv.csv", table)
            summaries[name] = {**summary, "source": SVM_MODELS[name]}
            logger.info("%s: C=%g, CV accuracy %.4f ± %.4f, %.1f s (%s search, %d x %d)", name,
                        summary["best_C"], summary["cv_accuracy"], summary["cv_std"],
                        summary["fit_seconds"], summary["search"], *X.shape)
        store.write_json(staging / "summary.json", summaries)
        store.publish_dir(staging, Path(out_dir))
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return summaries
