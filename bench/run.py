"""Run the CPU benchmark suite: ``python -m bench.run [--quick] [--only 1,2,3,5,6] [--strict]``.

Each figure runs in its own fresh Python process (so TensorFlow, process pools
and memory of one figure cannot disturb another); figures 5 and 6 share one
process, because both come from the same pipeline runs. Their progress lines are
echoed, their full output goes to ``bench/out/logs/``. At the end one line per
result is printed (figure, ours, baseline, ratio, target, met?) and everything
is written atomically to ``bench/results.json``, merged with the figures of
earlier runs that this run did not repeat. Figure 4 (GPU) is separate:
``bench/gpu_run.sh``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.common import OUT_DIR, REPO_ROOT, RESULTS, format_row, machine, write_json

FIGURES = {
    "1": ("ingest throughput", "bench.ingest_bench"),
    "2": ("features on CPU", "bench.features_bench"),
    "3": ("memory", "bench.memory_bench"),
    "5": ("incremental runs", "bench.pipeline_bench"),
    "6": ("end to end", "bench.pipeline_bench"),
    "7": ("dask scale-out", "bench.dask_bench"),
    "8": ("service start-up", "bench.services_bench"),
}
MULTI_FIGURE = {"bench.pipeline_bench"}  # modules that take ``--figures``: one process for all their keys
ECHO_PREFIXES = ("[bench]", "[synth]", "Traceback", "RuntimeError", "Error")


def run_figure(keys: list[str], quick: bool) -> dict[str, Any]:
    """Run one figure module (for one or more figures) in a fresh process; return its JSON (or an error)."""
    module = FIGURES[keys[0]][1]
    key, name = "+".join(keys), " + ".join(FIGURES[k][0] for k in keys)
    result_path = OUT_DIR / "logs" / f"figure{key}.json"
    log_path = OUT_DIR / "logs" / f"figure{key}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    result_path.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", module, "--json", str(result_path), *(["--quick"] if quick else []),
           *(["--figures", ",".join(keys)] if module in MULTI_FIGURE else [])]
    env = os.environ | {"TF_CPP_MIN_LOG_LEVEL": os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2"), "PYTHONUNBUFFERED": "1"}
    start = time.perf_counter()
    with open(log_path, "w") as log, subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE,
                                                      stderr=subprocess.STDOUT, text=True) as child:
        for line in child.stdout:
            log.write(line)
            if line.startswith(ECHO_PREFIXES):
                print(line, end="", flush=True)
    seconds = round(time.perf_counter() - start, 1)
    mode = "quick" if quick else "full"
    if child.returncode != 0 or not result_path.is_file():
        return {"figure": key, "name": name, "mode": mode, "seconds": seconds,
                "error": f"exit {child.returncode}, see {log_path}", "rows": []}
    return {"figure": key, "name": name, "mode": mode, "seconds": seconds, **json.loads(result_path.read_text())}


def merge_previous(path: Path, figures: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Figures of the results file at ``path`` that this run did not repeat, then this run's figures."""
    try:
        previous = json.loads(path.read_text())
    except (OSError, ValueError):
        return figures
    done = {k for figure in figures for k in figure["figure"].split("+")}
    kept = [{"mode": previous.get("mode"), **figure} for figure in previous.get("figures", [])
            if not done & set(str(figure.get("figure", "")).split("+"))]
    return sorted(kept + figures, key=lambda figure: figure["figure"])


def main(argv: list[str] | None = None) -> int:
    """Run the selected figures, print the table, write ``bench/results.json``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller run (well under the full one)")
    parser.add_argument("--only", default=",".join(FIGURES), help="comma-separated figures, e.g. 1,3")
    parser.add_argument("--strict", action="store_true", help="exit 1 when a target is missed")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    keys = [k.strip() for k in args.only.split(",") if k.strip()]
    unknown = [k for k in keys if k not in FIGURES]
    if unknown:
        parser.error(f"unknown figure(s) {unknown}; choose from {sorted(FIGURES)}")
    start = time.perf_counter()
    print(f"[bench] {'quick' if args.quick else 'full'} run of figures {', '.join(keys)}", flush=True)
    groups: dict[str, list[str]] = {}  # module -> its selected keys, in order
    for key in keys:
        module = FIGURES[key][1]
        groups.setdefault(module if module in MULTI_FIGURE else key, []).append(key)
    figures = [run_figure(group, args.quick) for group in groups.values()]
    total = round(time.perf_counter() - start, 1)
    rows = [r for figure in figures for r in figure["rows"]]
    print(f"\n=== tlpipe benchmarks ({'quick' if args.quick else 'full'}, {total:.0f} s) ===")
    for r in rows:
        print(format_row(r))
    notes = [f"  {r['figure']}: {r['note']}" for r in rows if r.get("note")]
    if notes:
        print("notes:\n" + "\n".join(notes))
    for figure in figures:
        if "error" in figure:
            print(f"figure {figure['figure']} ({figure['name']}) FAILED: {figure['error']}")
    merged = merge_previous(args.output, figures)
    modes = {f.get("mode") for f in merged}
    write_json(args.output, {"mode": modes.pop() if len(modes) == 1 else "mixed", "total_seconds": total,
                             "machine": machine(), "rows": [r for f in merged for r in f["rows"]],
                             "figure_seconds": {f["figure"]: f["seconds"] for f in merged},
                             "figures": merged})
    print(f"wrote {args.output.relative_to(REPO_ROOT) if args.output.is_relative_to(REPO_ROOT) else args.output}")
    failed = any("error" in f for f in figures)
    missed = any(not r["met"] for r in rows)
    return 2 if failed else (1 if args.strict and missed else 0)


if __name__ == "__main__":
    sys.exit(main())
