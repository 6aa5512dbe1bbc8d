"""Figure 7: ingest and features on Dask (1 and 2 workers) against the embedded local path, side by side.

Ours here is the Dask path: :func:`tlpipe.data.ingest.ingest` and :func:`tlpipe.features.extraction.extract_features`
given a ``distributed.Client`` on a ``LocalCluster`` of 1 or 2 single-threaded worker processes. The
baseline is the embedded local path of the same functions in the same process: ingest with one decode
process (against 1 Dask worker) and with every core (the default; against 2 workers), features in this
process (TensorFlow on every core). Every side runs on the same files from a warm page cache.

Each cluster is started once (its start-up is timed and reported, not counted in throughput); on it, each
workload runs once to warm the workers (imports; for features also TensorFlow and the model load) and then
``reps`` timed times; the figure is the median of the timed runs. The local sides run ``reps`` times too,
alternating with the Dask sides (local, Dask 1, Dask 2, local, ...) so load from other processes on the
shared cores hits every side alike. Overhead per image = (Dask seconds - local seconds) / images: what
Dask adds per image on one machine (task scheduling, shard files, in-place writes, result transfer).
Every Dask output is checked byte for byte against the local one (the ``.npy`` and CSV files).

Run alone: ``python -m bench.dask_bench [--quick] [--json PATH]``.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

from bench import synth
from bench.common import HYMENOPTERA, OUT_DIR, log, machine, quiet_tf, row, warm_page_cache, write_json
from tlpipe.core.params import DataParams, FeaturesParams
from tlpipe.core.sources import SourceListing, list_folder

SIZE = 224
WORKERS = (1, 2)


def digests(folder: Path, suffixes: tuple[str, ...] = (".npy", ".csv")) -> dict[str, str]:
    """SHA-256 of the data files of an output folder (meta/model files hold timings and save dates)."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())
            if p.suffix in suffixes}


def process_cpu() -> float:
    """CPU seconds (user + system) of the calling process, its threads and its reaped children."""
    times = os.times()
    return times.user + times.system + times.children_user + times.children_system


def cluster_cpu(client) -> float:
    """CPU seconds used so far by every worker process of the client's cluster."""
    return sum(client.run(process_cpu).values()) if client is not None else 0.0


def timed(fn, client=None) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process, its children and the cluster's workers) of ``fn()``."""
    cpu, workers_cpu, wall = process_cpu(), cluster_cpu(client), time.perf_counter()
    fn()
    wall = time.perf_counter() - wall
    return wall, process_cpu() - cpu + cluster_cpu(client) - workers_cpu


def timed_ingest(listing: SourceListing, out: Path, workers: int, client=None) -> tuple[float, float]:
    """Wall and CPU seconds of one ingest of ``listing`` into ``out``."""
    from tlpipe.data.ingest import ingest

    params = DataParams(source="bench", max_per_class=None, image_size=SIZE, workers=workers)
    return timed(lambda: ingest(listing, params, out, client=client), client)


def timed_features(store_dir: Path, out: Path, client=None) -> tuple[float, float]:
    """Wall and CPU seconds of one features extraction (model build included, as in the stage)."""
    from tlpipe.features.extraction import extract_features

    params = FeaturesParams(batch_size=32, mixed_precision="off")
    return timed(lambda: extract_features(store_dir, out, params, client=client), client)


def datasets(quick: bool) -> dict[str, SourceListing]:
    """Hymenoptera (all files); synthetic photo-sized JPEGs too in the full run (1000; also when no hymenoptera)."""
    sets = {}
    if HYMENOPTERA is not None:
        sets["hymenoptera"] = list_folder(HYMENOPTERA)
    else:
        log("hymenoptera not found (set TLPIPE_BENCH_HYMENOPTERA): synthetic data only")
    if not quick or not sets:
        photos = synth.ensure_set(synth.PHOTO, 200 if quick else 1000)
        sets[f"synthetic {len(photos)} x 1600x1200"] = synth.listing(photos)
    return sets


def measure(quick: bool) -> dict[str, Any]:
    """Run every side; return seconds per side and repetition, cluster start-ups and equality checks."""
    from tlpipe.ops.cluster import dask_client

    reps = 1 if quick else 2
    sets = datasets(quick)
    for listing in sets.values():
        warm_page_cache(c.path for c in listing.candidates)
    work = OUT_DIR / "dask"
    shutil.rmtree(work, ignore_errors=True)
    seconds: dict[str, list[float]] = {}
    cpu: dict[str, list[float]] = {}

    def note(key: str, measured: tuple[float, float]) -> None:
        seconds.setdefault(key, []).append(round(measured[0], 3))
        cpu.setdefault(key, []).append(round(measured[1], 3))

    feature_store = work / "local" / f"store_{next(iter(sets)).split()[0]}"
    checks: dict[str, bool] = {}

    def local_round() -> None:
        for name, listing in sets.items():
            key = name.split()[0]
            note(f"ingest {key} local 1 process", timed_ingest(listing, work / "local" / f"store1_{key}", 1))
            note(f"ingest {key} local all cores", timed_ingest(listing, work / "local" / f"store_{key}", 0))
        note("features local", timed_features(feature_store, work / "local" / "features"))

    log(f"local path, warm-up and {reps} timed round(s)")
    local_round()  # warm-up: imports, TensorFlow, page cache
    seconds.clear()
    cpu.clear()
    starts: dict[int, float] = {}
    clusters = {}
    try:
        for workers in WORKERS:  # start both clusters up front, so rounds can alternate
            start = time.perf_counter()
            context = dask_client(f"local:{workers}")
            clusters[workers] = (context, context.__enter__()[0])
            starts[workers] = round(time.perf_counter() - start, 2)
            log(f"LocalCluster with {workers} worker(s) up in {starts[workers]:.1f} s")
        for rep in range(reps + 1):  # round 0 warms the workers up
            if rep:
                local_round()
            for workers, (_, client) in clusters.items():
                prefix = "warm-up " if rep == 0 else ""
                for name, listing in sets.items():
                    key = name.split()[0]
                    out = work / f"dask{workers}" / f"store_{key}"
                    note(f"{prefix}ingest {key} dask {workers}", timed_ingest(listing, out, 1, client))
                    checks[f"ingest {key} dask {workers}"] = digests(out) == digests(work / "local" / f"store_{key}")
                out = work / f"dask{workers}" / "features"
                note(f"{prefix}features dask {workers}", timed_features(feature_store, out, client))
                checks[f"features dask {workers}"] = digests(out) == digests(work / "local" / "features")
                log(f"round {rep}: dask {workers} done")
    finally:
        for context, _ in clusters.values():
            context.__exit__(None, None, None)
    images = {name.split()[0]: len(listing.candidates) for name, listing in sets.items()}
    from tlpipe.data import store

    images["features"] = sum(store.npy_rows(store.split_path(feature_store, s)) for s in store.SPLITS)
    shutil.rmtree(work, ignore_errors=True)
    return {"seconds": seconds, "cpu_seconds": cpu, "cluster_start_seconds": starts, "images": images, "identical": checks,
            "reps": reps, "sets": list(sets)}


def rows_from(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Result rows: each workload on a fresh LocalCluster of N workers, as a stage with ``local:N`` runs it
    (cluster start-up + the first run on fresh workers), against the local path (its default, every core).

    Notes add the warm figures (a long-lived cluster, as ``tcp://`` gives): warm images/s, the wall overhead
    per image against the local side using the same cores (1 decode process for 1 worker, every core for 2),
    and CPU ms per image against the local path in one process (the same work; the pool's children of the
    default path are not in this process tree, so its CPU is not measured).
    """
    med = {key: statistics.median(values) for key, values in result["seconds"].items()}
    cpu = {key: statistics.median(values) for key, values in result["cpu_seconds"].items()}
    images, rows = result["images"], []
    starts = {int(k): v for k, v in result["cluster_start_seconds"].items()}  # int keys (str after JSON)
    for label, key in [*((f"ingest {k}", k) for k in images if k != "features"), ("features", "features")]:
        n = images[key]
        local_default = med[f"{label} local all cores"] if label != "features" else med["features local"]
        local_one = med[f"{label} local 1 process"] if label != "features" else med["features local"]
        local_cpu = cpu[f"{label} local 1 process"] if label != "features" else cpu["features local"]
        for workers in WORKERS:
            warm = med[f"{label} dask {workers}"]
            cold = starts[workers] + result["seconds"][f"warm-up {label} dask {workers}"][0]
            same_cores = local_one if workers == 1 else local_default
            dask_cpu = 1000 * cpu[f"{label} dask {workers}"] / n
            same = result["identical"].get(f"{label} dask {workers}")
            rows.append(row(
                f"7 {label}: local:{workers} stage vs local path", n / cold, n / local_default, "images/s",
                "ratio <= 1 (local fastest)", n / cold <= n / local_default,
                warm_images_per_second=round(n / warm, 2), overhead_ms_per_image=round(1000 * (warm - same_cores) / n, 2),
                cpu_ms_per_image_dask=round(dask_cpu, 2), cpu_ms_per_image_local=round(1000 * local_cpu / n, 2),
                images=n, identical=same,
                note=f"{n} images; stage {cold:.1f} s (cluster start {starts[workers]:.1f} s "
                     f"+ fresh workers) vs local {local_default:.1f} s; warm {n / warm:.1f} images/s, wall overhead "
                     f"{1000 * (warm - same_cores) / n:+.1f} ms/image vs local on the same cores; CPU "
                     f"{dask_cpu:.1f} vs {1000 * local_cpu / n:.1f} ms/image (Dask - local, one process: "
                     f"{dask_cpu - 1000 * local_cpu / n:+.1f}); outputs {'identical' if same else 'DIFFER'}"))
    return rows


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run figure 7 and return (and optionally write) its rows and details."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    quiet_tf()
    details = {"machine": machine(), **measure(args.quick)}
    result = {"rows": rows_from(details), "details": details}
    if args.json:
        write_json(args.json, result)
    return result


if __name__ == "__main__":
    for line in main()["rows"]:
        print(line)
