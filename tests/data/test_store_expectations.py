"""Data-tier expectations on an image store (manifest schema, labels, leakage, pixel sanity).

The checks run against a store built here from a tiny synthetic source folder.
Set ``TLPIPE_STORE=<store folder>`` to also run them against a real store
(for example ``data/store`` after ``make run``).
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from tlpipe.core.params import DataParams
from tlpipe.core.sources import list_folder
from tlpipe.data import store
from tlpipe.data.ingest import ingest

SIZE = 24
MANIFEST_COLUMNS = ["split", "index", "relpath", "class_name", "label", "sha256", "width", "height", "mode"]
STRING_COLUMNS = ["split", "relpath", "class_name", "sha256", "mode"]
INT_COLUMNS = ["index", "label", "width", "height"]
SHA256 = re.compile(r"^[0-9a-f]{64}$")


# ---------------------------------------------------------------- fixture store


def write_random(path: Path, rng: np.random.Generator) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    width, height = (int(v) for v in rng.integers(36, 56, 2))
    image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB")
    buffer = io.BytesIO()
    image.save(buffer, "JPEG" if path.suffix == ".jpg" else "PNG")
    path.write_bytes(buffer.getvalue())


def make_source(root: Path) -> Path:
    """Three classes of distinct images, with cross-class and same-class duplicates and a bad file."""
    rng = np.random.default_rng(2024)
    for class_name, count in {"cat": 10, "dog": 12, "eel": 11}.items():
        for i in range(count):
            write_random(root / class_name / f"{i:03d}.{'jpg' if i % 3 else 'png'}", rng)
    shutil.copyfile(root / "cat" / "000.png", root / "dog" / "copy_of_cat.png")
    shutil.copyfile(root / "eel" / "001.jpg", root / "eel" / "copy.jpg")
    (root / "dog" / "broken.jpg").write_text("not an image")
    return root


def store_params() -> list[str]:
    return ["fixture"] + (["env"] if os.environ.get("TLPIPE_STORE") else [])


@pytest.fixture(scope="module", params=store_params())
def store_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    if request.param == "env":
        return Path(os.environ["TLPIPE_STORE"])
    root = tmp_path_factory.mktemp("store_expectations")
    src = make_source(root / "src")
    params = DataParams(source=str(src), image_size=SIZE, max_per_class=None, workers=1)
    ingest(list_folder(src), params, root / "store")
    return root / "store"


@pytest.fixture(scope="module")
def manifest(store_dir: Path) -> pd.DataFrame:
    return store.load_manifest(store_dir)


@pytest.fixture(scope="module")
def classes(store_dir: Path) -> list[str]:
    return store.load_classes(store_dir)


# ---------------------------------------------------------------- schema


def test_store_layout(store_dir: Path) -> None:
    names = {p.name for p in store_dir.iterdir()}
    assert {store.MANIFEST, store.CLASSES} | {f"{s}.npy" for s in store.SPLITS} <= names
    assert not [n for n in names if n.startswith(".")]


def test_manifest_columns(manifest: pd.DataFrame) -> None:
    assert list(manifest.columns) == MANIFEST_COLUMNS


def test_manifest_dtypes(manifest: pd.DataFrame) -> None:
    for column in INT_COLUMNS:
        assert pd.api.types.is_integer_dtype(manifest[column]), column
    for column in STRING_COLUMNS:
        assert pd.api.types.is_string_dtype(manifest[column]) or manifest[column].dtype == object, column
        assert manifest[column].map(type).eq(str).all(), column


def test_manifest_has_no_missing_values(manifest: pd.DataFrame) -> None:
    assert not manifest.isna().any().any()
    assert (manifest[STRING_COLUMNS] != "").all().all()


def test_manifest_values(manifest: pd.DataFrame) -> None:
    assert set(manifest["split"]) == set(store.SPLITS)
    assert manifest["sha256"].map(lambda s: bool(SHA256.match(s))).all()
    assert (manifest["width"] > 0).all() and (manifest["height"] > 0).all()
    assert manifest["relpath"].is_unique
    assert not manifest["relpath"].str.startswith("/").any()


def test_manifest_ordered_by_split_then_index(manifest: pd.DataFrame) -> None:
    order = manifest["split"].map({s: i for i, s in enumerate(store.SPLITS)})
    assert order.is_monotonic_increasing
    for split in store.SPLITS:
        indices = manifest.loc[manifest["split"] == split, "index"].to_numpy()
        np.testing.assert_array_equal(indices, np.arange(len(indices)))


# ---------------------------------------------------------------- labels


def test_classes_json(store_dir: Path, classes: list[str]) -> None:
    raw = json.loads((store_dir / store.CLASSES).read_text())
    assert raw == classes
    assert len(classes) >= 2
    assert all(isinstance(c, str) and c for c in classes)
    assert len(set(classes)) == len(classes)
    assert classes == sorted(classes)


def test_labels_in_range_and_consistent(manifest: pd.DataFrame, classes: list[str]) -> None:
    assert manifest["label"].between(0, len(classes) - 1).all()
    expected = manifest["class_name"].map({c: i for i, c in enumerate(classes)})
    assert not expected.isna().any(), "class_name not in classes.json"
    assert (manifest["label"] == expected).all()
    assert set(manifest["class_name"]) == set(classes)  # no class without images


def test_every_class_in_every_split(manifest: pd.DataFrame, classes: list[str]) -> None:
    for split in store.SPLITS:
        assert set(manifest.loc[manifest["split"] == split, "class_name"]) == set(classes), split


def test_split_labels_align(store_dir: Path, manifest: pd.DataFrame) -> None:
    for split in store.SPLITS:
        labels = store.split_labels(store_dir, split)
        expected = manifest.loc[manifest["split"] == split].sort_values("index")["label"].to_numpy()
        np.testing.assert_array_equal(labels, expected)
        assert labels.dtype == np.int64


# ---------------------------------------------------------------- leakage


def test_no_sha256_in_two_splits(manifest: pd.DataFrame) -> None:
    splits_per_hash = manifest.groupby("sha256")["split"].nunique()
    leaked = splits_per_hash[splits_per_hash > 1]
    assert leaked.empty, f"files in more than one split: {list(leaked.index)}"


def test_no_duplicate_sha256(manifest: pd.DataFrame) -> None:
    assert manifest["sha256"].is_unique


def test_no_identical_pixels_across_splits(store_dir: Path) -> None:
    digests: dict[bytes, str] = {}
    for split in store.SPLITS:
        for row in np.load(store.split_path(store_dir, split), mmap_mode="r"):
            key = row.tobytes()
            assert digests.setdefault(key, split) == split, "identical image in two splits"


# ---------------------------------------------------------------- pixel arrays


def test_arrays_match_manifest(store_dir: Path, manifest: pd.DataFrame) -> None:
    sides = set()
    for split in store.SPLITS:
        shape, dtype, _ = store.read_npy_header(store.split_path(store_dir, split))
        assert dtype == np.uint8
        assert len(shape) == 4 and shape[1] == shape[2] and shape[3] == 3
        assert shape[0] == (manifest["split"] == split).sum()
        sides.add(shape[1])
    assert len(sides) == 1


def test_pixels_not_constant(store_dir: Path) -> None:
    for split in store.SPLITS:
        array = np.load(store.split_path(store_dir, split), mmap_mode="r")
        assert array.size and array.min() < array.max(), split
        per_image = array.reshape(len(array), -1)
        assert (per_image.max(axis=1) > per_image.min(axis=1)).all(), f"constant image in {split}"
        assert len({row.tobytes() for row in per_image}) > 1


def test_streamed_batches_equal_full_load(store_dir: Path) -> None:
    for split in store.SPLITS:
        path = store.split_path(store_dir, split)
        full = np.load(path)
        streamed = list(store.iter_npy_batches(path, 5))
        assert all(len(b) <= 5 for b in streamed)
        np.testing.assert_array_equal(np.concatenate(streamed), full)
        np.testing.assert_array_equal(np.concatenate(list(store.iter_npy_batches(path, 4, range(1, 3)))), full[1:3])
        np.testing.assert_array_equal(store.read_rows(path, np.array([0, len(full) - 1])), full[[0, -1]])


def test_streaming_an_empty_row_range_yields_nothing(store_dir: Path) -> None:
    assert list(store.iter_npy_batches(store.split_path(store_dir, "train"), 4, range(2, 2))) == []
