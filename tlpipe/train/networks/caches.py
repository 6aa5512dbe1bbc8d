"""Backbone activations computed once for many epochs: pooled features (heads) or the activations entering the
fine-tuned blocks (the finetuned model), one :class:`ActivationCache` for both."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np

from tlpipe.core.params import FinetuneParams
from tlpipe.data import store
from tlpipe.train.networks.data import ArrayBatches, StoreData, epoch_order, seed_training
from tlpipe.train.networks.layers import augment_batch, build_augmentation, head_inputs

CACHE_FOLDER = "_feature_cache"


@dataclass(frozen=True)
class ActivationCache:
    """Backbone activations of ``copies`` augmented copies of the train images and of the plain val images.

    Files in ``folder``, one pair per key: ``train_<key>.npy`` with ``copies * rows``
    rows (copy-major: row ``c * rows + i`` is copy ``c`` of image ``i``) and
    ``val_<key>.npy``. Keys ``("final", "mid")``: the heads' pooled features
    (:func:`compute_feature_cache`); ``("cut", "mid")``: the activations entering the
    ``blocks`` fine-tuned blocks, float16, and the pooled mid-level tap (:func:`compute_tune_cache`).

    Attributes:
        folder: Where the ``.npy`` files are.
        copies: Augmented copies per training image.
        rows: Training images.
        seconds: Time taken to compute the cache.
        keys: The two arrays of each split.
        blocks: Fine-tuned blocks above the cut (None: a features cache).
    """

    folder: Path
    copies: int
    rows: int
    seconds: float
    keys: tuple[str, str] = ("final", "mid")
    blocks: int | None = None

    @property
    def mode(self) -> str:
        """``tune_cache`` (activations below fine-tuned blocks) or ``feature_cache`` (pooled features)."""
        return "feature_cache" if self.blocks is None else "tune_cache"

    def train_arrays(self, copy: int) -> list[np.ndarray]:
        """The two arrays of one augmented copy of every training image, memory-mapped."""
        rows = slice(copy * self.rows, (copy + 1) * self.rows)
        return [np.load(self.folder / f"train_{k}.npy", mmap_mode="r")[rows] for k in self.keys]

    def val_arrays(self) -> list[np.ndarray]:
        """The two arrays of the val images (no augmentation)."""
        return [np.load(self.folder / f"val_{k}.npy") for k in self.keys]


def write_features(writers: dict[str, store.NpyWriter], outputs: dict) -> None:
    """Append one batch of backbone outputs to the ``final``/``mid`` writers."""
    for key, writer in writers.items():
        writer.write(np.asarray(keras.ops.convert_to_numpy(outputs[key]), dtype=np.float32))


def open_writers(folder: Path, split: str, rows: int, backbone: keras.Model) -> dict[str, store.NpyWriter]:
    """Open ``<split>_final.npy`` and ``<split>_mid.npy`` writers of ``rows`` rows."""
    return {k: store.NpyWriter(folder / f"{split}_{k}.npy", rows, (int(backbone.output[k].shape[-1]),), "float32")
            for k in ("final", "mid")}


def compute_feature_cache(backbone: keras.Model, data: StoreData, folder: Path,
                          params: FinetuneParams) -> ActivationCache:
    """Run ``cache_copies`` augmented copies of the train images and the plain val images through the backbone.

    Augmentation runs eagerly with the layers of :func:`build_augmentation`
    (seeded, ``training=True``); the backbone runs with ``predict_on_batch``
    (inference mode). Images are read in order, one batch at a time, and the
    features are streamed to ``.npy`` files in ``folder``.

    Args:
        backbone: The frozen backbone.
        data: The store.
        folder: Empty or new folder for the cache files.
        params: ``cache_copies``, ``batch_size``, ``augment`` and ``seed``.

    Returns:
        The cache.
    """
    start = time.perf_counter()
    folder.mkdir(parents=True, exist_ok=True)
    seed_training(params.seed)
    augmentation = build_augmentation(params.augment, params.seed)
    rows = len(data.train_labels)
    writers = open_writers(folder, "train", rows * params.cache_copies, backbone)
    for _ in range(params.cache_copies):
        for batch in store.iter_npy_batches(data.train_path, params.batch_size):
            pixels = augmentation(batch.astype("float32"), training=True)
            write_features(writers, backbone.predict_on_batch(keras.ops.convert_to_numpy(pixels)))
    val_writers = open_writers(folder, "val", len(data.val_labels), backbone)
    for batch in store.iter_npy_batches(data.val_path, params.batch_size):
        write_features(val_writers, backbone.predict_on_batch(batch.astype("float32")))
    for writer in [*writers.values(), *val_writers.values()]:
        writer.close()
    return ActivationCache(folder, params.cache_copies, rows, time.perf_counter() - start)


def cache_batches(kind: str, cache: ActivationCache, data: StoreData,
                  params: FinetuneParams) -> tuple[Callable[[int], ArrayBatches], ArrayBatches]:
    """Return (epoch -> shuffled batches of copy ``epoch % copies``, val batches) of cached features."""
    def make(epoch: int) -> ArrayBatches:
        inputs = head_inputs(kind, *cache.train_arrays(epoch % cache.copies))
        return ArrayBatches(inputs, data.train_labels, params.batch_size, epoch_order(cache.rows, params.seed, epoch))

    return make, ArrayBatches(head_inputs(kind, *cache.val_arrays()), data.val_labels, params.batch_size)


TUNE_CACHE_FOLDER = "_tune_cache"


def compute_tune_cache(bottom: keras.Model, data: StoreData, folder: Path, params: FinetuneParams,
                       blocks: int) -> ActivationCache:
    """Run ``finetuned_copies`` augmented copies of the train images and the val images through ``bottom``.

    The activations entering the fine-tuned blocks are stored as float16 (half
    the disk, well inside their range), the pooled mid-level tap as float32.
    """
    start = time.perf_counter()
    folder.mkdir(parents=True, exist_ok=True)
    seed_training(params.seed)
    augmentation = build_augmentation(params.finetuned_augmentation(), params.seed)
    rng = np.random.default_rng(params.seed)
    cut_shape = tuple(int(d) for d in bottom.output["cut"].shape[1:])
    mid_dim = int(bottom.output["mid"].shape[-1])
    rows, copies = len(data.train_labels), params.finetuned_copies

    def writers(split: str, count: int) -> dict[str, store.NpyWriter]:
        return {"cut": store.NpyWriter(folder / f"{split}_cut.npy", count, cut_shape, "float16"),
                "mid": store.NpyWriter(folder / f"{split}_mid.npy", count, (mid_dim,), "float32")}

    def write(out: dict[str, store.NpyWriter], pixels: np.ndarray) -> None:
        outputs = bottom.predict_on_batch(pixels)
        out["cut"].write(np.asarray(outputs["cut"], dtype=np.float16))
        out["mid"].write(np.asarray(outputs["mid"], dtype=np.float32))

    train = writers("train", rows * copies)
    for _ in range(copies):
        for batch in store.iter_npy_batches(data.train_path, params.batch_size):
            write(train, augment_batch(augmentation, batch, params.finetuned_vertical_flip, rng))
    val = writers("val", len(data.val_labels))
    for batch in store.iter_npy_batches(data.val_path, params.batch_size):
        write(val, batch.astype("float32"))
    for writer in [*train.values(), *val.values()]:
        writer.close()
    return ActivationCache(folder, copies, rows, time.perf_counter() - start, ("cut", "mid"), blocks)
