"""Shared helpers of the benchmark suite: paths, result rows, atomic JSON, machine facts."""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
OUT_DIR = BENCH_DIR / "out"  # generated data; must be git-ignored
RESULTS = BENCH_DIR / "results.json"
def find_hymenoptera() -> Path | None:
    """``$TLPIPE_BENCH_HYMENOPTERA``, else ``../shared/data/hymenoptera`` beside the checkout or in /work."""
    candidates = [os.environ.get("TLPIPE_BENCH_HYMENOPTERA"), REPO_ROOT.parent / "shared" / "data" / "hymenoptera",
                  Path("/work/shared/data/hymenoptera")]
    return next((Path(c) for c in candidates if c and Path(c).is_dir()), None)


HYMENOPTERA = find_hymenoptera()


def quiet_tf() -> None:
    """Silence TensorFlow's C++ start-up chatter (before TF is imported)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def row(
    figure: str, ours: float, baseline: float, unit: str, target: str, met: bool,
    ratio: float | None = None, **extra: Any,
) -> dict[str, Any]:
    """One result line: ``ratio`` defaults to ours / baseline."""
    if ratio is None:
        ratio = ours / baseline if baseline else float("nan")
    return {"figure": figure, "ours": round(float(ours), 3), "baseline": round(float(baseline), 3),
            "unit": unit, "ratio": round(float(ratio), 3), "target": target, "met": bool(met), **extra}


def format_row(r: dict[str, Any]) -> str:
    """Render a result row as one fixed-width line."""
    verdict = "MET" if r["met"] else "MISSED"
    return (f"{r['figure']:<38} ours={r['ours']:>10.2f} baseline={r['baseline']:>10.2f} {r['unit']:<10} "
            f"ratio={r['ratio']:>6.2f}  target {r['target']:<26} {verdict}")


def write_json(path: Path, payload: Any) -> None:
    """Write JSON atomically (the project's one atomic writer, :func:`tlpipe.core.files.write_atomic`)."""
    from tlpipe.core.files import write_atomic

    write_atomic(path, json.dumps(payload, indent=2, sort_keys=False, default=str) + "\n")


def machine() -> dict[str, Any]:
    """Facts that qualify every figure: cores, load, Python."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"cores": cores, "loadavg_1m": round(os.getloadavg()[0], 2), "python": platform.python_version(),
            "platform": platform.platform(), "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def warm_page_cache(paths: Iterable[Path]) -> int:
    """Read every file once so neither side of a comparison pays for cold disk reads."""
    total = 0
    for path in paths:
        total += len(Path(path).read_bytes())
    return total


def cpu_seconds() -> float:
    """CPU time of this process (all threads) plus its waited-for children, user + system."""
    times = os.times()
    return times.user + times.system + times.children_user + times.children_system


def timed(fn: Callable[[], Any]) -> tuple[float, float, Any]:
    """Run ``fn`` once; return (wall seconds, CPU seconds incl. finished children, result).

    CPU time barely depends on what else runs on the shared cores, so it is the
    steadier cost figure; wall time is the throughput a user sees.
    """
    wall, cpu = time.perf_counter(), cpu_seconds()
    result = fn()
    return time.perf_counter() - wall, cpu_seconds() - cpu, result


def log(message: str) -> None:
    """Progress line on stderr-like stdout, flushed (figures print only through run.py)."""
    print(f"[bench] {message}", flush=True)
