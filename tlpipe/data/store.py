"""The image store: one uint8 ``.npy`` array (N, H, W, 3) per split plus a manifest.

Layout of a store folder::

    train.npy  val.npy  test.npy   # uint8, memory-mappable, rows aligned with the manifest
    manifest.csv                   # split, index, relpath, class_name, label, sha256, width, height
    classes.json                   # class names in label order

Writes stream row by row (no array of the whole split in RAM) and reads stream
fixed-size batches with plain file reads, so memory stays flat as data grows.
Whole folders are published atomically with :func:`publish_dir`.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd

from tlpipe.core.files import remove_stale_siblings, write_atomic

SPLITS = ("train", "val", "test")
MANIFEST = "manifest.csv"
CLASSES = "classes.json"


class NpyWriter:
    """Append rows to a ``.npy`` file whose final row count is known up front."""

    def __init__(self, path: Path, rows: int, row_shape: tuple[int, ...], dtype: str = "uint8") -> None:
        self.path = Path(path)
        self.rows = rows
        self.row_shape = tuple(row_shape)
        self.dtype = np.dtype(dtype)
        self.written = 0
        self._handle = open(self.path, "wb")  # noqa: SIM115 (open until close())
        header = {"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False,
                  "shape": (rows, *self.row_shape)}
        np.lib.format.write_array_header_1_0(self._handle, header)

    def write(self, rows: np.ndarray) -> None:
        """Append one row (``row_shape``) or a block of rows (``(k, *row_shape)``)."""
        rows = np.ascontiguousarray(rows, dtype=self.dtype)
        count = 1 if rows.shape == self.row_shape else rows.shape[0]
        if self.written + count > self.rows:
            raise ValueError(f"{self.path}: writing past the declared {self.rows} rows")
        self._handle.write(rows.tobytes())
        self.written += count

    def close(self) -> None:
        """Close the file; it must hold exactly the declared number of rows."""
        self._handle.close()
        if self.written != self.rows:
            raise ValueError(f"{self.path}: wrote {self.written} of {self.rows} rows")

    def __enter__(self) -> NpyWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        if exc[0] is None:
            self.close()
        else:
            self._handle.close()


def create_npy(path: Path, rows: int, row_shape: tuple[int, ...], dtype: str = "uint8") -> int:
    """Create a ``.npy`` file of ``rows`` rows to be filled in place by parallel writers; return its data offset.

    The header is the one :class:`NpyWriter` writes; the data area is allocated (sparse, zero) up to the
    final size, so writers fill disjoint row blocks with :func:`write_rows_at` in any order and the
    finished file is byte-identical to one written sequentially.
    """
    dtype_ = np.dtype(dtype)
    header = {"descr": np.lib.format.dtype_to_descr(dtype_), "fortran_order": False,
              "shape": (rows, *tuple(row_shape))}
    with open(path, "wb") as handle:
        np.lib.format.write_array_header_1_0(handle, header)
        offset = handle.tell()
        handle.truncate(offset + rows * int(np.prod(row_shape, dtype=np.int64)) * dtype_.itemsize)
    return offset


def write_rows_at(path: Path, start_row: int, rows: np.ndarray) -> None:
    """Write a block of consecutive rows into a file made by :func:`create_npy`, starting at ``start_row``."""
    shape, dtype, offset = read_npy_header(path)
    rows = np.ascontiguousarray(rows, dtype=dtype)
    if rows.shape[1:] != tuple(shape[1:]) or not 0 <= start_row <= shape[0] - rows.shape[0]:
        raise ValueError(f"{path}: rows {start_row}..{start_row + rows.shape[0]} of shape {rows.shape[1:]} do "
                         f"not fit an array of shape {shape}")
    row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
    fd = os.open(path, os.O_WRONLY)
    try:
        view, position = memoryview(rows).cast("B"), offset + start_row * row_bytes
        while view:
            written = os.pwrite(fd, view, position)
            view, position = view[written:], position + written
    finally:
        os.close(fd)


def read_npy_header(path: Path) -> tuple[tuple[int, ...], np.dtype, int]:
    """Return (shape, dtype, data offset) of a ``.npy`` file without reading its data."""
    with open(path, "rb") as handle:
        version = np.lib.format.read_magic(handle)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read_header(handle)
        if fortran:
            raise ValueError(f"{path}: Fortran-ordered arrays are not supported")
        return shape, dtype, handle.tell()


def iter_npy_batches(path: Path, batch_size: int, rows: range | None = None) -> Iterator[np.ndarray]:
    """Yield consecutive row blocks of a ``.npy`` file, in order, never shuffled.

    Each block is a fresh array read with one ``readinto`` call, so resident memory
    is one batch regardless of the file size.
    """
    shape, dtype, offset = read_npy_header(path)
    row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
    rows = range(shape[0]) if rows is None else rows
    with open(path, "rb", buffering=0) as handle:
        for start in range(rows.start, rows.stop, batch_size):
            count = min(batch_size, rows.stop - start)
            batch = np.empty((count, *shape[1:]), dtype=dtype)
            handle.seek(offset + start * row_bytes)
            if handle.readinto(memoryview(batch).cast("B")) != count * row_bytes:
                raise OSError(f"{path}: file ends before row {start + count}")
            yield batch


def read_rows(path: Path, indices: np.ndarray) -> np.ndarray:
    """Read selected rows of a ``.npy`` file (memory-mapped, copied out)."""
    array = np.load(path, mmap_mode="r")
    return np.array(array[np.asarray(indices)])


def npy_rows(path: Path) -> int:
    """Number of rows in a ``.npy`` file."""
    return read_npy_header(path)[0][0]


def split_path(store: Path, split: str) -> Path:
    """Path of one split's image array."""
    return Path(store) / f"{split}.npy"


def image_size(store: Path, split: str = "train") -> int:
    """The side of the store's images, read from one split's ``.npy`` header (no data read)."""
    return int(read_npy_header(split_path(store, split))[0][1])


def load_manifest(store: Path) -> pd.DataFrame:
    """Read the manifest of a store, sorted by split order then row index."""
    frame = pd.read_csv(Path(store) / MANIFEST, dtype={"sha256": str, "relpath": str, "class_name": str})
    return frame


def load_classes(store: Path) -> list[str]:
    """Class names in label order."""
    return json.loads((Path(store) / CLASSES).read_text())


def load_split(store: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Load one split fully (images uint8, labels int) — for small data and tests."""
    frame = load_manifest(store)
    labels = frame.loc[frame["split"] == split].sort_values("index")["label"].to_numpy()
    return np.load(split_path(store, split)), labels


def split_labels(store: Path, split: str) -> np.ndarray:
    """Integer labels of one split, aligned with its rows."""
    frame = load_manifest(store)
    return frame.loc[frame["split"] == split].sort_values("index")["label"].to_numpy(dtype=np.int64)


def write_json(path: Path, payload: object) -> None:
    """Write JSON (indented, sorted keys) atomically with :func:`write_atomic`."""
    write_atomic(path, json.dumps(payload, indent=2, sort_keys=True) + "\n")


def write_csv(path: Path, frame: pd.DataFrame) -> None:
    """Write a DataFrame as CSV (no index, ``\\n`` line ends) atomically with :func:`write_atomic`."""
    write_atomic(path, frame.to_csv(index=False, lineterminator="\n"))


def staging_dir(target: Path) -> Path:
    """Create and return an empty sibling folder to build ``target`` in.

    Staging debris of killed earlier runs is removed first (:func:`remove_stale_siblings`).
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_siblings(target)
    staging = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    return staging


def publish_dir(staging: Path, target: Path) -> None:
    """Replace ``target`` by the fully written ``staging`` folder.

    The old folder is moved aside first and removed only after the new one is in
    place, so a crash leaves either the old or the new output, never a mix.
    """
    target = Path(target)
    old = target.with_name(f".{target.name}.old-{os.getpid()}")
    if target.exists() or target.is_symlink():
        os.replace(target, old)
    os.replace(staging, target)
    if old.exists() or old.is_symlink():
        shutil.rmtree(old) if old.is_dir() and not old.is_symlink() else old.unlink()
