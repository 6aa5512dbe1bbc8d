"""Figure 2: features on CPU, our streaming path vs a bare ``model.predict``.

Ours: :func:`tlpipe.features.extraction.extract_split` with the model of
:func:`tlpipe.features.extraction.build_extractor` (uint8 input, cast inside), streaming
batches of 32 from a uint8 store ``.npy`` and streaming the pooled features to
``.npy`` files. Baseline: ``model.predict(x, batch_size=32)`` of the very same
backbone (the sub-model inside our extractor, as built by
``tlpipe.features.backbones.build_backbone(name, weights=None)``, random weights) on the
same images preloaded as one float32 array. Warm-up (tracing) is excluded on both
sides; the sides alternate (ABBA) and each figure is the median over repetitions.
The features of both sides must agree (same weights), which is checked.

Run alone: ``python -m bench.features_bench [--quick] [--json PATH]``.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import OUT_DIR, log, machine, quiet_tf, row, timed, write_json

BATCH = 32
TARGET_RATIO = 0.9
# images per backbone; each runs at its native input size (224, 240, 260; resnet50 224)
FULL = {"efficientnet_lite0": 256, "efficientnet_lite1": 128, "efficientnet_lite2": 128, "resnet50": 96}
QUICK = {"efficientnet_lite0": 64, "resnet50": 32}


def write_images(path: Path, count: int, size: int, seed: int = 0) -> Path:
    """Write ``count`` seeded random uint8 images as a store ``.npy`` (as the ingest stage would)."""
    from tlpipe.data import store

    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    with store.NpyWriter(path, count, (size, size, 3)) as writer:
        for start in range(0, count, BATCH):
            writer.write(rng.integers(0, 256, size=(min(BATCH, count - start), size, size, 3), dtype=np.uint8))
    return path


def inner_backbone(extractor):
    """The backbone sub-model (from ``build_backbone``) inside our extractor."""
    import keras

    return next(layer for layer in extractor.layers if isinstance(layer, keras.Model))


def bench_backbone(name: str, count: int, reps: int) -> dict[str, Any]:
    """Time ours and the bare predict for one backbone; return seconds and a feature check."""
    from tlpipe.features.backbones import get_spec
    from tlpipe.features.extraction import build_extractor, extract_split

    size = get_spec(name).default_size
    images = write_images(OUT_DIR / "features" / f"images_{count}_{size}.npy", count, size)
    out_dir = OUT_DIR / "features" / f"out_{name}"
    out_dir.mkdir(parents=True, exist_ok=True)
    extractor = build_extractor(name, None, size, include_top=False)
    backbone = inner_backbone(extractor)
    x = np.load(images).astype(np.float32)  # the course's preloaded float32 array
    extractor.predict_on_batch(x[:BATCH].astype(np.uint8))  # warm-up: trace our step
    backbone.predict(x[:BATCH], batch_size=BATCH, verbose=0)  # warm-up: trace predict
    times: dict[str, list[float]] = {"ours": [], "bare": [], "ours_cpu": [], "bare_cpu": []}
    predicted = None
    for rep in range(reps):
        for side in (("ours", "bare") if rep % 2 == 0 else ("bare", "ours")):
            if side == "ours":
                wall, cpu, _ = timed(lambda: extract_split(extractor, images, out_dir, "bench", BATCH))
            else:
                wall, cpu, predicted = timed(lambda: backbone.predict(x, batch_size=BATCH, verbose=0))
            times[side].append(wall)
            times[f"{side}_cpu"].append(cpu)
    final = np.load(out_dir / "bench_final.npy")
    diff = float(np.max(np.abs(final - np.asarray(predicted["final"], dtype=np.float32))))
    scale = float(np.max(np.abs(final))) or 1.0
    shutil.rmtree(out_dir, ignore_errors=True)
    return {"images": count, "batch_size": BATCH, "image_size": size, "reps": reps,
            "ours_seconds": [round(t, 3) for t in times["ours"]],
            "baseline_seconds": [round(t, 3) for t in times["bare"]],
            "ours_cpu_ms_per_image": round(1000 * statistics.median(times["ours_cpu"]) / count, 2),
            "baseline_cpu_ms_per_image": round(1000 * statistics.median(times["bare_cpu"]) / count, 2),
            "final_dim": int(final.shape[1]), "max_abs_diff_final": diff, "relative_diff_final": diff / scale}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run figure 2 for each backbone and return (and optionally write) its rows."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    quiet_tf()
    import keras

    keras.config.set_dtype_policy("float32")
    rows, details = [], {"machine": machine(), "keras_backend": keras.backend.backend()}
    for name, count in (QUICK if args.quick else FULL).items():
        log(f"features: {name}, {count} images, ours (extract_split) vs model.predict(float32)")
        info = bench_backbone(name, count, 1 if args.quick else 2)
        ours_ips = count / statistics.median(info["ours_seconds"])
        base_ips = count / statistics.median(info["baseline_seconds"])
        rows.append(row(f"2 features CPU: {name} ({count} img)", ours_ips, base_ips, "images/s",
                        f"ratio >= {TARGET_RATIO:g}", ours_ips >= TARGET_RATIO * base_ips,
                        note=f"CPU ms/img ours {info['ours_cpu_ms_per_image']:.1f} vs predict "
                             f"{info['baseline_cpu_ms_per_image']:.1f}; same features: max |diff| "
                             f"{info['max_abs_diff_final']:.2g}"))
        details[name] = info
    result = {"rows": rows, "details": details}
    if args.json:
        write_json(args.json, result)
    return result


if __name__ == "__main__":
    for line in main()["rows"]:
        print(line)
