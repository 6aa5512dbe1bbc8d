"""Tiny in-memory-built stores and feature folders shared by the SVM and evaluate tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from tlpipe.data import store

CLASSES = ["ants", "bees"]
SIZE = 8


def write_tiny_store(root: Path, counts: dict[str, int], seed: int = 0) -> Path:
    """A store of SIZE x SIZE random-ish images (class 1 brighter); ``counts`` is per class per split."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for split, per_class in counts.items():
        labels = np.repeat(np.arange(len(CLASSES)), per_class)
        images = rng.integers(0, 200, (len(labels), SIZE, SIZE, 3)) + 40 * labels[:, None, None, None]
        with store.NpyWriter(store.split_path(root, split), len(labels), (SIZE, SIZE, 3)) as writer:
            writer.write(images.astype(np.uint8))
        rows += [{"split": split, "index": i, "relpath": f"{split}/{CLASSES[y]}/{i}.png", "class_name": CLASSES[y],
                  "label": int(y), "sha256": f"{split}{i:062d}", "width": SIZE, "height": SIZE, "mode": "RGB"}
                 for i, y in enumerate(labels)]
    store.write_csv(root / store.MANIFEST, pd.DataFrame(rows))
    store.write_json(root / store.CLASSES, CLASSES)
    return root


def write_separable_features(root: Path, store_dir: Path, seed: int = 0) -> Path:
    """Features aligned with the store: final (6 dims) and mid (3 dims), separable by class."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for split in store.SPLITS:
        signs = 2.0 * store.split_labels(store_dir, split) - 1.0
        for kind, dims in (("final", 6), ("mid", 3)):
            values = 3.0 * signs[:, None] + rng.normal(0, 0.3, (len(signs), dims))
            np.save(root / f"{split}_{kind}.npy", values.astype(np.float32))
    return root


def write_row_network(path: Path, row: int, channel: int = 0, sharpness: float = 2.0) -> Path:
    """A real Keras network that sees one row of one channel of the tiny store's images: a weak, noisy classifier.

    Its logit for class 1 grows with the row's brightness (threshold halfway between the classes' means), so
    networks on different rows make mostly different mistakes (an ensemble of them beats each).
    """
    import keras

    inputs = keras.Input((SIZE, SIZE, 3), dtype="uint8")
    flat = keras.layers.Flatten()(keras.layers.Rescaling(1 / 255)(keras.ops.cast(inputs, "float32")))
    dense = keras.layers.Dense(len(CLASSES), activation="softmax")
    model = keras.Model(inputs, dense(flat))
    mask = np.zeros(SIZE * SIZE * 3)
    mask[[(row * SIZE + column) * 3 + channel for column in range(SIZE)]] = sharpness / 2
    threshold = SIZE * (100 + 20) / 255  # class 0 pixels average ~100, class 1 ~140
    dense.set_weights([np.stack([-mask, mask], axis=1), np.array([1.0, -1.0]) * threshold * sharpness / 2])
    path.parent.mkdir(parents=True, exist_ok=True)
    model.save(path)
    return path


def write_network_summary(folder: Path, name: str, best_val_accuracy: float) -> None:
    """The finetune stage's ``<name>_metrics.json`` (what a network is selected by)."""
    store.write_json(folder / f"{name}_metrics.json", {"best_epoch": 1, "best_val_accuracy": best_val_accuracy})
