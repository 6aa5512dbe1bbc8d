"""Figure 3: peak memory vs data size, ours (streaming) vs the course's load-everything.

For each N (1k, 4k, 16k small synthetic JPEGs; ``--quick``: 1k, 4k) three fresh
subprocesses run one after another, each measured on its own:

* ``ingest``: our ingest core (all cores) writes a uint8 store of ``SIZE`` px images;
* ``features``: our features stage (:func:`tlpipe.features.extraction.extract_features`,
  efficientnet_lite0, random weights) streams that store;
* ``course``: ``load_img`` + ``img_to_array`` of every file into a list, then
  ``np.array`` (the course's notebook), then ``model.predict`` through the same
  backbone. Its peak after loading is the comparison for our ingest, its peak
  after predicting the comparison for our features stage.

Peak memory (MB): the kernel's high-water mark of the measured process,
``getrusage(RUSAGE_SELF).ru_maxrss``; for ingest plus the peak of its decode
workers' private memory (USS, summed over workers, sampled by the parent with
psutil every 0.1 s): the workers are forked and share the parent's pages, so
adding their RSS would count those pages once per worker. The sampled tree RSS
and PSS peaks are kept in the details. (``ru_maxrss`` of children is kept too, but
for the TensorFlow points it is an artefact: a ``uname -p`` spawned by
``platform`` inherits the parent's high-water mark across ``exec``.)

Memory does not depend on CPU speed, so to save wall time up to three measured
chains run at once, (ingest -> features) and (course) for each N; their
``seconds`` are therefore not throughput figures.

Run alone: ``python -m bench.memory_bench [--quick] [--json PATH]``.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import psutil

from bench import synth
from bench.common import OUT_DIR, REPO_ROOT, log, machine, quiet_tf, row, write_json

SIZE = 64  # same at every N; small so that 16k images run through Lite0 in about a minute
BATCH = 32
FULL_NS = (1000, 4000, 16000)
QUICK_NS = (1000, 4000)
TARGET_GROWTH = 0.20
WORK = OUT_DIR / "memory"


def maxrss_mb(who: int = resource.RUSAGE_SELF) -> float:
    """Kernel high-water mark of resident memory (Linux reports KiB), in MB."""
    return resource.getrusage(who).ru_maxrss * 1024 / 1e6


def tree_sample(process: psutil.Process) -> dict[str, float]:
    """MB over a process and its descendants: summed RSS and PSS, and the descendants' summed USS."""
    sample = {"tree_rss_peak_mb": 0.0, "tree_pss_peak_mb": 0.0, "children_uss_peak_mb": 0.0}
    for proc in [process, *process.children(recursive=True)]:
        try:
            info = proc.memory_full_info()
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
        sample["tree_rss_peak_mb"] += info.rss / 1e6
        sample["tree_pss_peak_mb"] += info.pss / 1e6
        if proc.pid != process.pid:
            sample["children_uss_peak_mb"] += info.uss / 1e6
    return sample


def run_measured(args: list[str], interval: float = 0.1) -> dict[str, Any]:
    """Run ``python -m bench.memory_bench <args>`` in a fresh process, sampling its tree's memory."""
    result_path = WORK / f".point-{time.monotonic_ns()}.json"
    cmd = [sys.executable, "-m", "bench.memory_bench", *args, "--result", str(result_path)]
    child = subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peaks = {"tree_rss_peak_mb": 0.0, "tree_pss_peak_mb": 0.0, "children_uss_peak_mb": 0.0}
    output: list[str] = []
    reader = threading.Thread(target=lambda: output.extend(child.stdout), daemon=True)
    reader.start()
    process = psutil.Process(child.pid)
    while child.poll() is None:
        try:
            sample = tree_sample(process)
        except psutil.NoSuchProcess:
            break
        peaks = {k: max(v, sample[k]) for k, v in peaks.items()}
        time.sleep(interval)
    child.wait()
    reader.join(timeout=5)
    if child.returncode != 0:
        raise RuntimeError(f"memory point {args} failed ({child.returncode}):\n{''.join(output[-40:])}")
    point = json.loads(result_path.read_text())
    result_path.unlink()
    return point | {k: round(v, 1) for k, v in peaks.items()}


# ---- the three measured programs (each runs in its own fresh process) ----

def point_ingest(count: int, store_dir: Path) -> dict[str, Any]:
    """Our ingest of the first ``count`` small synthetic files into ``store_dir``."""
    from tlpipe.core.params import DataParams
    from tlpipe.data.ingest import ingest

    paths = synth.ensure_set(synth.SMALL, count)
    params = DataParams(source="bench", max_per_class=None, image_size=SIZE, workers=0)
    start = time.perf_counter()
    report = ingest(synth.listing(paths), params, store_dir)
    return {"seconds": time.perf_counter() - start, "images": report["images_kept"]}


def point_features(store_dir: Path, out_dir: Path) -> dict[str, Any]:
    """Our features stage (Lite0, random weights, float32) over the store at ``store_dir``."""
    quiet_tf()
    from tlpipe.core.params import FeaturesParams
    from tlpipe.features.extraction import extract_features

    params = FeaturesParams(backbone="efficientnet_lite0", weights="none", batch_size=BATCH, mixed_precision="off")
    start = time.perf_counter()
    meta = extract_features(store_dir, out_dir, params)
    return {"seconds": time.perf_counter() - start, "images": sum(meta["counts"].values())}


def point_course(count: int) -> dict[str, Any]:
    """The course: every image into one float32 array, then ``model.predict`` on it."""
    quiet_tf()
    import numpy as np
    from keras.utils import img_to_array, load_img

    from tlpipe.features.backbones import build_backbone

    paths = synth.ensure_set(synth.SMALL, count)
    start = time.perf_counter()
    images = []
    for path in paths:
        images.append(img_to_array(load_img(path, target_size=(SIZE, SIZE))))
    x = np.array(images)
    del images
    loaded = {"load_seconds": time.perf_counter() - start, "load_peak_mb": maxrss_mb(), "array_mb": x.nbytes / 1e6}
    model = build_backbone("efficientnet_lite0", weights=None, image_size=SIZE)
    features = model.predict(x, batch_size=BATCH, verbose=0)
    return loaded | {"seconds": time.perf_counter() - start, "images": int(features["final"].shape[0])}


def run_point(kind: str, count: int, result: Path) -> None:
    """Entry of a measured subprocess: run one program, write its timings and ``ru_maxrss``."""
    store_dir, out_dir = WORK / f"store_{count}", WORK / f"features_{count}"
    if kind == "ingest":
        info = point_ingest(count, store_dir)
    elif kind == "features":
        info = point_features(store_dir, out_dir)
    else:
        info = point_course(count)
    info |= {"maxrss_self_mb": maxrss_mb(), "maxrss_children_mb": maxrss_mb(resource.RUSAGE_CHILDREN)}
    write_json(result, {k: round(v, 2) if isinstance(v, float) else v for k, v in info.items()})


# ---- the orchestrator ----

def headline(kind: str, point: dict[str, Any]) -> float:
    """The peak that the figure reports for one measured point (see the module docstring)."""
    if kind == "ingest":
        return point["maxrss_self_mb"] + point["children_uss_peak_mb"]
    return point["maxrss_self_mb"]


def measure_chain(count: int, kinds: tuple[str, ...]) -> dict[str, dict[str, Any]]:
    """Run the programs of one chain at one N in order (each in a fresh process)."""
    log(f"memory: N={count} ({SIZE} px): {' -> '.join(kinds)}")
    return {kind: run_measured(["--point", kind, "--n", str(count)]) for kind in kinds}


def measure(counts: tuple[int, ...], parallel: int = 3) -> dict[int, dict[str, dict[str, Any]]]:
    """Measure the three programs at every N, ``parallel`` chains at a time; return points[N][kind].

    Chains start longest first (ours before the course's at the same N: our
    features stage pays the TensorFlow start-up after ingest), so that the
    cores stay busy until the end.
    """
    synth.ensure_set(synth.SMALL, max(counts))
    WORK.mkdir(parents=True, exist_ok=True)
    chains = [(n, kinds) for n in sorted(counts, reverse=True) for kinds in (("ingest", "features"), ("course",))]
    points: dict[int, dict[str, dict[str, Any]]] = {n: {} for n in counts}
    with ThreadPoolExecutor(parallel) as pool:
        for (count, _), result in zip(chains, pool.map(lambda chain: measure_chain(*chain), chains), strict=True):
            points[count] |= result
    for count in counts:
        shutil.rmtree(WORK / f"store_{count}", ignore_errors=True)
        shutil.rmtree(WORK / f"features_{count}", ignore_errors=True)
    return points


def growth(values: list[float]) -> float:
    """Relative growth from the first to the last value."""
    return values[-1] / values[0] - 1.0


def summarize(points: dict[int, dict[str, dict[str, Any]]]) -> list[dict[str, Any]]:
    """Two rows: our ingest vs the course's load, our features vs the course's load + predict."""
    counts = sorted(points)
    rows = []
    for label, ours_kind, course_key in (("ingest", "ingest", "load_peak_mb"), ("features", "features", None)):
        ours = [headline(ours_kind, points[n][ours_kind]) for n in counts]
        course = [points[n]["course"][course_key] if course_key else headline("course", points[n]["course"])
                  for n in counts]
        span = f"{counts[0] // 1000}k->{counts[-1] // 1000}k"
        rows.append(row(f"3 memory: {label} peak MB @ {counts[-1] // 1000}k", ours[-1], course[-1], "MB",
                        f"ours growth {span} < {TARGET_GROWTH:.0%}", growth(ours) < TARGET_GROWTH,
                        note=f"growth {span}: ours {growth(ours):+.0%}, course {growth(course):+.0%}; "
                             f"ours {'/'.join(f'{v:.0f}' for v in ours)} MB, "
                             f"course {'/'.join(f'{v:.0f}' for v in course)} MB",
                        ours_by_n=dict(zip(counts, ours, strict=True)),
                        baseline_by_n=dict(zip(counts, course, strict=True))))
    return rows


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run figure 3 (or, with ``--point``, one measured program) and return its rows."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--point", choices=("ingest", "features", "course"), help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.point:
        run_point(args.point, args.n, args.result)
        return {}
    points = measure(QUICK_NS if args.quick else FULL_NS)
    result = {"rows": summarize(points),
              "details": {"machine": machine(), "image_size": SIZE, "source": f"{synth.SMALL.width}x"
                          f"{synth.SMALL.height} JPEG q{synth.SMALL.quality}", "points": points}}
    if args.json:
        write_json(args.json, result)
    return result


if __name__ == "__main__":
    for line in main().get("rows", []):
        print(line)
