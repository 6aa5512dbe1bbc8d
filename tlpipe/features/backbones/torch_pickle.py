"""Read PyTorch ``.pth`` state dicts into NumPy arrays without importing torch.

A ``.pth`` file is a pickle, and unpickling runs whatever callables the file
names. This module therefore never calls :func:`pickle.load` on it: it uses a
:class:`pickle.Unpickler` subclass whose ``find_class`` resolves only an
explicit allow-list of globals (tensor rebuild functions, storage types,
``collections.OrderedDict``) to harmless local stand-ins and refuses every
other global with :class:`UnsafePickleError`. Nothing from torch is imported.

Two container formats are understood:

* the zip format (torch >= 1.6): ``<prefix>/data.pkl`` plus raw storages in
  ``<prefix>/data/<key>``;
* the legacy sequential format (torch < 1.6): magic number, protocol version
  and system-info pickles, the state-dict pickle, a pickled list of storage
  keys, then each storage as an int64 element count followed by its raw bytes.

Example:
    >>> state = load_state_dict("model.pth")  # doctest: +SKIP
    >>> state["_conv_stem.weight"].shape  # doctest: +SKIP
    (32, 3, 3, 3)
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import struct
import zipfile
from dataclasses import dataclass, field
from typing import IO, Any

import numpy as np

__all__ = [
    "UnsafePickleError",
    "UnsupportedFormatError",
    "load_state_dict",
]

LEGACY_MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL_VERSION = 1001

# torch storage class name -> NumPy dtype. bfloat16 has no NumPy dtype: its
# raw 16-bit words are widened to float32 when materialised.
STORAGE_DTYPES: dict[str, np.dtype] = {
    "DoubleStorage": np.dtype("<f8"),
    "FloatStorage": np.dtype("<f4"),
    "HalfStorage": np.dtype("<f2"),
    "BFloat16Storage": np.dtype("<u2"),
    "LongStorage": np.dtype("<i8"),
    "IntStorage": np.dtype("<i4"),
    "ShortStorage": np.dtype("<i2"),
    "CharStorage": np.dtype("i1"),
    "ByteStorage": np.dtype("u1"),
    "BoolStorage": np.dtype("?"),
}


class UnsafePickleError(pickle.UnpicklingError):
    """Raised when a pickle references a global outside the allow-list."""


class UnsupportedFormatError(ValueError):
    """Raised when a file is not a PyTorch state dict this reader understands."""


@dataclass(frozen=True)
class StorageType:
    """Stand-in for a ``torch.<X>Storage`` class: only records the dtype."""

    name: str
    dtype: np.dtype


@dataclass
class Storage:
    """A storage whose bytes are filled in after unpickling.

    Attributes:
        key: Storage key in the file.
        dtype: Element dtype (``<u2`` for bfloat16).
        numel: Number of elements.
        bfloat16: Whether the elements are bfloat16 words.
        data: Flat array of ``numel`` elements once read, else None.
        root: For legacy storage views, the storage this one is a slice of.
        offset: For views, element offset into ``root``.
    """

    key: str
    dtype: np.dtype
    numel: int
    bfloat16: bool = False
    data: np.ndarray | None = None
    root: Storage | None = None
    offset: int = 0

    def get_array(self) -> np.ndarray:
        """Return the flat element array, resolving views.

        Returns:
            1-D array of ``numel`` elements.

        Raises:
            UnsupportedFormatError: If the storage bytes were never read.
        """
        if self.root is not None:
            return self.root.get_array()[self.offset : self.offset + self.numel]
        if self.data is None:
            raise UnsupportedFormatError(f"storage {self.key!r} has no data in the file")
        return self.data


@dataclass
class LazyTensor:
    """A tensor reference: storage plus offset, shape and strides (elements)."""

    storage: Storage
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    extra: dict[str, Any] = field(default_factory=dict)

    def to_numpy(self) -> np.ndarray:
        """Materialise the tensor as an owned, C-contiguous NumPy array.

        Returns:
            Array of ``shape``; bfloat16 tensors come back as float32.

        Raises:
            UnsupportedFormatError: If shape/stride/offset exceed the storage.
        """
        flat = self.storage.get_array()
        check_tensor_bounds(self.offset, self.shape, self.stride, flat.size)
        if any(dim == 0 for dim in self.shape):
            out = np.zeros(self.shape, dtype=flat.dtype)
        else:
            strides = tuple(s * flat.itemsize for s in self.stride)
            view = np.lib.stride_tricks.as_strided(
                flat[self.offset :], shape=self.shape, strides=strides, writeable=False
            )
            out = np.array(view, copy=True, order="C")
        if self.storage.bfloat16:
            out = (out.astype(np.uint32) << 16).view(np.float32)
        return out


def check_tensor_bounds(offset: int, shape: tuple[int, ...], stride: tuple[int, ...], size: int) -> None:
    """Check that a strided view stays inside its storage (as_strided is unchecked).

    Args:
        offset: Element offset of the first element.
        shape: Tensor shape.
        stride: Element strides, same length as ``shape``.
        size: Number of elements in the storage.

    Raises:
        UnsupportedFormatError: On negative values, rank mismatch or overflow.
    """
    if len(shape) != len(stride):
        raise UnsupportedFormatError(f"tensor shape {shape} and stride {stride} differ in rank")
    if offset < 0 or any(d < 0 for d in shape) or any(s < 0 for s in stride):
        raise UnsupportedFormatError("negative tensor offset, size or stride")
    if any(d == 0 for d in shape):
        return
    last = offset + sum((d - 1) * s for d, s in zip(shape, stride))
    if last >= size:
        raise UnsupportedFormatError(
            f"tensor (offset {offset}, shape {shape}, stride {stride}) exceeds its storage of {size} elements"
        )


def rebuild_tensor_v2(
    storage: Storage,
    storage_offset: int,
    size: tuple[int, ...],
    stride: tuple[int, ...],
    requires_grad: bool = False,
    backward_hooks: Any = None,
    metadata: Any = None,
) -> LazyTensor:
    """Stand-in for ``torch._utils._rebuild_tensor_v2``.

    Args:
        storage: Storage placeholder from ``persistent_load``.
        storage_offset: Element offset into the storage.
        size: Shape.
        stride: Element strides.
        requires_grad: Ignored.
        backward_hooks: Ignored.
        metadata: Ignored.

    Returns:
        A lazy tensor reference.

    Raises:
        UnsupportedFormatError: If ``storage`` is not a storage placeholder.
    """
    if not isinstance(storage, Storage):
        raise UnsupportedFormatError(f"tensor rebuilt from {type(storage).__name__}, expected a storage")
    return LazyTensor(storage, int(storage_offset), tuple(int(d) for d in size), tuple(int(s) for s in stride))


def rebuild_tensor(storage: Storage, storage_offset: int, size: tuple[int, ...], stride: tuple[int, ...]) -> LazyTensor:
    """Stand-in for the older ``torch._utils._rebuild_tensor``.

    Args:
        storage: Storage placeholder.
        storage_offset: Element offset.
        size: Shape.
        stride: Element strides.

    Returns:
        A lazy tensor reference.
    """
    return rebuild_tensor_v2(storage, storage_offset, size, stride)


def rebuild_parameter(data: LazyTensor, requires_grad: bool = False, backward_hooks: Any = None) -> LazyTensor:
    """Stand-in for ``torch._utils._rebuild_parameter``: a parameter is its tensor.

    Args:
        data: The wrapped tensor.
        requires_grad: Ignored.
        backward_hooks: Ignored.

    Returns:
        ``data`` unchanged.

    Raises:
        UnsupportedFormatError: If ``data`` is not a tensor reference.
    """
    if not isinstance(data, LazyTensor):
        raise UnsupportedFormatError(f"parameter wraps {type(data).__name__}, expected a tensor")
    return data


ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor"): rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): rebuild_parameter,
    **{("torch", name): StorageType(name, dtype) for name, dtype in STORAGE_DTYPES.items()},
}


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only :data:`ALLOWED_GLOBALS`.

    Storage persistent ids become :class:`Storage` placeholders, shared by key,
    recorded in ``self.storages``; their bytes are read by the caller.
    """

    def __init__(self, file: IO[bytes], storages: dict[str, Storage], legacy: bool) -> None:
        """Create the unpickler.

        Args:
            file: Binary stream positioned at a pickle.
            storages: Shared key -> placeholder map, filled while loading.
            legacy: Whether persistent ids carry legacy view metadata.
        """
        super().__init__(file)
        self.storages = storages
        self.legacy = legacy

    def find_class(self, module: str, name: str) -> Any:
        """Resolve an allowed global; refuse everything else.

        Args:
            module: Module named by the pickle.
            name: Attribute named by the pickle.

        Returns:
            The local stand-in for the allowed global.

        Raises:
            UnsafePickleError: For any global not in the allow-list.
        """
        allowed = ALLOWED_GLOBALS.get((module, name))
        if allowed is None:
            raise UnsafePickleError(
                f"refused global {module}.{name}: only PyTorch state-dict globals are allowed "
                f"({', '.join(sorted(f'{m}.{n}' for m, n in ALLOWED_GLOBALS))})"
            )
        return allowed

    def persistent_load(self, pid: Any) -> Storage:
        """Map a storage persistent id to a shared placeholder.

        Args:
            pid: ``('storage', type, key, location, numel[, view_metadata])``.

        Returns:
            The storage placeholder (or a view of one, legacy format).

        Raises:
            pickle.UnpicklingError: On any other persistent id.
        """
        expected_len = 6 if self.legacy else 5
        if not (isinstance(pid, tuple) and len(pid) == expected_len and decode_ascii(pid[0]) == "storage"):
            raise pickle.UnpicklingError(f"unsupported persistent id {pid!r}")
        storage_type, key, _location, numel = pid[1], str(pid[2]), pid[3], pid[4]
        if not isinstance(storage_type, StorageType) or not isinstance(numel, int) or numel < 0:
            raise pickle.UnpicklingError(f"unsupported storage persistent id {pid!r}")
        root = self.get_storage(key, storage_type, numel)
        view = pid[5] if self.legacy else None
        if view is None:
            return root
        view_key, offset, view_size = view
        return self.storages.setdefault(
            str(view_key),
            Storage(str(view_key), root.dtype, int(view_size), root.bfloat16, root=root, offset=int(offset))
        )

    def get_storage(self, key: str, storage_type: StorageType, numel: int) -> Storage:
        """Return the placeholder for ``key``, creating it on first use.

        Args:
            key: Storage key.
            storage_type: Declared storage type.
            numel: Declared element count.

        Returns:
            The shared placeholder.
        """
        if key not in self.storages:
            self.storages[key] = Storage(
                key, storage_type.dtype, numel, bfloat16=storage_type.name == "BFloat16Storage"
            )
        return self.storages[key]


def decode_ascii(value: Any) -> Any:
    """Decode bytes to str (legacy pickles may hold ``b'storage'``).

    Args:
        value: Any value.

    Returns:
        ``value`` decoded if it was bytes, else unchanged.
    """
    return value.decode("ascii") if isinstance(value, bytes) else value


def restricted_load(file: IO[bytes], storages: dict[str, Storage], legacy: bool) -> Any:
    """Unpickle one object with the restricted unpickler.

    Args:
        file: Binary stream positioned at a pickle.
        storages: Shared storage placeholders.
        legacy: Whether legacy persistent ids are expected.

    Returns:
        The unpickled object.
    """
    return RestrictedUnpickler(file, storages, legacy).load()


def load_zip(path: str | os.PathLike[str]) -> Any:
    """Load the object in a zip-format ``.pth`` with storages filled in.

    Args:
        path: Path to the zip file.

    Returns:
        The unpickled object (tensors still lazy).

    Raises:
        UnsupportedFormatError: If the archive has no single ``data.pkl``.
    """
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        pickles = [n for n in names if n == "data.pkl" or n.endswith("/data.pkl")]
        if len(pickles) != 1:
            raise UnsupportedFormatError(f"{path}: expected one data.pkl in the zip, found {pickles}")
        prefix = pickles[0][: -len("data.pkl")]
        byteorder = prefix + "byteorder"
        if byteorder in names and archive.read(byteorder).strip() != b"little":
            raise UnsupportedFormatError(f"{path}: only little-endian checkpoints are supported")
        storages: dict[str, Storage] = {}
        obj = restricted_load(io.BytesIO(archive.read(pickles[0])), storages, legacy=False)
        for key, storage in storages.items():
            raw = archive.read(f"{prefix}data/{key}")
            storage.data = frombuffer_checked(raw, storage, path)
    return obj


def frombuffer_checked(raw: bytes, storage: Storage, path: str | os.PathLike[str]) -> np.ndarray:
    """Interpret raw bytes as the storage's elements, checking the size.

    Args:
        raw: Raw storage bytes.
        storage: The placeholder (dtype and numel).
        path: File path, for messages.

    Returns:
        Flat array of ``storage.numel`` elements.

    Raises:
        UnsupportedFormatError: If fewer bytes than needed are present.
    """
    needed = storage.numel * storage.dtype.itemsize
    if len(raw) < needed:
        raise UnsupportedFormatError(f"{path}: storage {storage.key!r} has {len(raw)} bytes, needs {needed}")
    return np.frombuffer(raw, dtype=storage.dtype, count=storage.numel)


def load_legacy(path: str | os.PathLike[str]) -> Any:
    """Load the object in a legacy (pre-zip) ``.pth`` with storages filled in.

    Args:
        path: Path to the file.

    Returns:
        The unpickled object (tensors still lazy).

    Raises:
        UnsupportedFormatError: On a bad magic number, protocol or layout.
        UnsafePickleError: If any of its pickles names a refused global.
    """
    storages: dict[str, Storage] = {}
    with open(path, "rb") as f:
        magic = restricted_load(f, storages, legacy=True)
        if magic != LEGACY_MAGIC_NUMBER:
            raise UnsupportedFormatError(f"{path}: not a PyTorch checkpoint (neither zip nor legacy magic number)")
        protocol = restricted_load(f, storages, legacy=True)
        if protocol != LEGACY_PROTOCOL_VERSION:
            raise UnsupportedFormatError(f"{path}: unsupported legacy protocol version {protocol!r}")
        sys_info = restricted_load(f, storages, legacy=True)
        if not isinstance(sys_info, dict) or not sys_info.get("little_endian", False):
            raise UnsupportedFormatError(f"{path}: only little-endian legacy checkpoints are supported")
        obj = restricted_load(f, storages, legacy=True)
        keys = restricted_load(f, storages, legacy=True)
        if not isinstance(keys, list):
            raise UnsupportedFormatError(f"{path}: malformed storage key list")
        for key in keys:
            read_legacy_storage(f, storages.get(str(key)), path)
    return obj


def read_legacy_storage(f: IO[bytes], storage: Storage | None, path: str | os.PathLike[str]) -> None:
    """Read one legacy storage record (int64 element count, raw bytes).

    Args:
        f: Stream positioned at the record.
        storage: Placeholder to fill.
        path: File path, for messages.

    Raises:
        UnsupportedFormatError: On unknown keys or size mismatches.
    """
    if storage is None or storage.root is not None:
        raise UnsupportedFormatError(f"{path}: storage list names an unknown storage")
    header = f.read(8)
    if len(header) != 8:
        raise UnsupportedFormatError(f"{path}: truncated storage {storage.key!r}")
    (numel,) = struct.unpack("<q", header)
    if numel != storage.numel:
        raise UnsupportedFormatError(
            f"{path}: storage {storage.key!r} holds {numel} elements, pickle declared {storage.numel}"
        )
    storage.data = frombuffer_checked(f.read(numel * storage.dtype.itemsize), storage, path)


def load_state_dict(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """Load a PyTorch state dict as NumPy arrays, safely and without torch.

    Args:
        path: A ``.pth``/``.pt`` file in zip or legacy format.

    Returns:
        Mapping from parameter/buffer name to an owned NumPy array (bfloat16
        becomes float32). Non-tensor entries are dropped.

    Raises:
        UnsafePickleError: If the file references a global outside the allow-list.
        UnsupportedFormatError: If the file is not a state dict this reader understands.
    """
    obj = load_zip(path) if zipfile.is_zipfile(path) else load_legacy(path)
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise UnsupportedFormatError(f"{path}: top-level object is {type(obj).__name__}, not a state dict")
    return {str(k): v.to_numpy() for k, v in obj.items() if isinstance(v, LazyTensor)}
