"""Figures 5 and 6: the DVC pipeline end to end, then incremental re-runs, in a temp copy of the project.

The project's code, ``dvc.yaml`` and ``params.yaml`` are copied into a temp folder that becomes
its own git + DVC repo (as ``tests/conftest.make_project`` does). Every DVC call there runs
``python -m dvc`` with the venv's ``bin`` first on ``PATH`` (so ``dvc.yaml``'s ``python -m
flows.<stage>`` is this venv), telemetry off, ``TF_CPP_MIN_LOG_LEVEL=2``, and
``PREFECT_API_URL`` unset: as in a user's first ``dvc repro``, the first stage starts the
project's own Prefect server (``tlpipe.ops.prefect_server``, in ``<temp project>/.prefect``) and the
later stages reuse it; the bench stops it at the end. ``PREFECT_HOME`` is a temp folder (its
database is created by an unmeasured warm-up flow first), so the bench never touches ``~/.prefect``.

* Figure 6, end to end: wall time of the first full ``dvc repro``, per stage and in total.
  The output streams from the subprocess; each ``Running stage 'x'`` line is timestamped,
  and a stage lasts until the next one starts or DVC exits (so it includes DVC's caching of
  its outputs). Within each stage, Prefect's ``Starting temporary server`` and ``Beginning
  flow run`` lines split off the wait for the ephemeral server. Target: at most 15 min on
  the default data (ELPV, ``params.yaml`` as committed). ``--quick`` runs a tiny generated
  class-folder source instead (``tests/conftest.make_source``: 2 classes x 12 images at
  48 px, with ``TINY_PARAMS``: image size 32, 2 epochs), so its total is not the target's.
* Figure 5, incremental: (a) a no-op ``dvc repro`` right after (must run no stage), against
  ``python -m dvc --version`` (DVC's start-up floor); (b) ``dvc repro`` after changing only
  ``svm.c_grid.num`` (13 -> 7; ``--quick``: 3 -> 2) in ``params.yaml``: only ``svm`` and
  ``evaluate`` may run, against the full first run (ratio = incremental / full).
* Prefect's own cost per stage process, on a tiny source in a second temp project:
  ``python -m flows.ingest`` with the project's server (the default: started once, before
  timing) vs Prefect's per-process ephemeral server (``TLPIPE_PREFECT_SERVER=ephemeral``, the
  old default) vs a ``prefect server start`` the bench starts (``PREFECT_API_URL``) vs the
  same steps without Prefect (each task's ``.fn``, MLflow logging kept) vs the core
  ``tlpipe.data.ingest.ingest`` only; and a do-nothing flow vs ``python -c pass``. Each variant is
  a fresh process, alternating, median of ``REPS``. Target: the default's overhead over the
  no-Prefect path at most 2 s per stage process.

Run alone: ``python -m bench.pipeline_bench [--quick] [--figures 5,6] [--json PATH] [--keep]``.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from bench.common import OUT_DIR, REPO_ROOT, log, machine, row, write_json

STAGES = ("ingest", "features", "svm", "finetune", "evaluate")
INCREMENTAL_EXPECTED = ["svm", "evaluate"]
TARGET_SECONDS = 15 * 60
OVERHEAD_TARGET_SECONDS = 2.0
STAGE_LINE = re.compile(r"Running stage '([^']+)'")  # as tasks/pipeline.STAGE_LINE
SERVER_START = re.compile(r"Starting temporary server on")
FLOW_BEGIN = re.compile(r"Flow run '[^']+' - Beginning flow run")
FLOW_END = re.compile(r"Flow run '[^']+' - Finished in state")
REPRO_TIMEOUT = 45 * 60
TELEMETRY_OFF = {"DVC_NO_ANALYTICS": "1", "DO_NOT_TRACK": "1", "MLFLOW_DISABLE_TELEMETRY": "true",
                 "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
DROP_ENV = ("PREFECT_API_URL", "PREFECT_PROFILE", "MLFLOW_TRACKING_URI", "TLPIPE_PARENT_RUN_ID", "TLPIPE_ROOT")

NOOP_FLOW = "from prefect import flow\nflow(name='noop')(lambda: None)()\n"
ENSURE_SERVER = "from tlpipe.ops.prefect_server import ensure_server\nprint(ensure_server('.'))\n"
INGEST_NO_PREFECT = """\
import time
from tlpipe.tracking.runs import stage_run
from tlpipe.core.params import load_params
from tlpipe.core.paths import project_paths
from tasks.ingest import build_store, list_source_files, log_ingest, write_data_report
paths = project_paths()
params = load_params(paths.params)
with stage_run("ingest", paths.root, {"data": params.data.model_dump()}) as run_id:
    start = time.perf_counter()
    listing = list_source_files.fn(params.data)
    report = build_store.fn(listing, params.data, paths.store)
    artifacts = write_data_report.fn(report, paths.reports("ingest"), paths.metrics / "ingest.json")
    log_ingest.fn(run_id, paths.root, params.data, report, artifacts, time.perf_counter() - start, paths.store)
"""  # the body of flows/ingest.py, with each task's plain function (no Prefect engine, no server)
INGEST_CORE = """\
from pathlib import Path
from tlpipe.data import ingest
from tlpipe.core.params import load_params
from tlpipe.core.sources import list_source
data = load_params("params.yaml").data
listing = list_source(data.source, data.classes, data.elpv_label, data.elpv_threshold)
ingest.ingest(listing, data, Path("data/store"))
"""


def load_conftest():
    """``tests/conftest.py`` by path (``tests`` is no package): make_source, TINY_PARAMS, PROJECT_FILES."""
    spec = importlib.util.spec_from_file_location("tlpipe_tests_conftest", REPO_ROOT / "tests" / "conftest.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses in it look their module up there
    spec.loader.exec_module(module)
    return module


def base_env(prefect_home: Path) -> dict[str, str]:
    """Environment of every command in a temp project (see the module docstring)."""
    env = {k: v for k, v in os.environ.items() if k not in DROP_ENV}
    env.update(TELEMETRY_OFF)
    env.update({"TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONUNBUFFERED": "1", "PREFECT_HOME": str(prefect_home),
                "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"})
    env.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")  # as the Makefile
    env.update({"TLPIPE_PREFECT_SERVER": "auto", "TLPIPE_PREFECT_PORT": "0"})  # the default; any free port
    env.setdefault("TLPIPE_CACHE_DIR", str(Path.home() / ".cache" / "tlpipe"))  # backbone weights
    return env


def make_project(target: Path, params_text: str, project_files: tuple[str, ...]) -> Path:
    """Copy code + pipeline into ``target``, write ``params.yaml``, and make it a git repo with one commit."""
    target.mkdir(parents=True)
    for name in project_files:
        src, dst = REPO_ROOT / name, target / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, dst)
    (target / "params.yaml").write_text(params_text)
    (target / ".gitignore").write_text("/data/\n/models/\n/reports/\n/mlflow.db\n/mlartifacts/\n")
    git = ["git", "-c", "user.name=bench", "-c", "user.email=bench@localhost"]
    for command in (["git", "init", "-q"], [*git, "add", "-A"], [*git, "commit", "-qm", "init"]):
        subprocess.run(command, cwd=target, check=True, capture_output=True)
    return target


def stop_group(process: subprocess.Popen, grace: float = 15.0) -> None:
    """Stop a process we started in its own session, and everything it started (SIGTERM, then SIGKILL)."""
    if process.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def stream(command: list[str], cwd: Path, env: dict, log_path: Path, timeout: float = REPRO_TIMEOUT,
           ) -> tuple[float, list[tuple[float, str]]]:
    """Run ``command``; return (wall seconds, [(seconds since start, line)]). Raises on failure."""
    lines: list[tuple[float, str]] = []
    start = time.perf_counter()
    with open(log_path, "a") as log_file:
        log_file.write(f"$ {' '.join(command)}\n")
        process = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                   text=True, bufsize=1, start_new_session=True)
        try:
            for line in process.stdout:
                now = time.perf_counter() - start
                lines.append((now, line.rstrip("\n")))
                log_file.write(f"[{now:8.2f}] {line}")
                if now > timeout:
                    raise TimeoutError(f"{' '.join(command)} ran past {timeout:.0f} s")
            process.wait(timeout=max(1.0, timeout - (time.perf_counter() - start)))
        finally:
            stop_group(process)
            process.stdout.close()
    seconds = time.perf_counter() - start
    if process.returncode != 0:
        tail = "\n".join(text for _, text in lines[-40:])
        raise RuntimeError(f"{' '.join(command)} failed (exit {process.returncode}), log {log_path}:\n{tail}")
    return seconds, lines


def stage_breakdown(seconds: float, lines: list[tuple[float, str]]) -> dict[str, Any]:
    """Stages that ran, each one's wall time and Prefect phases, from timestamped DVC output."""
    starts = [(t, m.group(1)) for t, text in lines if (m := STAGE_LINE.search(text))]
    stages: dict[str, dict[str, float]] = {}
    for i, (begin, name) in enumerate(starts):
        end = starts[i + 1][0] if i + 1 < len(starts) else seconds
        inside = [(t, text) for t, text in lines if begin <= t < end]
        info = {"seconds": end - begin}
        server = next((t for t, text in inside if SERVER_START.search(text)), None)
        flow_begin = next((t for t, text in inside if FLOW_BEGIN.search(text)), None)
        flow_end = next((t for t, text in inside if FLOW_END.search(text)), None)
        if server is not None and flow_begin is not None:
            info["to_server_start"] = server - begin  # interpreter + imports until the flow is called
            info["server_wait"] = flow_begin - server  # ephemeral server start-up + flow run creation
        if flow_begin is not None and flow_end is not None:
            info["flow_run"] = flow_end - flow_begin  # the stage's work, under Prefect
            info["after_flow"] = end - flow_end  # server stop, process exit, DVC caching the outputs
        stages[name] = {k: round(v, 2) for k, v in info.items()}
    return {"seconds": round(seconds, 2), "before_first_stage": round(starts[0][0], 2) if starts else None,
            "ran": [name for _, name in starts], "stages": stages}


def timed_run(command: list[str], cwd: Path, env: dict, log_path: Path, timeout: float = 900) -> float:
    """Wall seconds of one command (a fresh process). Raises on failure."""
    return stream(command, cwd, env, log_path, timeout)[0]


def median(values: list[float]) -> float:
    """Median, NaN when empty."""
    return statistics.median(values) if values else float("nan")


def free_port() -> int:
    """A local TCP port that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def stop_project_server(project: Path) -> None:
    """Stop the project's Prefect server if a stage started one (``tlpipe.ops.prefect_server``)."""
    from tlpipe.ops.prefect_server import stop_server

    if stop_server(project):
        log(f"stopped the project Prefect server of {project}")


def start_prefect_server(home: Path, env: dict, log_path: Path,
                         timeout: float = 180) -> tuple[subprocess.Popen, str, float]:
    """``prefect server start`` on a free local port; return (process, API URL, seconds until healthy)."""
    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    server_env = {**env, "PREFECT_HOME": str(home), "PREFECT_UI_ENABLED": "false"}
    start = time.perf_counter()
    with open(log_path, "w") as server_log:
        process = subprocess.Popen([str(Path(sys.executable).parent / "prefect"), "server", "start", "--host",
                                    "127.0.0.1", "--port", str(port)], env=server_env, stdout=server_log,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    try:
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"prefect server exited with {process.returncode}, see {log_path}")
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                    if response.status == 200:
                        return process, url, time.perf_counter() - start
            except OSError:
                pass
            if time.perf_counter() - start > timeout:
                raise TimeoutError(f"prefect server not healthy after {timeout:.0f} s, see {log_path}")
            time.sleep(0.5)
    except BaseException:
        stop_group(process)
        raise


def prefect_overhead(work: Path, source: Path, env: dict, conftest, reps: int, logs: Path) -> dict[str, Any]:
    """Per-process cost of Prefect: ingest flow (ephemeral / server) vs no Prefect vs core; no-op flow."""
    params = conftest.deep_update(yaml.safe_load((REPO_ROOT / "params.yaml").read_text()),
                                  conftest.deep_update(conftest.TINY_PARAMS, {"data": {"source": str(source)}}))
    project = make_project(work / "overhead", yaml.safe_dump(params, sort_keys=False), conftest.PROJECT_FILES)
    py = sys.executable
    log_path = logs / "overhead.log"
    log("prefect overhead: warm-up (MLflow store, bytecode)")
    timed_run([py, "-c", INGEST_NO_PREFECT], project, env, log_path)
    server = None
    try:
        log("prefect overhead: starting a Prefect server")
        server, url, server_start = start_prefect_server(work / "prefect-server-home", env, logs / "prefect_server.log")
        server_env = {**env, "PREFECT_API_URL": url}
        ephemeral_env = {**env, "TLPIPE_PREFECT_SERVER": "ephemeral"}
        project_env = {**env, "TLPIPE_PREFECT_SERVER": "auto", "TLPIPE_PREFECT_PORT": "0"}
        log("prefect overhead: starting the project's server (what the first stage of a user's dvc repro does)")
        project_server_start = timed_run([py, "-c", ENSURE_SERVER], project, project_env, log_path)
        variants = {
            "python -c pass": ([py, "-c", "pass"], env),
            "noop flow, ephemeral": ([py, "-c", NOOP_FLOW], env),
            "noop flow, server": ([py, "-c", NOOP_FLOW], server_env),
            "ingest flow, project server": ([py, "-m", "flows.ingest"], project_env),
            "ingest flow, ephemeral": ([py, "-m", "flows.ingest"], ephemeral_env),
            "ingest flow, server": ([py, "-m", "flows.ingest"], server_env),
            "ingest, no Prefect": ([py, "-c", INGEST_NO_PREFECT], env),
            "ingest core only": ([py, "-c", INGEST_CORE], env),
        }
        times: dict[str, list[float]] = {name: [] for name in variants}
        for rep in range(reps):
            order = list(variants) if rep % 2 == 0 else list(reversed(variants))
            for name in order:
                command, variant_env = variants[name]
                times[name].append(timed_run(command, project, variant_env, log_path))
            log(f"prefect overhead: rep {rep + 1}/{reps}: "
                + ", ".join(f"{name} {times[name][-1]:.1f}" for name in variants))
    finally:
        if server is not None:
            stop_group(server)
        stop_project_server(project)
    med = {name: round(median(values), 2) for name, values in times.items()}
    return {"reps": reps, "server_start_seconds": round(server_start, 2),
            "project_server_start_seconds": round(project_server_start, 2), "median_seconds": med,
            "project_server_overhead_per_stage": round(
                med["ingest flow, project server"] - med["ingest, no Prefect"], 2),
            "all_seconds": {k: [round(v, 2) for v in values] for k, values in times.items()},
            "ephemeral_overhead_per_stage": round(med["ingest flow, ephemeral"] - med["ingest, no Prefect"], 2),
            "server_overhead_per_stage": round(med["ingest flow, server"] - med["ingest, no Prefect"], 2),
            "ephemeral_minus_server": round(med["ingest flow, ephemeral"] - med["ingest flow, server"], 2),
            "noop_flow_ephemeral_minus_python": round(med["noop flow, ephemeral"] - med["python -c pass"], 2),
            "noop_flow_server_minus_python": round(med["noop flow, server"] - med["python -c pass"], 2)}


def change_svm_grid(params_path: Path) -> tuple[int, int]:
    """Change only ``svm.c_grid.num`` (13 -> 7, 3 -> 2); return (old, new)."""
    params = yaml.safe_load(params_path.read_text())
    old = int(params["svm"]["c_grid"]["num"])
    new = max(2, (old + 1) // 2)
    params["svm"]["c_grid"]["num"] = new
    params_path.write_text(yaml.safe_dump(params, sort_keys=False))
    return old, new


def measure(quick: bool, figures: set[str], work: Path, logs: Path) -> dict[str, Any]:
    """Everything the figures need, in ``work``; returns the raw measurements."""
    conftest = load_conftest()
    env = base_env(work / "prefect-home")
    py = sys.executable
    result: dict[str, Any] = {"mode": "quick" if quick else "full"}
    log("warm-up: first Prefect flow with a fresh PREFECT_HOME (creates its database)")
    result["prefect_first_flow_seconds"] = round(timed_run([py, "-c", NOOP_FLOW], work, env, logs / "warmup.log"), 2)

    defaults = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    if quick:
        source = conftest.make_source(work / "source")
        params_text = yaml.safe_dump(conftest.deep_update(defaults, conftest.deep_update(
            conftest.TINY_PARAMS, {"data": {"source": str(source)}})), sort_keys=False)
        result["data"] = "tiny class-folder source: 2 classes x 12 images (48 px) + 1 corrupt file; TINY_PARAMS"
    else:
        source = None
        params_text = (REPO_ROOT / "params.yaml").read_text()  # as committed
        result["data"] = (f"params.yaml defaults: source {defaults['data']['source']}, "
                          f"max_per_class {defaults['data']['max_per_class']}, epochs {defaults['finetune']['epochs']}")
    project = make_project(work / "project", params_text, conftest.PROJECT_FILES)
    try:
        return measure_in(project, quick, figures, work, logs, conftest, source, params_text, result, env)
    finally:
        stop_project_server(project)


def measure_in(project: Path, quick: bool, figures: set[str], work: Path, logs: Path, conftest, source,
               params_text: str, result: dict[str, Any], env: dict) -> dict[str, Any]:
    """The pipeline figures in ``project`` (its Prefect server is stopped by the caller)."""
    py = sys.executable
    repro = [py, "-m", "dvc", "repro"]

    log(f"figure 6: full dvc repro ({result['data']})")
    seconds, lines = stream(repro, project, env, logs / "repro_full.log")
    full = stage_breakdown(seconds, lines)
    result["full"] = full
    log(f"figure 6: full repro {full['seconds']:.1f} s; "
        + ", ".join(f"{k} {v['seconds']:.1f}" for k, v in full["stages"].items()))
    if list(full["ran"]) != list(STAGES):
        log(f"WARNING: full repro ran {full['ran']}, expected {list(STAGES)}")

    if "5" in figures:
        log("figure 5a: no-op dvc repro vs python -m dvc --version")
        noop, version, noop_ran = [], [], []
        for _ in range(3):
            s, out = stream(repro, project, env, logs / "repro_noop.log", timeout=600)
            noop.append(s)
            noop_ran += [m.group(1) for _, text in out if (m := STAGE_LINE.search(text))]
            version.append(timed_run([py, "-m", "dvc", "--version"], project, env, logs / "dvc_version.log"))
        result["noop"] = {"seconds": [round(v, 2) for v in noop],
                          "dvc_version_seconds": [round(v, 2) for v in version], "ran": noop_ran}
        log(f"figure 5a: no-op {median(noop):.2f} s (ran {noop_ran or 'nothing'}), "
            f"dvc --version {median(version):.2f} s")

        old, new = change_svm_grid(project / "params.yaml")
        log(f"figure 5b: dvc repro after svm.c_grid.num {old} -> {new}")
        seconds, lines = stream(repro, project, env, logs / "repro_svm.log")
        incremental = stage_breakdown(seconds, lines)
        incremental["change"] = f"svm.c_grid.num {old} -> {new}"
        result["incremental"] = incremental
        log(f"figure 5b: {incremental['seconds']:.1f} s, ran {incremental['ran']}")

    reps = 2 if quick else 3
    try:  # extra detail: a failure here must not lose the pipeline figures measured above
        result["overhead"] = prefect_overhead(work, source or conftest.make_source(work / "source"), env,
                                              conftest, reps, logs)
    except Exception as error:  # noqa: BLE001
        log(f"prefect overhead not measured: {type(error).__name__}: {error}")
        result["overhead"] = {"error": f"{type(error).__name__}: {error}"}
    return result


def fmt_stages(stages: dict[str, dict[str, float]]) -> str:
    """``name seconds, ...`` of a stage breakdown."""
    return ", ".join(f"{name} {info['seconds']:.1f}" for name, info in stages.items())


def summarize(m: dict[str, Any], figures: set[str]) -> list[dict[str, Any]]:
    """The printed rows: 5a no-op, 5b svm change, 6 end to end."""
    rows = []
    full = m["full"]
    if "5" in figures:
        noop = m["noop"]
        rows.append(row("5 incremental: no-op dvc repro", median(noop["seconds"]),
                        median(noop["dvc_version_seconds"]), "s", "no stage ran", not noop["ran"],
                        note=f"median of 3; baseline `python -m dvc --version`; "
                             f"ran: {', '.join(noop['ran']) or 'nothing'}"))
        inc = m["incremental"]
        ok = inc["ran"] == INCREMENTAL_EXPECTED
        same = sum(full["stages"].get(s, {}).get("seconds", 0.0) for s in INCREMENTAL_EXPECTED)
        rows.append(row("5 incremental: svm param changed", inc["seconds"], full["seconds"], "s",
                        "only svm, evaluate rerun", ok,
                        note=f"{inc['change']}; ran: {', '.join(inc['ran']) or 'nothing'}"
                             f"{'' if ok else ' (UNEXPECTED)'}; per stage {fmt_stages(inc['stages'])} s; "
                             f"the same stages took {same:.1f} s in the full run; baseline = full first run"))
    if "6" in figures:
        o = m["overhead"]
        med = o.get("median_seconds")
        overhead = (f"Prefect overhead not measured ({o['error']})" if not med else
                    f"Prefect overhead per stage with the project's server (default) "
                    f"{o['project_server_overhead_per_stage']:.1f} s, with the ephemeral server (old default) "
                    f"{o['ephemeral_overhead_per_stage']:.1f} s vs no "
                    f"Prefect, {o['ephemeral_minus_server']:.1f} s vs a running server "
                    f"(ingest flow project server {med['ingest flow, project server']:.1f} s, first start of the "
                    f"project's server {o['project_server_start_seconds']:.1f} s; "
                    f"ingest flow ephemeral {med['ingest flow, ephemeral']:.1f} s, with a running server "
                    f"{med['ingest flow, server']:.1f} s, no Prefect {med['ingest, no Prefect']:.1f} s, "
                    f"core only {med['ingest core only']:.1f} s; no-op flow ephemeral "
                    f"{med['noop flow, ephemeral']:.1f} s, server {med['noop flow, server']:.1f} s, "
                    f"python -c pass {med['python -c pass']:.2f} s)")
        waits = [info["server_wait"] for info in full["stages"].values() if "server_wait" in info]
        rows.append(row(f"6 end to end: full dvc repro ({m['mode']})", full["seconds"], TARGET_SECONDS, "s",
                        f"<= 15 min ({'tiny' if m['mode'] == 'quick' else 'default'} data)", full["seconds"] <= TARGET_SECONDS and full["ran"] == list(STAGES),
                        note=f"{m['data']}; per stage {fmt_stages(full['stages'])} s, "
                             f"before first stage {full['before_first_stage']} s; "
                             f"waiting for an ephemeral Prefect server {sum(waits):.1f} s in all "
                             f"({', '.join(f'{w:.1f}' for w in waits) or 'none: the project server'}); {overhead}"))
        if med:
            value = o["project_server_overhead_per_stage"]
            rows.append(row("6 Prefect overhead per stage", value, o["ephemeral_overhead_per_stage"], "s",
                            f"<= {OVERHEAD_TARGET_SECONDS:.0f} s over no Prefect", value <= OVERHEAD_TARGET_SECONDS,
                            note="python -m flows.ingest with the project's Prefect server (default) minus the same "
                                 "steps without Prefect; baseline = the ephemeral server (old default)"))
    return rows


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run figures 5 and/or 6 and return their rows and details."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny generated source instead of ELPV")
    parser.add_argument("--figures", default="5,6", help="5 (incremental), 6 (end to end), or both")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--keep", action="store_true", help="keep the temp folder (its path is printed)")
    args = parser.parse_args(argv)
    figures = {f.strip() for f in args.figures.split(",") if f.strip()}
    if not figures or not figures <= {"5", "6"}:
        parser.error("--figures: 5, 6 or 5,6")
    work = Path(tempfile.mkdtemp(prefix="tlpipe-pipeline-bench-"))
    logs = work / "logs"
    logs.mkdir()
    log(f"work folder {work}")
    start = time.perf_counter()
    before = machine()
    try:
        measured = measure(args.quick, figures, work, logs)
    finally:
        kept_logs = OUT_DIR / "logs" / f"pipeline-{'quick' if args.quick else 'full'}"  # git-ignored
        shutil.rmtree(kept_logs, ignore_errors=True)
        try:
            shutil.copytree(logs, kept_logs)
        except OSError as error:
            log(f"could not keep the logs: {error}")
        if args.keep:
            log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    result = {"rows": summarize(measured, figures),
              "details": {"machine_before": before, "machine_after": machine(),
                          "seconds": round(time.perf_counter() - start, 1), **measured}}
    if args.json:
        write_json(args.json, result)
    return result


if __name__ == "__main__":
    from bench.common import format_row

    for line in main().get("rows", []):
        print(format_row(line))
