"""Core of the ``svm`` stage: linear SVMs on CNN features and, as a baseline, on raw pixels.

The course's lesson in three models: a linear SVM on pretrained CNN features
(``svm_features``, ``svm_concat``) is excellent, while the same SVM on raw
pixels (``svm_pixels``) is near chance.

C is chosen by a stratified K-fold grid search on the TRAIN split only; the
val split is kept for the early stopping of the networks and is not seen by the
SVMs.

Two searches, one result. A linear-kernel SVC computes the same dot products
for every fit of the grid; with many more features than samples (raw pixels:
150,528 dims for a few hundred images) that is slow. The precomputed search
builds the Gram matrix ``X @ X.T`` once and runs ``SVC(kernel="precomputed")``
with the same grid and folds (GridSearchCV slices kernel matrices by rows and
columns), which is mathematically the same problem. :func:`choose_search`
takes the precomputed path when ``n_features > n_samples`` and the Gram matrix
is small enough to hold, else the plain linear one.

The final model (:class:`LinearSVM`) is fitted from a Gram matrix too (the
search's, when it built one), the way scikit-learn 1.9 recommends instead of
the deprecated ``SVC(probability=True)``:
``CalibratedClassifierCV(SVC(kernel="precomputed", C=best), ensemble=False)``
on the same folds: out-of-fold decision values calibrate a sigmoid (Platt
scaling, what ``probability=True`` did inside libsvm) and the SVC is refit on
all rows. A linear kernel's dual solution then gives the primal weights,
``w = sum_i alpha_i y_i x_i`` (per one-vs-one pair when multiclass) with the
SVC's intercept, so the saved model is ``(n_pairs, n_features)`` weights and
predicts from raw inputs without keeping the training rows. On the full ELPV
set this replaced a ``probability=True`` refit (six libsvm fits on 150,528-d
rows) by fits on a 1,889 x 1,889 matrix.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

import joblib
import numpy as np
import pandas as pd
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.calibration import CalibratedClassifierCV
from sklearn.model_selection import GridSearchCV, StratifiedKFold
from sklearn.svm import SVC

from tlpipe.core.names import SVM_MODELS  # noqa: E402  (re-exported)
from tlpipe.core.params import SvmParams
from tlpipe.data import store
from tlpipe.data.images import resize_batch
from tlpipe.features.extraction import load_features

SOURCES = ("final", "concat", "pixels")
SEARCHES = ("linear", "precomputed")
MAX_GRAM_SAMPLES = 20_000  # an n x n float64 Gram matrix of 3.2 GB
PIXEL_BATCH = 64
PRIMAL_CHUNK = 16_384  # feature columns per step when turning dual coefficients into weights
PRIMAL_TOLERANCE = 1e-4  # max |primal - dual| decision value, relative to the decision scale
CV_COLUMNS = ["C", "mean_test_score", "std_test_score", "rank", "mean_fit_time"]

logger = logging.getLogger("tlpipe.svm")


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


def make_folds(params: SvmParams) -> StratifiedKFold:
    """The stratified shuffled folds of the C search (and of the probability calibration)."""
    return StratifiedKFold(params.cv_folds, shuffle=True, random_state=params.seed)


def build_grid_search(params: SvmParams, kernel: str) -> GridSearchCV:
    """The C search: GridSearchCV over ``params.c_grid`` with stratified shuffled folds."""
    return GridSearchCV(SVC(kernel=kernel), {"C": params.c_grid.values()}, cv=make_folds(params),
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


def compute_gram(X: np.ndarray) -> np.ndarray:
    """The linear kernel matrix ``X @ X.T`` in float64."""
    features = np.asarray(X, dtype=np.float64)
    return features @ features.T


def search_c(X: np.ndarray, y: np.ndarray, params: SvmParams, search: str | None = None,
             gram: np.ndarray | None = None) -> tuple[float, pd.DataFrame]:
    """Choose C for a linear SVM by stratified K-fold cross-validation.

    Args:
        X: Inputs (n_samples, n_features).
        y: Integer labels.
        params: Grid, folds, seed and parallelism.
        search: ``"linear"``, ``"precomputed"`` (same result on a Gram matrix)
            or None to pick the faster with :func:`choose_search`.
        gram: ``X @ X.T`` when already computed (precomputed search only).

    Returns:
        The chosen C (best mean accuracy; ties go to the smallest C) and the CV
        table, one row per C.
    """
    search = search or choose_search(*X.shape)
    if search not in SEARCHES:
        raise ValueError(f"unknown search {search!r}; expected one of {SEARCHES}")
    inputs = X
    if search == "precomputed":
        inputs = compute_gram(X) if gram is None else gram
    grid = build_grid_search(params, search)
    grid.fit(inputs, y)
    table = cv_table(grid.cv_results_)
    return float(table.loc[table["rank"].idxmin(), "C"]), table


def dual_to_primal(svc: SVC, X: np.ndarray) -> np.ndarray:
    """The primal weights of a fitted linear (or precomputed linear-kernel) SVC.

    For the one-vs-one pair (i, j) the weight vector is the sum of
    ``dual_coef * x`` over the support vectors of classes i and j, as in
    scikit-learn's ``SVC.coef_`` for ``kernel="linear"``; here the support
    vectors are rows of ``X`` picked by ``svc.support_`` (no copy of them is
    made: a sparse-by-construction (n_pairs, n_samples) coefficient matrix
    multiplies ``X`` column block by column block, in float64).

    Args:
        svc: A fitted SVC whose kernel was ``X @ X.T``.
        X: The training rows the SVC's kernel was built from.

    Returns:
        Weights (n_pairs, n_features), float64; one row when binary.
    """
    n_classes = len(svc.classes_)
    starts = np.concatenate([[0], np.cumsum(svc.n_support_)])
    alpha = np.zeros((n_classes * (n_classes - 1) // 2, len(X)))
    pair = 0
    for first in range(n_classes):
        for second in range(first + 1, n_classes):
            rows_1, rows_2 = slice(starts[first], starts[first + 1]), slice(starts[second], starts[second + 1])
            alpha[pair, svc.support_[rows_1]] = svc.dual_coef_[second - 1, rows_1]
            alpha[pair, svc.support_[rows_2]] = svc.dual_coef_[first, rows_2]
            pair += 1
    weights = np.empty((len(alpha), X.shape[1]))
    for start in range(0, X.shape[1], PRIMAL_CHUNK):
        block = slice(start, start + PRIMAL_CHUNK)
        weights[:, block] = alpha @ np.asarray(X[:, block], dtype=np.float64)
    return weights


class PrimalLinearSVC(ClassifierMixin, BaseEstimator):
    """A fitted linear SVC held as primal weights: same decision values and predictions as the SVC.

    Built with :meth:`from_svc`; :meth:`fit` fits one from scratch through the
    Gram matrix. Binary: ``decision_function = X @ coef_[0] + intercept_[0]``,
    positive for ``classes_[1]``. Multiclass: one-vs-one pairs voted like
    libsvm (ties to the lower class index), decision values in scikit-learn's
    ``"ovr"`` shape.

    Args:
        C: Regularisation (used by :meth:`fit` only).
    """

    def __init__(self, C: float = 1.0) -> None:
        self.C = C

    @classmethod
    def from_svc(cls, svc: SVC, X: np.ndarray) -> PrimalLinearSVC:
        """Convert a fitted SVC whose kernel was ``X @ X.T`` (linear or precomputed)."""
        model = cls(C=float(svc.C))
        model.coef_ = dual_to_primal(svc, X)
        model.intercept_ = np.asarray(svc.intercept_, dtype=np.float64).copy()
        model.classes_ = np.asarray(svc.classes_).copy()
        model.n_features_in_ = int(X.shape[1])
        return model

    def fit(self, X: np.ndarray, y: np.ndarray) -> PrimalLinearSVC:
        """Fit ``SVC(kernel="precomputed", C)`` on ``X @ X.T`` and keep its primal form."""
        svc = SVC(kernel="precomputed", C=self.C).fit(compute_gram(X), y)
        fitted = self.from_svc(svc, np.asarray(X))
        self.coef_, self.intercept_, self.classes_ = fitted.coef_, fitted.intercept_, fitted.classes_
        self.n_features_in_ = fitted.n_features_in_
        return self

    def pair_decisions(self, X: np.ndarray) -> np.ndarray:
        """One-vs-one decision values (n_samples, n_pairs), libsvm's sign (positive: the pair's first class),
        except when binary, where positive means ``classes_[1]`` (scikit-learn's convention)."""
        X = np.asarray(X)
        if X.ndim != 2 or X.shape[1] != self.n_features_in_:
            raise ValueError(f"expected inputs of shape (n, {self.n_features_in_}), got {X.shape}")
        return np.asarray(X, dtype=np.float64) @ self.coef_.T + self.intercept_

    def decision_function(self, X: np.ndarray) -> np.ndarray:
        """Decision values as ``SVC.decision_function`` (``decision_function_shape="ovr"``)."""
        pairs = self.pair_decisions(X)
        if len(self.classes_) == 2:
            return pairs[:, 0]
        votes, confidence = self.vote(pairs)
        return votes + confidence / (3 * (np.abs(confidence) + 1))

    def vote(self, pairs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """One-vs-one votes and summed confidences per class (multiclass)."""
        n_classes = len(self.classes_)
        votes = np.zeros((len(pairs), n_classes))
        confidence = np.zeros((len(pairs), n_classes))
        pair = 0
        for first in range(n_classes):
            for second in range(first + 1, n_classes):
                wins = pairs[:, pair] > 0
                votes[wins, first] += 1
                votes[~wins, second] += 1
                confidence[:, first] += pairs[:, pair]
                confidence[:, second] -= pairs[:, pair]
                pair += 1
        return votes, confidence

    def predict(self, X: np.ndarray) -> np.ndarray:
        """Predicted classes, as ``SVC.predict``."""
        pairs = self.pair_decisions(X)
        if len(self.classes_) == 2:
            return self.classes_[(pairs[:, 0] >= 0).astype(int)]
        return self.classes_[self.vote(pairs)[0].argmax(axis=1)]


class LinearSVM(ClassifierMixin, BaseEstimator):
    """The svm stage's model: a linear SVM in primal form with calibrated probabilities.

    ``predict`` and ``decision_function`` are the SVC's (see
    :class:`PrimalLinearSVC`); ``predict_proba`` is
    ``CalibratedClassifierCV(SVC(...), method="sigmoid", ensemble=False)``
    fitted on the Gram matrix and moved to primal form.

    Args:
        C: Regularisation.
        cv_folds: Folds of the calibration's out-of-fold decision values.
        seed: Seed of the folds.
        n_jobs: Parallel fold fits.
    """

    def __init__(self, C: float = 1.0, cv_folds: int = 5, seed: int = 42, n_jobs: int | None = None) -> None:
        self.C = C
        self.cv_folds = cv_folds
        self.seed = seed
        self.n_jobs = n_jobs

    def fit(self, X: np.ndarray, y: np.ndarray, gram: np.ndarray | None = None) -> LinearSVM:
        """Fit on ``X`` through its Gram matrix (``gram`` when given, else computed; a linear kernel
        on ``X`` itself beyond :data:`MAX_GRAM_SAMPLES` rows).

        Raises:
            RuntimeError: If the primal form does not reproduce the dual decision values.
        """
        X = np.asarray(X)
        use_gram = gram is not None or len(X) <= MAX_GRAM_SAMPLES
        if use_gram and gram is None:
            gram = compute_gram(X)
        folds = StratifiedKFold(self.cv_folds, shuffle=True, random_state=self.seed)
        calibrated = CalibratedClassifierCV(SVC(kernel="precomputed" if use_gram else "linear", C=self.C),
                                            method="sigmoid", ensemble=False, cv=folds, n_jobs=self.n_jobs)
        calibrated.fit(gram if use_gram else X, y)
        svc = calibrated.calibrated_classifiers_[0].estimator
        primal = PrimalLinearSVC.from_svc(svc, X)
        check_primal(primal, svc, X, gram if use_gram else X)
        calibrated.calibrated_classifiers_[0].estimator = primal
        calibrated.n_features_in_ = primal.n_features_in_
        self.primal_, self.calibrated_ = primal, calibrated
        self.classes_ = primal.classes_
        self.n_features_in_ = primal.n_features_in_
        self.n_support_ = np.asarray(svc.n_support_).copy()
        return self

    @property
    def coef_(self) -> np.ndarray:
        """Primal weights (n_pairs, n_features)."""
        return self.primal_.coef_

    @property
    def intercept_(self) -> np.ndarray:
        """Intercepts (n_pairs,)."""
        return self.primal_.intercept_

    def decision_function(self, X: np.ndarray) -> np.ndarray:
        """The SVC's decision values."""
        return self.primal_.decision_function(X)

    def predict(self, X: np.ndarray) -> np.ndarray:
        """The SVC's predictions (from the decision function, not the probabilities)."""
        return self.primal_.predict(X)

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        """Calibrated class probabilities (n_samples, n_classes), columns in ``classes_`` order."""
        return self.calibrated_.predict_proba(X)


def check_primal(primal: PrimalLinearSVC, svc: SVC, X: np.ndarray, svc_inputs: np.ndarray) -> None:
    """Fail if the primal weights do not give the SVC's decision values on its own training rows."""
    want = svc.decision_function(svc_inputs)
    got = primal.decision_function(X)
    scale = max(1.0, float(np.abs(want).max()))
    error = float(np.abs(got - want).max()) / scale
    if error > PRIMAL_TOLERANCE:
        raise RuntimeError(f"primal weights disagree with the dual SVC by {error:.2e} (relative)")


def fit_final(X: np.ndarray, y: np.ndarray, c: float, params: SvmParams,
              gram: np.ndarray | None = None) -> LinearSVM:
    """Fit the final :class:`LinearSVM` (C = ``c``) on all of ``X``, calibrated on the search's folds."""
    return LinearSVM(C=c, cv_folds=params.cv_folds, seed=params.seed, n_jobs=params.n_jobs).fit(X, y, gram=gram)


def fit_svm(X: np.ndarray, y: np.ndarray, params: SvmParams,
            search: str | None = None) -> tuple[LinearSVM, pd.DataFrame, dict]:
    """Search C, then fit the final linear SVM (with calibrated probabilities) on all of ``X``.

    One Gram matrix serves the search (when precomputed) and the final fit.

    Returns:
        The fitted :class:`LinearSVM`, the CV table and a summary: best_C,
        cv_accuracy, cv_std, fit_seconds (search and final fit), search_seconds,
        final_seconds, search, n_train, n_features.
    """
    search = search or choose_search(*X.shape)
    start = time.perf_counter()
    gram = compute_gram(X) if len(X) <= MAX_GRAM_SAMPLES else None
    best_c, table = search_c(X, y, params, search, gram=gram)
    searched = time.perf_counter()
    model = fit_final(X, y, best_c, params, gram)
    best = table.loc[table["rank"].idxmin()]
    summary = {
        "best_C": best_c,
        "cv_accuracy": round(float(best["mean_test_score"]), 4),
        "cv_std": round(float(best["std_test_score"]), 4),
        "fit_seconds": round(time.perf_counter() - start, 3),
        "search_seconds": round(searched - start, 3),
        "final_seconds": round(time.perf_counter() - searched, 3),
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
