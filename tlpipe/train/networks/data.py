"""What the networks train on: the store's arrays and labels, shuffled epochs, batches for Keras."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np

from tlpipe.core.params import FinetuneParams
from tlpipe.data import store

HISTORY_COLUMNS = ("epoch", "phase", "loss", "accuracy", "val_loss", "val_accuracy", "seconds")


EpochCallback = Callable[[str, int, dict], None]


def seed_training(seed: int) -> None:
    """Seed Python, NumPy and the backend, and make the TensorFlow backend's ops deterministic.

    With TensorFlow's op determinism on, kernels that may sum in a thread-dependent order use a
    fixed one; it stays on for the rest of the process, and training time was unchanged (2 epochs of
    Lite0's top blocks: 2.1 s with it, 2.1-2.3 s without). Seeding alone does not cover an
    initializer without a seed of its own, which draws from Python's global ``random`` that other
    threads share: see :func:`tlpipe.train.networks.layers.seeded_glorot`. tests/e2e/test_faults.py
    compares a killed-and-rerun pipeline with an uninterrupted one file by file.
    """
    keras.utils.set_random_seed(seed)
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        tf.config.experimental.enable_op_determinism()


@dataclass(frozen=True)
class StoreData:
    """What training reads from an image store.

    Attributes:
        train_path: ``train.npy`` (uint8, N x H x W x 3).
        val_path: ``val.npy``.
        train_labels: One-hot float32 labels of the train rows.
        val_labels: One-hot float32 labels of the val rows.
        classes: Class names in label order.
        image_size: Side of the square images.
    """

    train_path: Path
    val_path: Path
    train_labels: np.ndarray
    val_labels: np.ndarray
    classes: list[str]
    image_size: int


class ArrayBatches(keras.utils.PyDataset):
    """Batches ``(x, one-hot y)`` of aligned arrays, read row by row in a fixed order.

    The arrays may be memory-mapped: each batch copies only its own rows, so
    memory stays at one batch. Rows inside a batch are read in ascending order
    (sequential reads); which rows form a batch follows ``order``.

    Args:
        inputs: One array, or several with the same number of rows (a model with
            several inputs gets a tuple).
        labels: One-hot labels, one row per input row.
        batch_size: Rows per batch (the last batch may be smaller).
        order: Row order for this epoch; ascending when None.
    """

    def __init__(self, inputs: Sequence[np.ndarray], labels: np.ndarray, batch_size: int,
                 order: np.ndarray | None = None) -> None:
        super().__init__()
        self.inputs = list(inputs)
        self.labels = labels
        self.batch_size = batch_size
        self.order = np.arange(len(labels)) if order is None else np.asarray(order)

    def __len__(self) -> int:
        """Number of batches."""
        return math.ceil(len(self.order) / self.batch_size)

    def __getitem__(self, index: int) -> tuple[np.ndarray | tuple[np.ndarray, ...], np.ndarray]:
        """Return batch ``index`` as ``(x, y)``."""
        rows = np.sort(self.order[index * self.batch_size:(index + 1) * self.batch_size])
        xs = tuple(np.asarray(array[rows]) for array in self.inputs)
        return (xs[0] if len(xs) == 1 else xs), self.labels[rows]


def load_store_data(store_dir: Path) -> StoreData:
    """Read labels, classes and image size of a store (images stay on disk).

    Raises:
        ValueError: If labels and image rows disagree or images are not square RGB.
    """
    store_dir = Path(store_dir)
    classes = store.load_classes(store_dir)
    paths = {split: store.split_path(store_dir, split) for split in ("train", "val")}
    labels = {}
    for split, path in paths.items():
        shape = store.read_npy_header(path)[0]
        raw = store.split_labels(store_dir, split)
        if len(shape) != 4 or shape[1] != shape[2] or shape[3] != 3 or shape[0] != len(raw) or not len(raw):
            raise ValueError(f"{path}: shape {shape} does not match {len(raw)} labelled square RGB images")
        labels[split] = keras.utils.to_categorical(raw, len(classes)).astype("float32")
    return StoreData(paths["train"], paths["val"], labels["train"], labels["val"], classes, store.image_size(store_dir))


def epoch_order(rows: int, seed: int, epoch: int) -> np.ndarray:
    """Return the seeded shuffled row order of one epoch."""
    return np.random.default_rng([seed, epoch]).permutation(rows)


def image_batches(data: StoreData, params: FinetuneParams) -> tuple[Callable[[int], ArrayBatches], ArrayBatches]:
    """Return (epoch -> shuffled train batches, val batches), both reading the memory-mapped store."""
    train = np.load(data.train_path, mmap_mode="r")
    val = np.load(data.val_path, mmap_mode="r")
    rows = len(data.train_labels)

    def make(epoch: int) -> ArrayBatches:
        return ArrayBatches([train], data.train_labels, params.batch_size, epoch_order(rows, params.seed, epoch))

    return make, ArrayBatches([val], data.val_labels, params.batch_size)
