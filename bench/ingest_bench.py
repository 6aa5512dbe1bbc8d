"""Figure 1: ingest throughput, ours vs the course's per-image ``load_img`` loop.

Ours: :func:`tlpipe.data.ingest.ingest` on a source listing (all cores, JPEG draft
mode, validation, split, ``.npy`` store written and published), timed end to end.
Baseline: ``keras.utils.load_img(path, target_size=(224, 224))`` +
``keras.utils.img_to_array`` for every file of the same listing, stacked with
``np.stack`` as the course does. Both sides read the same files, from a warm page
cache; images/s counts every listed file on both sides.

The two sides alternate (ours, course, course, ours, ...) so that load from other
processes on the shared cores hits both alike; each side's figure is its median
over the repetitions. ``load_img``/``img_to_array`` are pure Pillow/NumPy code, so
this module runs Keras on its NumPy backend: no TensorFlow is imported, and our
ingest pool forks a process without TensorFlow threads, as in the real stage.

Run alone: ``python -m bench.ingest_bench [--quick] [--json PATH]``.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import shutil
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bench import synth
from bench.common import HYMENOPTERA, OUT_DIR, log, machine, quiet_tf, row, timed, warm_page_cache, write_json
from tlpipe.core.params import DataParams
from tlpipe.core.sources import SourceListing, list_folder
from tlpipe.data import store
from tlpipe.data.ingest import ingest, resolve_workers

SIZE = 224
TARGET_RATIO = 3.0
PROFILE_FILES = 120


@dataclass(frozen=True)
class Dataset:
    """A named source listing to ingest."""

    name: str
    listing: SourceListing
    reps: int

    @property
    def paths(self) -> list[Path]:
        """Every listed file, in listing order."""
        return [c.path for c in self.listing.candidates]


def ingest_params(workers: int = 0) -> DataParams:
    """Ingest params of the benchmark: every file, 224 px stretch, default validation."""
    return DataParams(source="bench", max_per_class=None, image_size=SIZE, workers=workers)


def load_course(paths: list[Path], interpolation: str = "nearest") -> np.ndarray:
    """The course's loop: ``load_img`` + ``img_to_array`` per file, then one float32 array."""
    from keras.utils import img_to_array, load_img

    return np.stack([img_to_array(load_img(p, target_size=(SIZE, SIZE), interpolation=interpolation))
                     for p in paths])


def compare_speed(dataset: Dataset, store_dir: Path) -> tuple[dict[str, list[float]], dict, np.ndarray]:
    """Alternate our ingest and the course's loop ``reps`` times each (ABBA order).

    Returns:
        Wall and CPU seconds per repetition for both sides (keys ``ours``,
        ``course``, ``ours_cpu``, ``course_cpu``), our last report, and the
        course's arrays from its last repetition.
    """
    times: dict[str, list[float]] = {"ours": [], "course": [], "ours_cpu": [], "course_cpu": []}
    report, arrays = {}, np.empty(0)
    for rep in range(dataset.reps):
        for side in (("ours", "course") if rep % 2 == 0 else ("course", "ours")):
            if side == "ours":
                wall, cpu, report = timed(lambda: ingest(dataset.listing, ingest_params(), store_dir))
            else:
                arrays = np.empty(0)  # free the previous repetition first
                wall, cpu, arrays = timed(lambda: load_course(dataset.paths))
            times[side].append(wall)
            times[f"{side}_cpu"].append(cpu)
    return times, report, arrays


def store_rows(store_dir: Path, listing: SourceListing) -> tuple[np.ndarray, np.ndarray]:
    """Our stored pixels of every kept file, and each one's position in the listing."""
    manifest = store.load_manifest(store_dir)
    position = {c.relpath: i for i, c in enumerate(listing.candidates)}
    rows, where = [], []
    for split in store.SPLITS:
        part = manifest[manifest["split"] == split].sort_values("index")
        array = np.load(store.split_path(store_dir, split), mmap_mode="r")
        rows.append(np.asarray(array[part["index"].to_numpy()]))
        where.extend(position[r] for r in part["relpath"])
    return np.concatenate(rows), np.asarray(where)


def compare_pixels(ours: np.ndarray, where: np.ndarray, dataset: Dataset, nearest: np.ndarray,
                   bilinear_files: int) -> dict[str, Any]:
    """Shapes and mean absolute pixel difference of our rows vs the course's arrays."""
    mad_nearest = float(np.mean(np.abs(ours.astype(np.float32) - nearest[where])))
    subset = np.arange(min(bilinear_files, len(where)))
    bilinear = load_course([dataset.paths[i] for i in where[subset]], "bilinear")
    mad_bilinear = float(np.mean(np.abs(ours[subset].astype(np.float32) - bilinear)))
    return {"shape_ours": list(ours.shape[1:]), "shape_baseline": list(nearest.shape[1:]),
            "shapes_identical": ours.shape[1:] == nearest.shape[1:], "dtype_ours": str(ours.dtype),
            "dtype_baseline": str(nearest.dtype), "mad_vs_nearest": round(mad_nearest, 3),
            "mad_vs_nearest_files": int(len(where)), "mad_vs_bilinear": round(mad_bilinear, 3),
            "mad_vs_bilinear_files": int(len(subset))}


def profile_top(profiler: cProfile.Profile, limit: int = 12) -> list[str]:
    """The ``limit`` functions with the most own time, as text lines."""
    buffer = io.StringIO()
    stats = pstats.Stats(profiler, stream=buffer).sort_stats("tottime")
    stats.print_stats(limit)
    lines = [line.rstrip() for line in buffer.getvalue().splitlines()]
    start = next(i for i, line in enumerate(lines) if "ncalls" in line)
    return [line for line in lines[start:] if line.strip()]


def cumulative(profiler: cProfile.Profile, names: dict[str, str]) -> dict[str, float]:
    """Cumulative seconds of selected functions, keyed by a readable label."""
    stats = pstats.Stats(profiler).stats  # type: ignore[attr-defined]
    found = {label: 0.0 for label in names}
    for (filename, _line, function), (_cc, _nc, _tt, ct, _callers) in stats.items():
        for label, pattern in names.items():
            file_part, _, func_part = pattern.rpartition(":")
            if function == func_part and filename.endswith(file_part):
                found[label] = max(found[label], ct)
    return {k: round(v, 3) for k, v in found.items()}


OURS_PARTS = {  # label -> "file suffix:function"; missing functions read 0
    "ingest total": "tlpipe/data/ingest.py:ingest",
    "decode, all files": "tlpipe/data/ingest.py:decode_candidates",
    "  JPEG decode (ImageFile.load)": "PIL/ImageFile.py:load",
    "  resize (bilinear, antialiased)": "tlpipe/data/images.py:resize_image",
    "  open + checks": "tlpipe/data/images.py:_open_checked",
    "  exif_transpose": "PIL/ImageOps.py:exif_transpose",
    "  sha256": "tlpipe/data/images.py:hash_bytes",
    "split": "tlpipe/data/ingest.py:assign_splits",
    "write_store": "tlpipe/data/ingest.py:write_store",
    "report": "tlpipe/data/ingest.py:summarize",
}
BASE_PARTS = {
    "course loop total": "bench/ingest_bench.py:load_course",
    "load_img (all)": "keras/src/utils/image_utils.py:load_img",
    "  JPEG decode (ImageFile.load)": "PIL/ImageFile.py:load",
    "  resize (nearest)": "PIL/Image.py:resize",
    "img_to_array": "keras/src/utils/image_utils.py:img_to_array",
}


def profile_ingest(dataset: Dataset, files: int) -> dict[str, Any]:
    """Where the time goes: cProfile of our ingest in one process vs the course's loop, same files."""
    stride = max(1, len(dataset.paths) // files)  # every class (and split) keeps its share
    listing = SourceListing(dataset.listing.kind, dataset.listing.root, dataset.listing.candidates[::stride])
    count = len(listing.candidates)
    out = OUT_DIR / "ingest" / f"profile_{dataset.name.split()[0]}"
    ours = cProfile.Profile()
    ours.runcall(ingest, listing, ingest_params(workers=1), out)
    base = cProfile.Profile()
    base.runcall(load_course, [c.path for c in listing.candidates])
    shutil.rmtree(out, ignore_errors=True)
    ours_parts, base_parts = cumulative(ours, OURS_PARTS), cumulative(base, BASE_PARTS)
    per_image = {f"ours {k.strip()} ms/img": round(v / count * 1000, 2) for k, v in ours_parts.items()}
    per_image |= {f"course {k.strip()} ms/img": round(v / count * 1000, 2) for k, v in base_parts.items()}
    return {"files": count, "single_process_seconds_ours": ours_parts, "seconds_course": base_parts,
            "per_image_ms": per_image, "top_tottime_ours": profile_top(ours)}


def datasets(quick: bool) -> list[Dataset]:
    """Hymenoptera (all 398 files) and the synthetic photo-sized set."""
    photos = synth.ensure_set(synth.PHOTO, 200 if quick else 2000)
    sets = [Dataset(f"synthetic {len(photos)} x 1600x1200", synth.listing(photos), 1 if quick else 2)]
    if HYMENOPTERA is None:
        log("[bench] hymenoptera not found (set TLPIPE_BENCH_HYMENOPTERA): skipping that data set")
        return sets
    return [Dataset("hymenoptera", list_folder(HYMENOPTERA), 1 if quick else 5), *sets]


def source_sizes(report: dict, store_dir: Path) -> dict[str, Any]:
    """Median source width/height of the kept files, and what was rejected."""
    manifest = store.load_manifest(store_dir)
    return {"kept": int(report["images_kept"]), "rejected": int(report["rejected"]),
            "rejection_reasons": report["rejection_reasons"],
            "median_source_wh": [int(manifest["width"].median()), int(manifest["height"].median())]}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run figure 1 and return (and optionally write) its rows and details."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--profile", action="store_true", help="profile even when the target is met")
    args = parser.parse_args(argv)
    quiet_tf()
    os.environ["KERAS_BACKEND"] = "numpy"  # load_img needs no TensorFlow; see the module docstring
    import keras.utils  # noqa: F401 - imported before any timing, as a notebook would have it
    rows, details = [], {"machine": machine(), "workers": resolve_workers(0), "image_size": SIZE}
    for dataset in datasets(args.quick):
        files = len(dataset.paths)
        store_dir = OUT_DIR / "ingest" / f"store_{dataset.name.split()[0]}"
        warm_page_cache(dataset.paths)
        log(f"ingest: {dataset.name}, {files} files, ours ({resolve_workers(0)} workers) vs load_img loop, "
            f"{dataset.reps} rep(s) each")
        times, report, arrays = compare_speed(dataset, store_dir)
        ours_ips, base_ips = files / statistics.median(times["ours"]), files / statistics.median(times["course"])
        cpu_ms = {side: 1000 * statistics.median(times[f"{side}_cpu"]) / files for side in ("ours", "course")}
        ours_pixels, where = store_rows(store_dir, dataset.listing)
        info = compare_pixels(ours_pixels, where, dataset, arrays, 100 if args.quick else 200)
        info |= source_sizes(report, store_dir) | {
            "files": files, "reps": dataset.reps, "ours_seconds": [round(t, 3) for t in times["ours"]],
            "baseline_seconds": [round(t, 3) for t in times["course"]],
            "ours_cpu_ms_per_image": round(cpu_ms["ours"], 2), "baseline_cpu_ms_per_image": round(cpu_ms["course"], 2),
            "cpu_ratio": round(cpu_ms["course"] / cpu_ms["ours"], 3)}
        del arrays, ours_pixels
        met = ours_ips >= TARGET_RATIO * base_ips
        if not met or args.profile:
            log(f"profiling ingest on {dataset.name}")
            info["profile"] = profile_ingest(dataset, 40 if args.quick else PROFILE_FILES)
        rows.append(row(f"1 ingest: {dataset.name.split()[0]} ({files} files)", ours_ips, base_ips, "images/s",
                        f"ratio >= {TARGET_RATIO:g}", met,
                        note=f"CPU ms/img ours {cpu_ms['ours']:.2f} vs course {cpu_ms['course']:.2f}; shapes "
                             f"{'identical' if info['shapes_identical'] else 'DIFFER'} {tuple(info['shape_ours'])}; "
                             f"MAD vs nearest {info['mad_vs_nearest']:.2f}, vs bilinear {info['mad_vs_bilinear']:.2f}"))
        details[dataset.name] = info
        shutil.rmtree(store_dir, ignore_errors=True)
    result = {"rows": rows, "details": details}
    if args.json:
        write_json(args.json, result)
    return result


if __name__ == "__main__":
    for line in main()["rows"]:
        print(line)
