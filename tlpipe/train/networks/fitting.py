"""Fitting a network: epochs with the best one kept (:class:`BestEpoch`), a head on cached features, an image
model end to end with an optional unfrozen phase 2, and the finetuned model on its tune cache."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import keras
import numpy as np
import pandas as pd

from tlpipe.core.params import FinetuneParams
from tlpipe.features.backbones import build_backbone
from tlpipe.train.networks.caches import ActivationCache, cache_batches, compute_tune_cache
from tlpipe.train.networks.data import (
    HISTORY_COLUMNS,
    ArrayBatches,
    EpochCallback,
    StoreData,
    epoch_order,
    image_batches,
    seed_training,
)
from tlpipe.train.networks.layers import (
    TUNED_KIND,
    build_head,
    build_image_model,
    build_tuned_head,
    build_tuned_image_model,
    compile_model,
    unfreeze_top_layers,
)


@dataclass
class BestEpoch:
    """The best epoch so far and its weights: by val accuracy (ties: lower val loss, then earliest), as the
    course's checkpoint does, or with ``monitor="val_loss"`` by val loss (ties: higher accuracy, then earliest).

    The val split is small (a few dozen images), so val accuracy saturates within
    a few epochs; breaking ties on val loss keeps the better-trained head instead
    of the first epoch that reached the plateau. The finetuned model monitors val
    loss: on hymenoptera's 24 val images one undertrained head epoch reached val
    accuracy 1.0 by chance (test 0.86), while its lowest-loss epoch generalises.
    """

    epoch: int = 0
    phase: int = 0
    val_accuracy: float = -math.inf
    val_loss: float = math.inf
    weights: list[np.ndarray] = field(default_factory=list)
    monitor: str = "val_accuracy"

    def beats(self, row: dict) -> bool:
        """Whether ``row`` beats the best so far (the monitored value, then the other)."""
        if self.monitor == "val_loss":
            better = row["val_loss"] < self.val_loss
            tie = row["val_loss"] == self.val_loss and row["val_accuracy"] > self.val_accuracy
        else:
            better = row["val_accuracy"] > self.val_accuracy
            tie = row["val_accuracy"] == self.val_accuracy and row["val_loss"] < self.val_loss
        return better or tie

    def record(self, row: dict) -> None:
        """Make ``row``'s epoch the best (weights untouched)."""
        self.epoch, self.phase = int(row["epoch"]), int(row["phase"])
        self.val_accuracy, self.val_loss = float(row["val_accuracy"]), float(row["val_loss"])

    def update(self, model: keras.Model, row: dict) -> None:
        """Keep ``model``'s weights if ``row`` beats the best."""
        if self.beats(row):
            self.record(row)
            self.weights = model.get_weights()


def monitor_of(kind: str) -> str:
    """The value :class:`BestEpoch` monitors for ``kind``: val loss for the finetuned model, else val accuracy."""
    return "val_loss" if kind == TUNED_KIND else "val_accuracy"


def replay_best(kind: str, history: pd.DataFrame) -> BestEpoch:
    """The epoch (no weights) that training kept for ``kind``, replayed from its history in epoch order."""
    best = BestEpoch(monitor=monitor_of(kind))
    for row in history.to_dict("records"):
        if best.beats(row):
            best.record(row)
    return best


def report_epoch(kind: str, row: dict, total: int, on_epoch: EpochCallback | None) -> None:
    """Hand one epoch's row to ``on_epoch``, or print it on one line when there is no callback."""
    logs = {k: v for k, v in row.items() if k != "epoch"}
    if on_epoch is not None:
        on_epoch(kind, row["epoch"], logs)
        return
    print(f"[{kind}] epoch {row['epoch']}/{total} (phase {row['phase']}) {row['seconds']:.1f}s - "
          f"loss {row['loss']:.4f} - accuracy {row['accuracy']:.4f} - "
          f"val_loss {row['val_loss']:.4f} - val_accuracy {row['val_accuracy']:.4f}", flush=True)


def fit_epochs(model: keras.Model, make_batches: Callable[[int], ArrayBatches], val_batches: ArrayBatches,
               epochs: range, phase: int, kind: str, total: int, best: BestEpoch,
               on_epoch: EpochCallback | None) -> list[dict]:
    """Train one epoch per ``fit`` call, each with its own freshly ordered batches.

    One ``fit`` per epoch means no batch of epoch ``e + 1`` can be prefetched
    in the order of epoch ``e``, so runs are reproducible on every backend.

    Args:
        model: A compiled model.
        make_batches: Epoch index (0-based) -> that epoch's training batches.
        val_batches: Validation batches.
        epochs: 0-based epoch indices to run.
        phase: 1 (head) or 2 (unfrozen top layers).
        kind: Model kind, for reporting.
        total: Epochs in all phases, for reporting.
        best: Updated after every epoch.
        on_epoch: ``on_epoch(kind, epoch (1-based), logs)``, or None to print.

    Returns:
        One history row per epoch (:data:`HISTORY_COLUMNS`).
    """
    rows = []
    for epoch in epochs:
        start = time.perf_counter()
        result = model.fit(make_batches(epoch), validation_data=val_batches, epochs=1, shuffle=False, verbose=0)
        logs = {k: float(v[-1]) for k, v in result.history.items()}
        row = {"epoch": epoch + 1, "phase": phase, "loss": logs["loss"], "accuracy": logs["accuracy"],
               "val_loss": logs["val_loss"], "val_accuracy": logs["val_accuracy"],
               "seconds": time.perf_counter() - start}
        best.update(model, row)
        report_epoch(kind, row, total, on_epoch)
        rows.append(row)
    return rows


def train_head_on_cache(kind: str, cache: ActivationCache, data: StoreData, params: FinetuneParams, best: BestEpoch,
                        on_epoch: EpochCallback | None = None) -> tuple[keras.Model, list[dict]]:
    """Train a head on cached features for ``params.epochs`` epochs; return it with the best weights restored."""
    final, mid = cache.val_arrays()
    head = build_head(kind, final.shape[1], mid.shape[1], len(data.classes), params)
    compile_model(head, params, params.learning_rate)
    make, val = cache_batches(kind, cache, data, params)
    total = params.epochs + (params.unfreeze_epochs if params.unfreeze_layers else 0)
    rows = fit_epochs(head, make, val, range(params.epochs), 1, kind, total, best, on_epoch)
    head.set_weights(best.weights)
    return head, rows


def train_model(kind: str, data: StoreData, backbone: keras.Model, params: FinetuneParams,
                cache: ActivationCache | None,
                on_epoch: EpochCallback | None = None) -> tuple[keras.Model, pd.DataFrame]:
    """Train one model (phase 1 in the mode ``cache`` implies, then optional phase 2).

    Args:
        kind: A value of :data:`tlpipe.core.names.NETWORK_MODELS`.
        data: The store.
        backbone: A frozen backbone; phase 2 changes its top layers, so give
            each model its own when ``params.unfreeze_layers`` is set.
        params: Training params.
        cache: Train the head on these features; end to end when None.
        on_epoch: See :func:`tlpipe.train.networks.training.train_models`.

    Returns:
        The full image model holding the best epoch's weights, and its history.
    """
    seed_training(params.seed)
    best = BestEpoch(monitor=monitor_of(kind))
    n_classes, phase2 = len(data.classes), params.unfreeze_epochs if params.unfreeze_layers else 0
    if cache is not None:
        head, rows = train_head_on_cache(kind, cache, data, params, best, on_epoch)
        model = build_image_model(kind, backbone, data.image_size, n_classes, params, head=head)
        best.weights = model.get_weights()
    else:
        model = build_image_model(kind, backbone, data.image_size, n_classes, params)
        compile_model(model, params, params.learning_rate)
        make, val = image_batches(data, params)
        rows = fit_epochs(model, make, val, range(params.epochs), 1, kind, params.epochs + phase2, best, on_epoch)
    if phase2:
        unfreeze_top_layers(backbone, params.unfreeze_layers)
        compile_model(model, params, params.unfreeze_learning_rate)
        make, val = image_batches(data, params)
        epochs = range(params.epochs, params.epochs + phase2)
        rows += fit_epochs(model, make, val, epochs, 2, kind, params.epochs + phase2, best, on_epoch)
    model.set_weights(best.weights)
    backbone.trainable = False
    compile_model(model, params, params.learning_rate)
    model.optimizer.build(model.trainable_variables)  # saved with matching (fresh) optimizer state
    history = pd.DataFrame(rows, columns=list(HISTORY_COLUMNS))
    return model, history


def train_finetuned(data: StoreData, backbone_name: str, weights: str | None, params: FinetuneParams,
                    cache_folder: Path, on_epoch: EpochCallback | None = None
                    ) -> tuple[keras.Model, pd.DataFrame, ActivationCache]:
    """Train the ``finetuned`` model: head first, then the top backbone blocks, on cached activations.

    1. The backbone is split below its last ``finetuned_blocks`` blocks, at
       most those above the mid-level tap (:func:`tlpipe.features.backbones.split_top_blocks`;
       the number used is ``tuned_blocks`` in the metrics);
       ``finetuned_copies`` augmented copies of the train images
       (:meth:`~tlpipe.core.params.FinetuneParams.finetuned_augmentation`) go through the frozen bottom once
       (:func:`compute_tune_cache`).
    2. Phase 1 (``finetuned_head_epochs``): only the head learns (the
       ``optimizer`` of every network, ``finetuned_head_learning_rate``), on the top's outputs.
    3. Phase 2 (``finetuned_epochs``): the top blocks learn too, at
       ``finetuned_learning_rate``; every BatchNormalization layer stays frozen,
       so it keeps using its ImageNet moving statistics (inference mode).
    4. The epoch with the lowest val loss (then higher val accuracy) is kept, and the
       saved model averages its probabilities over the ``finetuned_tta`` flips.

    Epoch ``e`` trains on augmented copy ``e % copies``, as the feature cache does.

    Returns:
        The image model, its history (:data:`HISTORY_COLUMNS`) and the cache.
    """
    from tlpipe.features.backbones import split_top_blocks, tunable_blocks

    seed_training(params.seed)
    backbone = build_backbone(backbone_name, weights, data.image_size)
    backbone.trainable = False
    blocks = min(params.finetuned_blocks, tunable_blocks(backbone))
    bottom, top = split_top_blocks(backbone, blocks)
    cache = compute_tune_cache(bottom, data, cache_folder, params, blocks)
    if on_epoch is None:
        print(f"tune cache: {cache.rows} images x {cache.copies} copies in {cache.seconds:.1f}s", flush=True)
    cut = keras.Input(tuple(int(d) for d in top.input.shape[1:]), name="cut")
    mid = keras.Input((int(bottom.output["mid"].shape[-1]),), name="mid")
    head = build_tuned_head(int(top.output.shape[-1]), int(mid.shape[-1]), len(data.classes), params)
    trainer = keras.Model([cut, mid], head([top(cut, training=False), mid]), name=f"{TUNED_KIND}_trainer")
    rows = len(data.train_labels)

    def make(epoch: int) -> ArrayBatches:
        return ArrayBatches(cache.train_arrays(epoch % cache.copies), data.train_labels, params.batch_size,
                            epoch_order(rows, params.seed, epoch))

    val = ArrayBatches(cache.val_arrays(), data.val_labels, params.batch_size)
    best, total = BestEpoch(monitor=monitor_of(TUNED_KIND)), params.finetuned_head_epochs + params.finetuned_epochs
    top.trainable = False
    compile_model(trainer, params, params.finetuned_head_learning_rate)
    history = fit_epochs(trainer, make, val, range(params.finetuned_head_epochs), 1, TUNED_KIND, total, best,
                         on_epoch)
    if params.finetuned_epochs:
        trainer.set_weights(best.weights)  # phase 2 starts from the best head
        top.trainable = True
        for layer in top.layers:
            if isinstance(layer, keras.layers.BatchNormalization):
                layer.trainable = False
        compile_model(trainer, params, params.finetuned_learning_rate)
        history += fit_epochs(trainer, make, val, range(params.finetuned_head_epochs, total), 2, TUNED_KIND,
                              total, best, on_epoch)
    trainer.set_weights(best.weights)
    model = build_tuned_image_model(backbone, head, data.image_size, params.finetuned_tta_flips())
    compile_model(model, params, params.finetuned_learning_rate)
    model.optimizer.build(model.trainable_variables)  # saved with matching (fresh) optimizer state
    return model, pd.DataFrame(history, columns=list(HISTORY_COLUMNS)), cache
