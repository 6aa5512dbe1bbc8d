"""Core of the ``finetune`` stages: the course's two transfer-learning models, and the field's next step.

The course's two models put a small dense head on a frozen pretrained backbone::

    frozen: uint8 image -> float32 -> augmentation -> backbone -> final -> Dense(relu) -> Dense(softmax)
    concat: uint8 image -> float32 -> augmentation -> backbone -> [final, mid] -> Dense(relu) -> Dense(softmax)

``finetuned`` (:func:`train_finetuned`) is kept apart from them, so the
course's lesson stays visible: a head trained first, then the backbone's top
blocks fine-tuned at a low learning rate with BatchNorm in inference mode,
on activations cached below those blocks, and predictions averaged over
mirrored copies of the image (test-time augmentation inside the saved model).

The backbone is frozen (``trainable = False``) and called with ``training=False``.
Note that Keras 3 lets an outer ``training=True`` override that argument of a
nested model, so what keeps BatchNorm in inference mode during ``fit`` is that
a BatchNormalization layer whose ``trainable`` is False always uses its moving
statistics; phase 2 keeps every BatchNormalization layer frozen for that reason.

Two training modes (``FinetuneParams.feature_cache``):

* end to end: every epoch streams the memory-mapped ``train.npy`` through
  augmentation and the frozen backbone (a :class:`tlpipe.train.networks.data.ArrayBatches` per epoch, in a
  seeded shuffled order).
* feature cache: ``cache_copies`` augmented copies of every training image go
  through the backbone once (:func:`compute_feature_cache`); only the head is
  trained, epoch ``e`` seeing copy ``e % cache_copies``. The trained head is
  then copied into the full image model, which takes images exactly like the
  end-to-end one.

Either way the weights of the epoch with the best validation accuracy (earliest
on ties) are kept, and an optional phase 2 unfreezes the top backbone layers.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Sequence
from pathlib import Path

import keras
import pandas as pd

from tlpipe.core.params import FinetuneParams
from tlpipe.data import store
from tlpipe.features.backbones import check_weights
from tlpipe.ops.pause import pause_point
from tlpipe.train.networks.caches import CACHE_FOLDER, TUNE_CACHE_FOLDER, ActivationCache, compute_feature_cache
from tlpipe.train.networks.data import EpochCallback, StoreData, load_store_data
from tlpipe.train.networks.fitting import replay_best, train_finetuned, train_model
from tlpipe.train.networks.layers import TUNED_KIND, check_kinds, load_frozen_backbone


def summarize(kind: str, history: pd.DataFrame, cache: ActivationCache | None, backbone_name: str,
              weights: str | None, data: StoreData, seconds: float) -> dict:
    """Build the metrics dict of one model."""
    best = replay_best(kind, history)  # the epoch whose weights were kept, by the kind's own monitor
    phase1, phase2 = history[history["phase"] == 1], history[history["phase"] == 2]
    return {
        "kind": kind,
        "mode": cache.mode if cache else "end_to_end",
        "backbone": backbone_name, "weights": "none" if weights is None else str(weights),
        "epochs": int(len(history)), "best_epoch": best.epoch, "best_phase": best.phase,
        "best_val_accuracy": best.val_accuracy, "best_val_loss": best.val_loss,
        "train_seconds": round(seconds, 3), "seconds_per_epoch": round(float(phase1["seconds"].mean()), 3),
        "phase2_seconds_per_epoch": round(float(phase2["seconds"].mean()), 3) if len(phase2) else None,
        "cache_seconds": round(cache.seconds, 3) if cache else 0.0, "cache_copies": cache.copies if cache else 0,
        "train_images": int(len(data.train_labels)), "val_images": int(len(data.val_labels)),
        "classes": list(data.classes),
        **({"tuned_blocks": cache.blocks} if cache is not None and cache.blocks is not None else {}),
    }


def plot_curves(history: pd.DataFrame, path: Path, title: str, kind: str, best_epoch: int | None = None) -> None:
    """Save the train-vs-val accuracy and loss figure of one network, best epoch marked.

    Drawn by :func:`tlpipe.render.plots.plot_training_curves` (the evaluate report's figure, for one model).
    """
    from tlpipe.render.plots import plot_training_curves

    plot_training_curves({kind: history}, {} if best_epoch is None else {kind: best_epoch}, path, title)


def write_outputs(folder: Path, kind: str, model: keras.Model, history: pd.DataFrame, metrics: dict) -> None:
    """Write ``<kind>.keras``, ``_history.csv``, ``_curves.png`` and ``_metrics.json`` into ``folder``."""
    model.save(folder / f"{kind}.keras")
    store.write_csv(folder / f"{kind}_history.csv", history)
    plot_curves(history, folder / f"{kind}_curves.png", f"{kind} ({metrics['mode']}): solid = train, dashed = "
                "validation, ★ = kept (best) epoch", kind, metrics.get("best_epoch"))
    store.write_json(folder / f"{kind}_metrics.json", metrics)


def train_models(store_dir: Path, out_dir: Path, kinds: Sequence[str], backbone_name: str, weights: str | None,
                 params: FinetuneParams, on_epoch: EpochCallback | None = None) -> dict[str, dict]:
    """Train the requested models on a store and publish them atomically at ``out_dir``.

    One frozen backbone serves every kind (each gets its own when phase 2
    unfreezes layers), and with ``params.feature_cache`` one cache does. Per kind,
    ``out_dir`` gets ``<kind>.keras`` (uint8 image in, probabilities out; load
    after ``import tlpipe.features.backbones``), ``<kind>_history.csv``,
    ``<kind>_curves.png`` and ``<kind>_metrics.json``.

    Args:
        store_dir: Image store (``train``/``val`` splits are used).
        out_dir: Output folder, replaced as a whole on success.
        kinds: Values of :data:`tlpipe.core.names.NETWORK_MODELS`.
        backbone_name: Backbone name.
        weights: ``"imagenet"``, a weights file path, or None/``"none"`` (random).
        params: Training params.
        on_epoch: Called as ``on_epoch(kind, epoch, logs)`` after every epoch
            (``epoch`` 1-based; ``logs``: phase, loss, accuracy, val_loss,
            val_accuracy, seconds); when None each epoch is printed instead.

    Returns:
        ``{kind: metrics}`` as written to ``<kind>_metrics.json``.
    """
    kinds = check_kinds(kinds)
    check_weights(backbone_name, weights)
    data = load_store_data(Path(store_dir))
    staging = store.staging_dir(Path(out_dir))
    course = [kind for kind in kinds if kind != TUNED_KIND]
    try:
        pause_point("finetune.training")  # a fault test kills the stage here (tests/e2e/test_faults.py)
        cache = None
        shared = load_frozen_backbone(backbone_name, weights, data.image_size, params.seed) if course else None
        if params.feature_cache and course:
            cache = compute_feature_cache(shared, data, staging / CACHE_FOLDER, params)
            if on_epoch is None:
                print(f"feature cache: {cache.rows} images x {cache.copies} copies in {cache.seconds:.1f}s", flush=True)
        results = {}
        for kind in kinds:
            start = time.perf_counter()
            if kind == TUNED_KIND:
                model, history, tune_cache = train_finetuned(data, backbone_name, weights, params,
                                                             staging / TUNE_CACHE_FOLDER, on_epoch)
                results[kind] = summarize(kind, history, tune_cache, backbone_name, weights, data,
                                          time.perf_counter() - start)
                write_outputs(staging, kind, model, history, results[kind])
                shutil.rmtree(staging / TUNE_CACHE_FOLDER, ignore_errors=True)
                continue
            backbone = shared
            if params.unfreeze_layers and kind != course[0]:
                backbone = load_frozen_backbone(backbone_name, weights, data.image_size, params.seed)
            model, history = train_model(kind, data, backbone, params, cache, on_epoch)
            results[kind] = summarize(kind, history, cache, backbone_name, weights, data, time.perf_counter() - start)
            write_outputs(staging, kind, model, history, results[kind])
        shutil.rmtree(staging / CACHE_FOLDER, ignore_errors=True)
        store.publish_dir(staging, Path(out_dir))
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return results
