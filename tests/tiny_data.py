"""Tiny in-memory-built stores and feature folders shared by the SVM and evaluate tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from tlpipe import store

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
