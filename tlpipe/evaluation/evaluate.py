"""Core of the ``evaluate`` stage: every trained model on the same held-out TEST split.

Models come from :mod:`tlpipe.core.names` (the one list of names; each model's file
is :func:`tlpipe.core.names.model_file`). Missing models are skipped (and
reported), not an error; no model at all is.

Outputs in ``out_dir`` (a plain folder, each file written atomically):

* ``metrics.json``: every metric per model, per-class precision/recall/F1 and
  the confusion matrix included;
* ``comparison.csv``: one row per model (family, selection score, test metrics);
* ``predictions.csv``: one row per test image, each model's class and probability;
* ``confusion.csv`` (model, actual, predicted; DVC's confusion plot) and
  ``confusion_<model>.png`` (counts in every cell);
* ``comparison.png``; ``grid.png`` (test images as the gate's candidate model
  classifies them: mistakes from every true class, marked in red, then some
  correct ones; :func:`tlpipe.evaluation.outputs.choose_grid_rows`);
* ``curves.csv`` and ``curves.png`` (training curves of the networks, best
  epoch marked), when the finetune folder has histories;
* ``imagenet_top1.md``, when the features folder has ``imagenet_top1.csv``;
* ``ensemble.csv`` (every ensemble try) and, when one is kept, ``ensemble.json``
  (:mod:`tlpipe.evaluation.ensemble`; the kept ``ensemble`` is then in every table above).

The evaluate tasks add ``promotion.json`` and ``report.html`` after the gate.

An SVM's predicted class is ``SVC.predict`` (the decision function); its
probabilities come from Platt scaling (``predict_proba``), which on small data
can disagree with ``predict`` near the boundary. A network's predicted class is
the argmax of its softmax.
"""

from __future__ import annotations

import functools
from pathlib import Path

import joblib
import numpy as np
import pandas as pd

from tlpipe.core.errors import UserError
from tlpipe.core.names import MODEL_NAMES, SVM_MODELS, model_family, model_file
from tlpipe.core.params import DataParams, EvaluateParams
from tlpipe.core.sources import ELPV
from tlpipe.data import store
from tlpipe.evaluation.choice import choose_best, choose_candidate, selection_bounds, selection_scores
from tlpipe.evaluation.metrics import check_predictions, compute_metrics
from tlpipe.evaluation.outputs import remove_stale, write_curves, write_grid, write_imagenet_table, write_outputs
from tlpipe.train.svm import load_inputs


class NoModelsError(UserError, FileNotFoundError):
    """Raised when not one model file exists to evaluate."""


def predict_svm(model_path: Path, X: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """Predict with a saved SVM: labels from ``predict``, probabilities when it has them."""
    model = joblib.load(model_path)
    proba = model.predict_proba(X) if hasattr(model, "predict_proba") else None  # SVC without probability: False
    return model.predict(X), proba


EAGER_MAX_ROWS = 48
"""Splits up to this many images are predicted eagerly. Tracing a network's graph costs a few seconds once
per network and batch shape; eager calls cost more per image (ELPV's 160 test images at 240 px, Lite1:
graph 9.8 s with its trace, eager 14.3 s; on 8 images eager saves the trace): even at about 50 images."""


def file_identity(path: Path) -> tuple[int, int]:
    """``(size, mtime in ns)`` of a file: with its path, what a cached load is keyed by."""
    stat = path.stat()
    return stat.st_size, stat.st_mtime_ns


@functools.lru_cache(maxsize=4)
def load_network(path: str, size: int, mtime_ns: int):
    """A saved ``.keras`` network, loaded once per file version: evaluate predicts the test split and the
    ensemble the val split with each network, and each load (about 2 s) and first prediction (a graph trace,
    about 1.5 s) would otherwise happen twice. ``size`` and ``mtime_ns`` make a rewritten file load anew."""
    import keras

    import tlpipe.features.backbones  # noqa: F401  registers the custom layers

    return keras.saving.load_model(path, compile=False)


def predict_keras(model_path: Path, store_dir: Path, split: str = "test",
                  batch_size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Predict with a saved ``.keras`` model, streaming the split's uint8 images in batches.

    The model must output class probabilities (n, n_classes); a single sigmoid
    unit is read as P(class 1).
    """
    model = load_network(str(model_path), *file_identity(Path(model_path)))
    path = store.split_path(Path(store_dir), split)
    if store.read_npy_header(path)[0][0] <= EAGER_MAX_ROWS:  # a few images: no graph to trace
        predict = lambda batch: model(batch, training=False)  # noqa: E731
    else:
        predict = model.predict_on_batch
    batches = [np.asarray(predict(batch), dtype=np.float64) for batch in store.iter_npy_batches(path, batch_size)]
    proba = np.concatenate(batches)
    if proba.shape[1] == 1:
        proba = np.concatenate([1 - proba, proba], axis=1)
    return proba.argmax(axis=1), proba


def find_models(svm_dir: Path | None, finetune_dir: Path | None) -> tuple[dict[str, Path], dict[str, str]]:
    """Which model files exist, in :data:`MODEL_NAMES` order, and which are missing."""
    found, skipped = {}, {}
    for name in MODEL_NAMES:
        folder = svm_dir if model_family(name) == "svm" else finetune_dir
        if folder is None:
            skipped[name] = f"no {model_family(name)} model folder given"
            continue
        path = model_file(Path(svm_dir or "."), Path(finetune_dir or "."), name)
        if path.is_file():
            found[name] = path
        else:
            skipped[name] = f"no model file {path}"
    return found, skipped


def predict_model(name: str, path: Path, store_dir: Path, features_dir: Path,
                  pixel_size: int, split: str = "test") -> tuple[np.ndarray, np.ndarray | None]:
    """Predict one split (default: test) with one trained model, whatever its family."""
    if model_family(name) == "network":
        return predict_keras(path, store_dir, split)
    X = load_inputs(store_dir, features_dir, split, SVM_MODELS[name], pixel_size)
    return predict_svm(path, X)


def load_test_rows(store_dir: Path) -> pd.DataFrame:
    """The manifest rows of the test split, in row order."""
    manifest = store.load_manifest(store_dir)
    return manifest[manifest["split"] == "test"].sort_values("index").reset_index(drop=True)


def count_images(manifest: pd.DataFrame, classes: list[str]) -> list[dict]:
    """Images per class and split: one row per class in label order, then an 'all classes' row.

    Each row: ``class``, one count per split of :data:`tlpipe.data.store.SPLITS`, ``total``.
    """
    rows = []
    for name in [*classes, None]:
        part = manifest if name is None else manifest[manifest["class_name"] == name]
        splits = {split: int((part["split"] == split).sum()) for split in store.SPLITS}
        rows.append({"class": "all classes" if name is None else name, **splits, "total": int(len(part))})
    return rows


def package_version(name: str) -> str:
    """An installed distribution's version, or 'not installed'."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


def name_source(data: DataParams) -> tuple[str, str]:
    """The data set's name and source as the report shows them, from the ``data`` params.

    ELPV: ``elpv (defect labels, defect probability >= 0.5)`` or ``elpv (module-type labels)``, from
    the elpv-dataset package and its version; a folder: the folder's name, from its path as given.
    """
    if data.source == ELPV:
        labels = (f"defect labels, defect probability >= {data.elpv_threshold:g}" if data.elpv_label == "defect"
                  else "module-type labels")
        return f"elpv ({labels})", f"Python package elpv-dataset {package_version('elpv-dataset')}"
    folder = Path(data.source).expanduser()
    return folder.name or str(folder), f"image folder {folder}"


def describe_dataset(store_dir: Path, data: DataParams) -> dict:
    """What the report's data-set section shows: name, source, task (when named) and images per class and split."""
    name, source = name_source(data)
    counts = count_images(store.load_manifest(store_dir), store.load_classes(store_dir))
    return {"name": name, "source": source, "task": None, "counts": counts}


def evaluate_models(store_dir: Path, features_dir: Path, svm_dir: Path | None, finetune_dir: Path | None,
                    out_dir: Path, params: EvaluateParams, pixel_size: int) -> dict:
    """Evaluate every existing model on the test split and write the reports.

    Args:
        store_dir: The image store.
        features_dir: The features folder (SVM inputs, ``imagenet_top1.csv``).
        svm_dir: Folder of ``<name>.joblib`` SVMs and ``summary.json`` (None: no SVMs).
        finetune_dir: Folder of ``<name>.keras`` networks with their histories (None: no networks).
        out_dir: Where the reports go (created if needed).
        params: The evaluate params (``grid_images``).
        pixel_size: Side of the raw-pixel inputs of ``svm_pixels``.

    Returns:
        ``{"metrics": {model: metrics}, "skipped": {model: reason},
        "best": {"model", "accuracy", "balanced_accuracy"}`` (best on test),
        ``"selection": {model: score}``, ``"candidate"`` (the model the gate
        considers, chosen by selection score), ``"classes"``, ``"test_images"``,
        ``"grid": {"model", "caption"}`` (what ``grid.png`` shows, :func:`tlpipe.evaluation.outputs.describe_grid`),
        ``"ensemble"`` (every ensemble try and the keep decision, :func:`tlpipe.evaluation.ensemble.add_ensemble`;
        when kept, ``ensemble`` is in ``metrics`` and ``selection`` like any model)}.

    Raises:
        NoModelsError: When no model file exists.
    """
    store_dir, out_dir = Path(store_dir), Path(out_dir)
    found, skipped = find_models(svm_dir, finetune_dir)
    if not found:
        raise NoModelsError(f"no model to evaluate: looked for {list(MODEL_NAMES)} as "
                            f"{svm_dir}/<name>.joblib and {finetune_dir}/<name>.keras")
    classes = store.load_classes(store_dir)
    y_true = store.split_labels(store_dir, "test")
    predictions = {name: predict_model(name, path, store_dir, features_dir, pixel_size)
                   for name, path in found.items()}
    for name, (y_pred, proba) in predictions.items():
        check_predictions(name, y_pred, proba, len(y_true), len(classes))
    metrics = {name: compute_metrics(y_true, y_pred, proba, classes) for name, (y_pred, proba) in predictions.items()}
    scores = selection_scores(svm_dir, finetune_dir, list(metrics))
    counts = store.load_manifest(store_dir)["split"].value_counts()
    sizes = {split: int(counts.get(split, 0)) for split in ("train", "val")}
    from tlpipe.evaluation import ensemble  # built on this module's predictions and bounds (it imports them)

    tried = ensemble.add_ensemble(found, store_dir, features_dir, pixel_size, predictions, metrics, scores, sizes,
                                  y_true, classes)
    best, candidate = choose_best(metrics), choose_candidate(scores, metrics, sizes)
    out_dir.mkdir(parents=True, exist_ok=True)
    remove_stale(out_dir, list(metrics))
    write_outputs(out_dir, metrics, predictions, load_test_rows(store_dir), classes, scores)
    ensemble.write_outputs(out_dir, tried, classes)
    grid = write_grid(store_dir, out_dir, candidate, y_true, predictions[candidate][0], classes, params.grid_images)
    write_curves(finetune_dir, out_dir)
    write_imagenet_table(features_dir, out_dir)
    return {"metrics": metrics, "skipped": skipped,
            "best": {"model": best, "accuracy": metrics[best]["accuracy"],
                     "balanced_accuracy": metrics[best]["balanced_accuracy"]},
            "selection": scores, "selection_bounds": selection_bounds(scores, sizes), "selection_sizes": sizes,
            "candidate": candidate, "classes": list(classes), "test_images": int(len(y_true)),
            "grid": {"model": candidate, "caption": grid}, "ensemble": tried}


