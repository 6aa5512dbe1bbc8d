"""Tests for the ingest core: source listing, decoding, dedup, splitting and the published store."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from tlpipe.core.params import DataParams
from tlpipe.core.sources import Candidate, SourceError, SourceListing, list_elpv, list_folder, list_source
from tlpipe.data import store
from tlpipe.data.images import decode_file
from tlpipe.data.ingest import (
    DataError,
    assign_splits,
    check_task_support,
    hash_source,
    ingest,
    minimum_per_class,
)

SIZE = 32
MAX_PIXELS = 2500  # fixture images are at most 48x48 = 2304 pixels
CLASSES = ("alpha", "beta", "gamma")
PER_CLASS = 10
STORE_FILES = ("train.npy", "val.npy", "test.npy", "manifest.csv", "classes.json")


# ---------------------------------------------------------------- fixture helpers


def encode(image: Image.Image, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def random_image(rng: np.random.Generator, width: int | None = None, height: int | None = None) -> Image.Image:
    width = width or int(rng.integers(40, 49))
    height = height or int(rng.integers(40, 49))
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB")


def write_image(path: Path, rng: np.random.Generator, **size: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = "JPEG" if path.suffix == ".jpg" else "PNG"
    path.write_bytes(encode(random_image(rng, **size), fmt, **({"quality": 90} if fmt == "JPEG" else {})))
    return path


def write_class(folder: Path, count: int, rng: np.random.Generator) -> None:
    """``count`` distinct random images, alternating PNG and JPEG."""
    for i in range(count):
        write_image(folder / f"img_{i:02d}.{'png' if i % 2 == 0 else 'jpg'}", rng)


def png_claiming_size(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


def write_mode_variants(folder: Path, rng: np.random.Generator) -> list[str]:
    """Valid images in unusual modes: L, P, RGBA, CMYK, I;16 and an EXIF-rotated JPEG."""
    shape = (44, 46)
    files = {
        "mode_gray.png": encode(Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), "L"), "PNG"),
        "mode_palette.png": encode(random_image(rng).quantize(32), "PNG"),
        "mode_rgba.png": encode(Image.fromarray(rng.integers(0, 256, (*shape, 4), dtype=np.uint8), "RGBA"), "PNG"),
        "mode_cmyk.jpg": encode(random_image(rng).convert("CMYK"), "JPEG"),
        "mode_gray16.png": encode(Image.fromarray(rng.integers(0, 65536, shape, dtype=np.uint16)), "PNG"),
    }
    exif = Image.Exif()
    exif[0x0112] = 6
    files["mode_exif6.jpg"] = encode(random_image(rng, 48, 40), "JPEG", exif=exif.tobytes())
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return sorted(files)


@dataclass
class Fixture:
    src: Path
    expected_rejections: dict[str, str]  # relpath -> word the reason must contain
    duplicates: dict[str, str]  # duplicate relpath -> original relpath
    outside: Path


def make_source(root: Path, seed: int = 0) -> Fixture:
    """Three classes of distinct images plus one file of every bad kind."""
    rng = np.random.default_rng(seed)
    src = root / "src"
    for class_name in CLASSES:
        write_class(src / class_name, PER_CLASS, rng)
    write_mode_variants(src / "gamma", rng)
    jpeg = encode(random_image(rng, 48, 48), "JPEG")  # under max_pixels: truncation is the only fault
    outside = root / "outside"
    outside.mkdir()
    write_image(outside / "elsewhere.png", rng)
    bad = {
        "alpha/not_image.jpg": b"plain text, not a JPEG\n" * 3,
        "alpha/empty.jpg": b"",
        "alpha/truncated.jpg": jpeg[: len(jpeg) // 2],
        "alpha/tiny.png": encode(random_image(rng, 8, 8), "PNG"),
        "beta/bomb.png": encode(random_image(rng, 100, 100), "PNG"),  # > 2 x max_pixels: Pillow error
        "beta/bomb_mild.png": encode(random_image(rng, 52, 52), "PNG"),  # > max_pixels: Pillow warning
        "beta/bomb_header.png": png_claiming_size(100_000, 100_000),
        "gamma/.hidden.png": encode(random_image(rng), "PNG"),
    }
    for relpath, data in bad.items():
        (src / relpath).write_bytes(data)
    os.symlink(outside / "elsewhere.png", src / "beta" / "outside_link.png")
    duplicates = {
        "alpha/zz_dup_same_class.png": "alpha/img_00.png",
        "gamma/zz_dup_other_class.jpg": "beta/img_01.jpg",
    }
    for copy, original in duplicates.items():
        shutil.copyfile(src / original, src / copy)
    expected = {
        "alpha/not_image.jpg": "not an image",
        "alpha/empty.jpg": "empty file",
        "alpha/truncated.jpg": "corrupt or truncated",
        "alpha/tiny.png": "too small",
        "beta/bomb.png": "decompression bomb",
        "beta/bomb_mild.png": "decompression bomb",
        "beta/bomb_header.png": "decompression bomb",
        "beta/outside_link.png": "symlink leaves the source folder",
        "gamma/.hidden.png": "hidden file",
        **{copy: f"duplicate of {original}" for copy, original in duplicates.items()},
    }
    return Fixture(src, expected, duplicates, outside)


def params_for(src: Path, **overrides: object) -> DataParams:
    values = {"source": str(src), "image_size": SIZE, "max_per_class": None, "workers": 1, "max_pixels": MAX_PIXELS}
    values.update(overrides)
    return DataParams(**values)


def run_ingest(src: Path, store_dir: Path, **overrides: object) -> dict:
    params = params_for(src, **overrides)
    return ingest(list_source(params.source, params.classes, params.elpv_label, params.elpv_threshold), params,
                  store_dir)


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (relative name -> bytes)."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name)


def split_counts(manifest: pd.DataFrame) -> pd.DataFrame:
    return manifest.groupby(["class_name", "split"]).size().unstack(fill_value=0)


def make_classes(root: Path, counts: dict[str, int], seed: int = 1) -> Path:
    rng = np.random.default_rng(seed)
    for class_name, count in counts.items():
        write_class(root / class_name, count, rng)
    return root


@dataclass
class Built:
    fixture: Fixture
    store: Path
    report: dict
    manifest: pd.DataFrame


def run_ingest_dir(built: Built, store_dir: Path, **overrides: object) -> Path:
    run_ingest(built.fixture.src, store_dir, **overrides)
    return store_dir


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    root = tmp_path_factory.mktemp("ingest")
    fixture = make_source(root)
    report = run_ingest(fixture.src, root / "out" / "store")
    return Built(fixture, root / "out" / "store", report, store.load_manifest(root / "out" / "store"))


# ---------------------------------------------------------------- the fixture itself


def test_fixture_supports_five_fold_cv() -> None:
    need = minimum_per_class(DataParams(source="x"), presplit=False)
    assert need <= PER_CLASS
    assert minimum_per_class(DataParams(source="x", cv_folds=10), presplit=False) > need
    assert minimum_per_class(DataParams(source="x"), presplit=True) <= need


# ---------------------------------------------------------------- listing


def test_list_folder_candidates_and_rejections(built: Built) -> None:
    listing = list_folder(built.fixture.src)
    assert listing.kind == "folder"
    relpaths = [c.relpath for c in listing.candidates]
    assert relpaths == sorted(relpaths)
    assert {c.class_name for c in listing.candidates} == set(CLASSES)
    assert all(c.split is None for c in listing.candidates)
    rejected = {r.relpath: r.reason for r in listing.rejections}
    assert rejected == {"beta/outside_link.png": "symlink leaves the source folder", "gamma/.hidden.png": "hidden file"}
    assert "beta/outside_link.png" not in relpaths


def test_symlink_inside_the_folder_is_allowed(tmp_path: Path) -> None:
    src = make_classes(tmp_path / "src", {"a": 3, "b": 3})
    os.symlink(src / "a" / "img_00.png", src / "b" / "link.png")
    listing = list_folder(src)
    assert "b/link.png" in [c.relpath for c in listing.candidates]
    assert listing.rejections == []


def test_class_folder_symlink_leaving_source_is_not_read(tmp_path: Path) -> None:
    src = make_classes(tmp_path / "src", {"a": 3, "b": 3})
    make_classes(tmp_path / "outside", {"secret": 3}, seed=9)
    os.symlink(tmp_path / "outside" / "secret", src / "secret")
    listing = list_folder(src)
    assert all(c.path.resolve().is_relative_to(src.resolve()) for c in listing.candidates)


def test_list_folder_class_filter(built: Built) -> None:
    listing = list_folder(built.fixture.src, classes=["alpha", "gamma"])
    assert {c.class_name for c in listing.candidates} == {"alpha", "gamma"}


def test_list_folder_errors(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="not found"):
        list_folder(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceError, match="no class folders"):
        list_folder(tmp_path / "empty")
    with pytest.raises(SourceError):
        list_source(str(tmp_path / "missing"), None, "defect", 0.5)


# ---------------------------------------------------------------- ingest on the fixture folder


def test_store_files_exist(built: Built) -> None:
    assert sorted(p.name for p in built.store.iterdir()) == sorted(STORE_FILES)
    assert leftovers(built.store.parent) == []
    assert store.load_classes(built.store) == sorted(CLASSES) == built.report["classes"]


def test_split_arrays_match_manifest(built: Built) -> None:
    manifest = built.manifest
    total = 0
    for split in store.SPLITS:
        array = np.load(store.split_path(built.store, split))
        rows = manifest[manifest["split"] == split]
        assert array.shape == (len(rows), SIZE, SIZE, 3)
        assert array.dtype == np.uint8
        assert store.npy_rows(store.split_path(built.store, split)) == len(rows)
        assert sum(built.report["counts"][split].values()) == len(rows)
        images, labels = store.load_split(built.store, split)
        assert images.shape == array.shape and len(labels) == len(rows)
        total += len(rows)
    assert total == built.report["images_kept"] == len(manifest)
    # every good image is kept: 3 x 10 random + 6 mode variants
    assert total == len(CLASSES) * PER_CLASS + 6


def test_rows_hold_the_decoded_source_files(built: Built) -> None:
    classes = store.load_classes(built.store)
    for split in store.SPLITS:
        array = np.load(store.split_path(built.store, split))
        for row in built.manifest[built.manifest["split"] == split].itertuples():
            path = built.fixture.src / row.relpath
            decoded = decode_file(path, SIZE, max_pixels=MAX_PIXELS)
            np.testing.assert_array_equal(array[row.index], decoded.pixels, err_msg=row.relpath)
            assert row.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
            assert row.label == classes.index(row.class_name)
            assert row.relpath.split("/")[0] == row.class_name
            assert (row.width, row.height) == (decoded.width, decoded.height)


def test_mode_variants_are_kept(built: Built) -> None:
    modes = dict(zip(built.manifest["relpath"], built.manifest["mode"], strict=True))
    assert modes["gamma/mode_gray.png"] == "L"
    assert modes["gamma/mode_palette.png"] == "P"
    assert modes["gamma/mode_rgba.png"] == "RGBA"
    assert modes["gamma/mode_cmyk.jpg"] == "CMYK"
    assert modes["gamma/mode_gray16.png"].startswith("I;16")
    assert modes["gamma/mode_exif6.jpg"] == "RGB"


def test_every_bad_file_rejected_with_its_reason(built: Built) -> None:
    rejections = {r["relpath"]: r for r in built.report["rejections"]}
    assert set(rejections) == set(built.fixture.expected_rejections)
    for relpath, word in built.fixture.expected_rejections.items():
        assert word in rejections[relpath]["reason"], (relpath, rejections[relpath]["reason"])
        assert rejections[relpath]["class_name"] == relpath.split("/")[0]
    assert built.report["rejected"] == len(built.fixture.expected_rejections)
    assert not set(built.manifest["relpath"]) & set(built.fixture.expected_rejections)
    assert built.report["files_found"] == built.report["images_kept"] + built.report["rejected"]
    reasons = built.report["rejection_reasons"]
    assert reasons["duplicate"] == 2
    assert reasons["decompression bomb"] == 3
    assert reasons["symlink leaves the source folder"] == 1


def test_report_metadata(built: Built) -> None:
    report = built.report
    assert report["source"] == str(built.fixture.src)
    assert report["source_kind"] == "folder"
    assert report["image_size"] == SIZE
    assert report["not_selected_by_max_per_class"] == 0
    assert len(report["data_hash"]) == len(report["source_hash"]) == 64
    json.dumps(report)  # the report is JSON-serialisable


def test_duplicates_kept_once(built: Built) -> None:
    manifest = built.manifest
    assert manifest["sha256"].is_unique
    for copy, original in built.fixture.duplicates.items():
        sha = hashlib.sha256((built.fixture.src / copy).read_bytes()).hexdigest()
        rows = manifest[manifest["sha256"] == sha]
        assert list(rows["relpath"]) == [original]  # first in sorted path order wins
        assert copy not in set(manifest["relpath"])


def test_every_class_in_every_split(built: Built) -> None:
    counts = split_counts(built.manifest)
    assert set(counts.index) == set(CLASSES)
    assert set(counts.columns) == set(store.SPLITS)
    assert (counts > 0).all().all(), counts
    assert (counts["train"] >= DataParams().cv_folds).all()
    for split in store.SPLITS:
        assert set(built.report["counts"][split]) == set(CLASSES)


def test_split_fractions(built: Built) -> None:
    params = params_for(built.fixture.src)
    counts = built.manifest.groupby(["class_name", "split"]).size().unstack(fill_value=0)
    for class_name, row in counts.iterrows():
        n = int(row.sum())
        test = max(1, round(n * params.test_fraction))
        assert row["test"] == test, class_name
        assert row["val"] == max(1, round((n - test) * params.val_fraction)), class_name


def test_ingest_is_deterministic(built: Built, tmp_path: Path) -> None:
    report = run_ingest(built.fixture.src, tmp_path / "again")
    assert snapshot(tmp_path / "again") == snapshot(built.store)
    assert report == built.report


def test_workers_do_not_change_the_output(built: Built, tmp_path: Path) -> None:
    # > 16 files, so workers=2 really uses a process pool
    report = run_ingest(built.fixture.src, tmp_path / "parallel", workers=2)
    assert snapshot(tmp_path / "parallel") == snapshot(built.store)
    assert report == built.report


def test_seed_changes_the_split(built: Built, tmp_path: Path) -> None:
    report = run_ingest(built.fixture.src, tmp_path / "seeded", seed=7)
    manifest = store.load_manifest(tmp_path / "seeded")
    assert set(manifest["relpath"]) == set(built.manifest["relpath"])
    before = dict(zip(built.manifest["relpath"], built.manifest["split"], strict=True))
    after = dict(zip(manifest["relpath"], manifest["split"], strict=True))
    assert before != after
    assert report["data_hash"] != built.report["data_hash"]
    assert report["source_hash"] == built.report["source_hash"]
    assert manifest["split"].value_counts().to_dict() == built.manifest["split"].value_counts().to_dict()


def test_max_per_class_caps_and_is_seeded(built: Built, tmp_path: Path) -> None:
    report = run_ingest(built.fixture.src, tmp_path / "capped", max_per_class=9)
    manifest = store.load_manifest(tmp_path / "capped")
    assert manifest["class_name"].value_counts().to_dict() == {c: 9 for c in CLASSES}
    assert report["not_selected_by_max_per_class"] == built.report["images_kept"] - 27
    run_ingest(built.fixture.src, tmp_path / "capped2", max_per_class=9)
    assert snapshot(tmp_path / "capped2") == snapshot(tmp_path / "capped")
    other = store.load_manifest(run_ingest_dir(built, tmp_path / "capped3", max_per_class=9, seed=5))
    assert set(other["relpath"]) != set(manifest["relpath"])


def test_classes_param_restricts_the_store(built: Built, tmp_path: Path) -> None:
    report = run_ingest(built.fixture.src, tmp_path / "two", classes=["alpha", "beta"])
    assert report["classes"] == ["alpha", "beta"]
    assert set(store.load_manifest(tmp_path / "two")["class_name"]) == {"alpha", "beta"}


def test_center_crop_mode_changes_pixels_not_split(built: Built, tmp_path: Path) -> None:
    run_ingest(built.fixture.src, tmp_path / "crop", resize_mode="center_crop")
    manifest = store.load_manifest(tmp_path / "crop")
    pd.testing.assert_frame_equal(manifest, built.manifest)
    assert not np.array_equal(np.load(tmp_path / "crop" / "train.npy"), np.load(built.store / "train.npy"))


def test_republish_replaces_store(built: Built, tmp_path: Path) -> None:
    target = tmp_path / "store"
    run_ingest(built.fixture.src, target)
    run_ingest(built.fixture.src, target, seed=3)
    assert sorted(p.name for p in target.iterdir()) == sorted(STORE_FILES)
    assert leftovers(tmp_path) == []
    assert snapshot(target) != snapshot(built.store)


# ---------------------------------------------------------------- source hash


def test_hash_source_equals_report(built: Built) -> None:
    assert hash_source(list_folder(built.fixture.src)) == built.report["source_hash"]


def test_hash_source_changes_with_bytes(tmp_path: Path) -> None:
    src = make_classes(tmp_path / "src", {"a": 3, "b": 3})
    first = hash_source(list_folder(src))
    assert hash_source(list_folder(src)) == first
    path = src / "a" / "img_01.jpg"
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF
    path.write_bytes(bytes(data))
    assert hash_source(list_folder(src)) != first


def test_hash_source_changes_with_class_or_name(tmp_path: Path) -> None:
    src = make_classes(tmp_path / "src", {"a": 3, "b": 3})
    first = hash_source(list_folder(src))
    (src / "a" / "img_00.png").rename(src / "b" / "img_00.png")
    moved = hash_source(list_folder(src))
    assert moved != first
    (src / "b" / "img_00.png").rename(src / "b" / "renamed.png")
    assert hash_source(list_folder(src)) not in (first, moved)


def test_hash_source_handles_unreadable(tmp_path: Path) -> None:
    """An unreadable file hashes as the marker 'unreadable'; readable ones by their bytes, in sorted order."""
    kept = tmp_path / "b" / "kept.png"
    kept.parent.mkdir()
    kept.write_bytes(b"some image bytes")
    listing = SourceListing("folder", tmp_path, [Candidate(kept, "b/kept.png", "b"),
                                                 Candidate(tmp_path / "gone.png", "a/gone.png", "a")])
    lines = ["a/gone.png,a,unreadable\n", f"b/kept.png,b,{hashlib.sha256(b'some image bytes').hexdigest()}\n"]
    assert hash_source(listing) == hashlib.sha256("".join(lines).encode()).hexdigest()


# ---------------------------------------------------------------- pre-split folders


def make_presplit(root: Path, splits: dict[str, int], classes: tuple[str, ...] = ("alpha", "beta")) -> Path:
    rng = np.random.default_rng(3)
    for split, count in splits.items():
        for class_name in classes:
            write_class(root / split / class_name, count, rng)
    return root


def test_presplit_val_folder_becomes_test(tmp_path: Path) -> None:
    src = make_presplit(tmp_path / "src", {"train": 10, "val": 3})
    shutil.copyfile(src / "train" / "alpha" / "img_00.png", src / "val" / "alpha" / "zz_dup.png")
    listing = list_folder(src)
    assert listing.kind == "presplit"
    assert {c.split for c in listing.candidates} == {"train", "val"}
    report = ingest(listing, params_for(src), tmp_path / "store")
    manifest = store.load_manifest(tmp_path / "store")
    folder = manifest["relpath"].str.split("/").str[0]
    assert report["source_kind"] == "presplit"
    assert (folder[manifest["split"] == "test"] == "val").all()
    assert (folder[manifest["split"] != "test"] == "train").all()  # validation carved from train
    assert (manifest["split"] == "test").sum() == 6
    assert (manifest["split"] == "val").sum() >= 2
    assert (split_counts(manifest) > 0).all().all()
    # the val-folder copy of a train file is dropped as a duplicate: no train/test leakage
    rejected = {r["relpath"]: r["reason"] for r in report["rejections"]}
    assert rejected == {"val/alpha/zz_dup.png": "duplicate of train/alpha/img_00.png"}
    assert manifest["sha256"].is_unique


def test_presplit_split_respected_for_every_file(tmp_path: Path) -> None:
    src = make_presplit(tmp_path / "src", {"train": 10, "val": 4})
    for seed in (0, 1, 2):
        ingest(list_folder(src), params_for(src, seed=seed), tmp_path / f"store{seed}")
        manifest = store.load_manifest(tmp_path / f"store{seed}")
        for row in manifest.itertuples():
            source_split = row.relpath.split("/")[0]
            assert (source_split == "val") == (row.split == "test"), row.relpath


def test_presplit_with_val_and_test_folders(tmp_path: Path) -> None:
    src = make_presplit(tmp_path / "src", {"train": 8, "val": 2, "test": 3})
    ingest(list_folder(src), params_for(src), tmp_path / "store")
    manifest = store.load_manifest(tmp_path / "store")
    folder = manifest["relpath"].str.split("/").str[0]
    assert (folder == manifest["split"]).all()


def test_presplit_max_per_class_is_per_split(tmp_path: Path) -> None:
    src = make_presplit(tmp_path / "src", {"train": 10, "val": 4})
    report = ingest(list_folder(src), params_for(src, max_per_class=7), tmp_path / "store")
    manifest = store.load_manifest(tmp_path / "store")
    folder = manifest["relpath"].str.split("/").str[0]
    assert (manifest[folder == "train"]["class_name"].value_counts() == 7).all()
    assert (manifest[folder == "val"]["class_name"].value_counts() == 4).all()
    assert report["not_selected_by_max_per_class"] == 6


def test_presplit_class_missing_from_held_out(tmp_path: Path) -> None:
    src = make_presplit(tmp_path / "src", {"train": 8, "val": 2})
    shutil.rmtree(src / "val" / "beta")
    with pytest.raises(DataError, match="beta"):
        ingest(list_folder(src), params_for(src), tmp_path / "store")


# ---------------------------------------------------------------- failures


def test_one_class_only(tmp_path: Path) -> None:
    src = make_classes(tmp_path / "src", {"only": 12})
    with pytest.raises(DataError, match="two classes") as info:
        ingest(list_folder(src), params_for(src), tmp_path / "store")
    assert "only" in str(info.value)
    assert not (tmp_path / "store").exists()
    assert leftovers(tmp_path) == []


def test_class_too_small_named_with_count(tmp_path: Path) -> None:
    src = make_classes(tmp_path / "src", {"big": 12, "small": 5})
    with pytest.raises(DataError) as info:
        ingest(list_folder(src), params_for(src), tmp_path / "store")
    message = str(info.value)
    assert "'small'" in message and "has 5" in message
    assert str(minimum_per_class(params_for(src), presplit=False)) in message


def test_class_too_small_after_rejections(tmp_path: Path) -> None:
    src = make_classes(tmp_path / "src", {"big": 12, "small": 8})
    (src / "small" / "img_00.png").write_bytes(b"")
    (src / "small" / "img_01.jpg").write_text("not an image")
    with pytest.raises(DataError, match=r"class 'small' has 6 usable images"):
        ingest(list_folder(src), params_for(src), tmp_path / "store")


def test_class_too_small_after_max_per_class(tmp_path: Path) -> None:
    src = make_classes(tmp_path / "src", {"a": 12, "b": 12})
    with pytest.raises(DataError, match="has 4"):
        ingest(list_folder(src), params_for(src, max_per_class=4), tmp_path / "store")


def test_no_usable_files_at_all(tmp_path: Path) -> None:
    src = tmp_path / "src"
    for class_name in ("a", "b"):
        (src / class_name).mkdir(parents=True)
        (src / class_name / "x.jpg").write_bytes(b"")
    with pytest.raises(DataError, match="two classes"):
        ingest(list_folder(src), params_for(src), tmp_path / "store")
    assert leftovers(tmp_path) == []


def test_only_listing_rejections_raise_data_error(tmp_path: Path) -> None:
    src = tmp_path / "src"
    for class_name in ("a", "b"):
        (src / class_name).mkdir(parents=True)
        (src / class_name / ".hidden.png").write_bytes(b"x")
    listing = list_folder(src)
    assert listing.candidates == [] and len(listing.rejections) == 2
    with pytest.raises(DataError):
        ingest(listing, params_for(src), tmp_path / "store")


def test_failed_ingest_leaves_published_store_untouched(built: Built, tmp_path: Path) -> None:
    target = tmp_path / "store"
    shutil.copytree(built.store, target)  # the published store
    before = snapshot(target)
    mtimes = {p.name: p.stat().st_mtime_ns for p in target.iterdir()}
    bad = make_classes(tmp_path / "bad", {"big": 12, "small": 3})
    with pytest.raises(DataError):
        ingest(list_folder(bad), params_for(bad), target)
    assert snapshot(target) == before
    assert {p.name: p.stat().st_mtime_ns for p in target.iterdir()} == mtimes
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad", "store"]
    assert not list(tmp_path.glob(".store.tmp-*"))


def test_failed_ingest_after_real_publish(tmp_path: Path) -> None:
    good = make_classes(tmp_path / "good", {"a": 10, "b": 10})
    target = tmp_path / "out" / "store"
    ingest(list_folder(good), params_for(good), target)
    before = snapshot(target)
    one = make_classes(tmp_path / "one", {"a": 10}, seed=4)
    with pytest.raises(DataError, match="two classes"):
        ingest(list_folder(one), params_for(one), target)
    assert snapshot(target) == before
    assert leftovers(target.parent) == []


def test_interrupted_ingest_leaves_store_untouched(built: Built, tmp_path: Path) -> None:
    target = tmp_path / "store"
    shutil.copytree(built.store, target)
    before = snapshot(target)

    def interrupt(items):
        for i, item in enumerate(items):
            if i == 5:
                raise KeyboardInterrupt
            yield item

    with pytest.raises(KeyboardInterrupt):
        ingest(list_folder(built.fixture.src), params_for(built.fixture.src), target, progress=interrupt)
    assert snapshot(target) == before
    assert leftovers(tmp_path) == []


def fake_kept(counts: dict[str, int]) -> pd.DataFrame:
    rows = [
        {"class_name": c, "sha256": hashlib.sha256(f"{c}/{i}".encode()).hexdigest(), "source_split": "",
         "relpath": f"{c}/{i}"}
        for c, n in counts.items() for i in range(n)
    ]
    return pd.DataFrame(rows)


def test_assign_splits_two_classes_at_minimum() -> None:
    params = DataParams(source="x")
    need = minimum_per_class(params, presplit=False)
    kept = fake_kept({"a": need, "b": need})
    check_task_support(kept, params, presplit=False)
    counts = split_counts(assign_splits(kept, params, presplit=False))
    assert (counts > 0).all().all()
    assert (counts["train"] >= params.cv_folds).all()


@pytest.mark.parametrize("counts", [(0, 0, 0), (0, 20, 20), (0, 0, 0, 0, 0)], ids=["3xmin", "min-20-20", "5xmin"])
def test_assign_splits_supports_every_accepted_dataset(counts: tuple[int, ...]) -> None:
    params = DataParams(source="x")
    need = minimum_per_class(params, presplit=False)
    counts = tuple(c or need for c in counts)
    kept = fake_kept({f"c{i}": n for i, n in enumerate(counts)})
    check_task_support(kept, params, presplit=False)  # accepted...
    counts_frame = split_counts(assign_splits(kept, params, presplit=False))  # ...so it must split
    assert set(counts_frame.columns) == set(store.SPLITS)
    assert (counts_frame > 0).all().all(), counts_frame
    assert (counts_frame["train"] >= params.cv_folds).all()


def test_ingest_three_classes_at_minimum(tmp_path: Path) -> None:
    """Three classes of exactly the minimum size are accepted and split 5/1/1 (cv 5, test 0.2, val 0.1)."""
    params = params_for(tmp_path / "src", image_size=16, test_fraction=0.2, val_fraction=0.1, cv_folds=5)
    need = minimum_per_class(params, presplit=False)
    assert need == 7  # 7 - round(7 * 0.2) = 6; 6 - max(1, round(6 * 0.1)) = 5 = cv_folds
    src = make_classes(tmp_path / "src", {"a": need, "b": need, "c": need})
    report = ingest(list_folder(src), params, tmp_path / "store")
    assert report["images_kept"] == 3 * need and report["rejected"] == 0
    counts = split_counts(store.load_manifest(tmp_path / "store"))
    assert counts.to_dict(orient="index") == {c: {"test": 1, "train": 5, "val": 1} for c in ("a", "b", "c")}


# ---------------------------------------------------------------- ELPV


def test_list_elpv_defect_labels() -> None:
    listing = list_elpv()
    assert listing.kind == "elpv"
    assert len(listing.candidates) == 2624
    assert {c.class_name for c in listing.candidates} == {"defective", "functional"}
    relpaths = [c.relpath for c in listing.candidates]
    assert relpaths == sorted(relpaths) and len(set(relpaths)) == len(relpaths)
    assert all(c.path.is_file() for c in listing.candidates[:50])
    assert listing.rejections == []


def test_list_elpv_type_labels_and_filters() -> None:
    assert {c.class_name for c in list_elpv(label="type").candidates} == {"mono", "poly"}
    defective = list_elpv(classes=["defective"]).candidates
    assert defective and {c.class_name for c in defective} == {"defective"}
    strict = [c for c in list_elpv(threshold=1.0).candidates if c.class_name == "defective"]
    assert 0 < len(strict) < len(defective)
    via_source = list_source("elpv", None, "type", 0.5)
    assert [c.class_name for c in via_source.candidates] == [c.class_name for c in list_elpv("type").candidates]


def elpv_subset(per_class: int) -> SourceListing:
    full = list_elpv()
    chosen: list[Candidate] = []
    for class_name in ("defective", "functional"):
        chosen += [c for c in full.candidates if c.class_name == class_name][:per_class]
    return SourceListing(full.kind, full.root, sorted(chosen, key=lambda c: c.relpath))


def test_elpv_tiny_ingest(tmp_path: Path) -> None:
    listing = elpv_subset(16)
    params = DataParams(source="elpv", image_size=SIZE, max_per_class=12, workers=1)
    report = ingest(listing, params, tmp_path / "store")
    manifest = store.load_manifest(tmp_path / "store")
    assert report["source"] == "elpv" and report["source_kind"] == "elpv"
    assert report["classes"] == ["defective", "functional"]
    assert manifest["class_name"].value_counts().to_dict() == {"defective": 12, "functional": 12}
    assert report["not_selected_by_max_per_class"] == 8
    assert report["source_hash"] == hash_source(listing)
    for split in store.SPLITS:
        array = np.load(tmp_path / "store" / f"{split}.npy")
        assert array.shape == ((manifest["split"] == split).sum(), SIZE, SIZE, 3)
    assert (split_counts(manifest) > 0).all().all()


@pytest.mark.slow
def test_elpv_full_listing_ingest(tmp_path: Path) -> None:
    params = DataParams(source="elpv", image_size=SIZE, max_per_class=12, workers=2)
    report = ingest(list_elpv(), params, tmp_path / "store")
    assert report["files_found"] == 2624
    assert report["images_kept"] == 24
    assert report["images_kept"] + report["rejected"] + report["not_selected_by_max_per_class"] == 2624
    assert store.load_classes(tmp_path / "store") == ["defective", "functional"]
