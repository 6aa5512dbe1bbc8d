"""Run the CPU benchmark suite: ``python -m bench.run [--quick] [--only 1,2,3] [--strict]``.

Each figure runs in its own fresh Python process (so TensorFlow, process pools
and memory of one figure cannot disturb another); their progress lines are
echoed, their full output goes to ``bench/out/logs/``. At the end one line per
figure is printed (figure, ours, baseline, ratio, target, met?) and everything
is written atomically to ``bench/results.json``. Figure 4 (GPU) is separate:
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
}
ECHO_PREFIXES = ("[bench]", "[synth]", "Traceback", "RuntimeError", "Error")


def run_figure(key: str, quick: bool) -> dict[str, Any]:
    """Run one figure module in a fresh process; return its JSON (or an error record)."""
    name, module = FIGURES[key]
    result_path = OUT_DIR / "logs" / f"figure{key}.json"
    log_path = OUT_DIR / "logs" / f"figure{key}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    result_path.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", module, "--json", str(result_path), *(["--quick"] if quick else [])]
    env = os.environ | {"TF_CPP_MIN_LOG_LEVEL": os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2"), "PYTHONUNBUFFERED": "1"}
    start = time.perf_counter()
    with open(log_path, "w") as log, subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE,
                                                      stderr=subprocess.STDOUT, text=True) as child:
        for line in child.stdout:
            log.write(line)
            if line.startswith(ECHO_PREFIXES):
                print(line, end="", flush=True)
    seconds = round(time.perf_counter() - start, 1)
    if child.returncode != 0 or not result_path.is_file():
        return {"figure": key, "name": name, "seconds": seconds, "error": f"exit {child.returncode}, see {log_path}",
                "rows": []}
    return {"figure": key, "name": name, "seconds": seconds, **json.loads(result_path.read_text())}


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
    figures = [run_figure(key, args.quick) for key in keys]
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
    write_json(args.output, {"mode": "quick" if args.quick else "full", "total_seconds": total,
                             "machine": machine(), "rows": rows,
                             "figure_seconds": {f["figure"]: f["seconds"] for f in figures},
                             "figures": figures})
    print(f"wrote {args.output.relative_to(REPO_ROOT) if args.output.is_relative_to(REPO_ROOT) else args.output}")
    failed = any("error" in f for f in figures)
    missed = any(not r["met"] for r in rows)
    return 2 if failed else (1 if args.strict and missed else 0)


if __name__ == "__main__":
    sys.exit(main())
