"""Faults lose nothing: every stage killed with SIGKILL half-way, then ``dvc repro`` again (a tracking server that
dies in the middle of a stage: tests/e2e/test_tracking_outage.py). The moments are deterministic: each stage waits at a named pause point
(:mod:`tlpipe.ops.pause`, ``TLPIPE_PAUSE_AT``) until the test has acted.

One project goes through a *cascade* of killed runs, so the five faults cost little more than one pipeline run:
``dvc repro`` #1 is killed inside ingest; #2 reruns ingest and is killed inside features; ... #5 is killed inside
evaluate; #6 completes. What each kill left behind is recorded by the module fixture; one test per stage checks
its kill: it hit real work (staging debris or published-but-unrecorded outputs, a RUNNING MLflow run), no process
the stage started survived it, the next ``dvc repro`` reran that stage and nothing upstream of it, that rerun
removed the debris, and the killed attempt's MLflow runs ended KILLED or FAILED. The outputs after the cascade
equal those of an uninterrupted run (``pipeline_baseline``), file by file, apart from durations, timestamps and
run ids (see ``tests.conftest.stable_digest``).

Real parts only: DVC, the Prefect test server, MLflow on SQLite, Keras on a tiny source.
"""

from __future__ import annotations

import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest

from tests.conftest import (
    RACE,
    REPO,
    code_digest,
    copy_project_files,
    deep_update,
    make_project,
    make_source,
    output_digests,
    stage_env,
)
from tlpipe.ops.pause import PAUSE_AT_ENV, PAUSE_DIR_ENV

pytestmark = pytest.mark.slow

STAGES = ("ingest", "features", "svm", "finetune", "evaluate")
DEBRIS = re.compile(r"^\..+\.(?:tmp|old)-\d+$")
"""Names of staging debris: ``.<output>.tmp-<pid>`` and ``.<output>.old-<pid>`` (tlpipe.data.store)."""
FINAL_STATES = {"KILLED", "FAILED"}


KILL_POINTS: dict[str, tuple[str, bool]] = {
    # stage: (its pause point (tlpipe.ops.pause), whether the stage is then inside a staging folder)
    "ingest": ("ingest.decoding", True),  # decoding in a 2-process pool (forkserver)
    "features": ("features.extracting", True),  # extracting backbone features
    "svm": ("svm.logging", False),  # models/svm published, the three SVMs not yet logged to MLflow
    "finetune": ("finetune.training", True),  # training (the fault of issue 11, item 6)
    "evaluate": ("evaluate.logging", False),  # metrics published; logging, registering, gating to come
}


@dataclass
class Kill:
    """What one killed ``dvc repro`` left behind."""

    stage: str
    pid: int
    returncode: int
    output: str
    stages_ran: list[str]
    debris: list[str]
    children: list[str]
    survivors: list[str]
    runs_left_running: list[str]
    rerun_stages: list[str] = field(default_factory=list)


@dataclass
class Cascade:
    """The faulted project after its final, completed ``dvc repro``."""

    project: Path
    source: Path
    code: Path
    env: dict[str, str]
    kills: dict[str, Kill]
    final_output: str
    final_stages: list[str]
    seconds: float


def stages_ran(output: str) -> list[str]:
    """Stages a ``dvc repro`` output says it ran, in order."""
    return re.findall(r"Running stage '([^']+)'", output)


def describe(process: psutil.Process) -> str:
    try:
        return f"{process.pid} {' '.join(process.cmdline())[:160]}"
    except psutil.Error:
        return str(process.pid)


def find_debris(project: Path) -> list[str]:
    """Staging debris anywhere in the project (DVC's and git's own folders excluded)."""
    found = []
    for folder, dirs, files in os.walk(project):
        dirs[:] = [d for d in dirs if d not in (".dvc", ".git")]
        found += [str(Path(folder, name).relative_to(project)) for name in [*dirs, *files] if DEBRIS.match(name)]
    return sorted(found)


def runs_by_pid(db: Path, pid: int) -> dict[str, str]:
    """``{run_id: status}`` of the MLflow runs tagged as owned by process ``pid`` (tlpipe.tracking.runs's tag)."""
    if not db.exists():
        return {}
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30) as connection:
        rows = connection.execute(
            "SELECT r.run_uuid, r.status FROM runs r JOIN tags t ON t.run_uuid = r.run_uuid "
            "WHERE t.key = 'tlpipe.pid' AND t.value = ?", (str(pid),)).fetchall()
    return dict(rows)


def run_statuses(db: Path) -> dict[str, str]:
    """``{run_id: status}`` of every run in an MLflow SQLite store."""
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30) as connection:
        return dict(connection.execute("SELECT run_uuid, status FROM runs").fetchall())


def stage_run_running(db: Path, stage: str) -> bool:
    """Whether the store holds a RUNNING stage run of ``stage`` (the stage is inside its work)."""
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30) as connection:
        return bool(connection.execute(
            "SELECT 1 FROM runs r JOIN tags k ON k.run_uuid = r.run_uuid JOIN tags s ON s.run_uuid = r.run_uuid "
            "WHERE r.status = 'RUNNING' AND k.key = 'tlpipe.kind' AND k.value = 'stage' "
            "AND s.key = 'tlpipe.stage' AND s.value = ?", (stage,)).fetchall())


def repro(project: Path, env: dict, *args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    """``dvc repro`` to completion."""
    return subprocess.run([sys.executable, "-m", "dvc", "repro", *args], cwd=project, env=env,
                          capture_output=True, text=True, timeout=timeout)


def stop_tree(process: subprocess.Popen) -> None:
    """Kill a ``dvc repro`` still running and every process under it (a stage waiting at a pause point too)."""
    if process.poll() is not None:
        return
    try:
        children = psutil.Process(process.pid).children(recursive=True)
    except psutil.Error:
        children = []
    for child in children:
        try:
            child.kill()
        except psutil.Error:
            pass
    process.kill()
    process.wait()


def wait_for_pause(folder: Path, point: str, dvc: subprocess.Popen, log: Path, timeout: float = 900) -> Path:
    """The marker of the stage process paused at ``point`` (:mod:`tlpipe.ops.pause`), once it is there.

    The marker stays until the test deletes it, so waiting for it is no race with the stage.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and dvc.poll() is None:
        found = [path for path in folder.glob(f"{point}-*") if path.name.rsplit("-", 1)[1].isdigit()]
        if found:
            return found[0]
        time.sleep(0.1)
    pytest.fail(f"no stage paused at {point} (dvc exit {dvc.poll()}):\n{log.read_text()[-4000:]}")


def repro_and_kill(project: Path, env: dict, stage: str, log: Path) -> Kill:
    """Start ``dvc repro``; SIGKILL the ``stage`` process once it waits at its pause point (:data:`KILL_POINTS`)."""
    point, _ = KILL_POINTS[stage]
    pauses = log.with_suffix(".pauses")
    pauses.mkdir()
    with open(log, "w") as sink:
        dvc = subprocess.Popen([sys.executable, "-m", "dvc", "repro"], cwd=project, stdout=sink,
                               stderr=subprocess.STDOUT, text=True,
                               env={**env, PAUSE_AT_ENV: point, PAUSE_DIR_ENV: str(pauses)})
    try:
        marker = wait_for_pause(pauses, point, dvc, log)
        target = psutil.Process(int(marker.name.rsplit("-", 1)[1]))
        children = target.children(recursive=True)
        described = [describe(p) for p in children]
        target.send_signal(signal.SIGKILL)
        returncode = dvc.wait(timeout=300)
    finally:
        stop_tree(dvc)
    _, survivors = psutil.wait_procs(children, timeout=20)
    for process in survivors:  # leave nothing behind, whatever the verdict
        process.kill()
    output = log.read_text()
    return Kill(stage=stage, pid=target.pid, returncode=returncode, output=output, stages_ran=stages_ran(output),
                debris=find_debris(project), children=described,
                survivors=[describe(p) for p in survivors],
                runs_left_running=[run for run, status in runs_by_pid(project / "mlflow.db", target.pid).items()
                                   if status == "RUNNING"])


@pytest.fixture(scope="module")
def cascade(tmp_path_factory, prefect_server) -> Cascade:
    """One project, one killed ``dvc repro`` per stage in pipeline order, then a completed one.

    Same source (seed 0) and params as ``pipeline_baseline`` (tests/conftest.py), except two decode processes,
    so the ingest kill also leaves a process pool to clean up (the outputs must not depend on the worker
    count). Its code is a snapshot of this checkout, as the shared pipeline's is (compared by digest).
    """
    base = tmp_path_factory.mktemp("faults")
    code = base / "code"
    copy_project_files(REPO, code)
    source = make_source(base / "source")
    project = make_project(base / "project", source, deep_update(RACE, {"data": {"workers": 2}}), code=code)
    env = stage_env(prefect_server)
    start = time.monotonic()
    kills: dict[str, Kill] = {}
    previous = None
    for stage in STAGES:
        kill = repro_and_kill(project, env, stage, base / f"repro-{stage}.log")
        if previous is not None:
            previous.rerun_stages = kill.stages_ran
        kills[stage] = previous = kill
    final = repro(project, env)
    assert final.returncode == 0, (final.stdout + final.stderr)[-6000:]
    previous.rerun_stages = stages_ran(final.stdout + final.stderr)
    return Cascade(project, source, code, env, kills, final.stdout + final.stderr, previous.rerun_stages,
                   time.monotonic() - start)


@pytest.mark.parametrize("stage", STAGES)
def test_stage_killed_mid_work_loses_nothing(cascade: Cascade, stage: str) -> None:
    kill = cascade.kills[stage]
    project = cascade.project
    _, in_staging = KILL_POINTS[stage]
    print(f"\n{stage}: killed pid {kill.pid}; debris {kill.debris}; its processes {kill.children}; "
          f"runs left RUNNING {len(kill.runs_left_running)}; next repro ran {kill.rerun_stages}")

    # the kill hit real work, and dvc reported the stage failed
    assert kill.returncode != 0, kill.output[-3000:]
    assert kill.stages_ran[-1] == stage, kill.stages_ran
    if in_staging:
        assert any(f".tmp-{kill.pid}" in path for path in kill.debris), kill.debris
    assert kill.runs_left_running, f"{stage}: no MLflow run of process {kill.pid} was RUNNING at the kill"

    # no process the stage had started outlived it (pool workers, a temporary Prefect server, ...)
    if stage == "ingest":
        assert len(kill.children) >= 2, kill.children  # its decode pool was running: the check is not vacuous
    assert not kill.survivors, f"{stage}: orphaned after SIGKILL: {kill.survivors}"

    # the next dvc repro reran the killed stage first: nothing upstream of it (already recorded) ran again
    assert kill.rerun_stages and kill.rerun_stages[0] == stage, kill.rerun_stages
    assert not set(kill.rerun_stages) & set(STAGES[:STAGES.index(stage)]), kill.rerun_stages

    # the killed attempt's MLflow runs were ended (KILLED by the next stage, or FAILED), none left RUNNING
    statuses = runs_by_pid(project / "mlflow.db", kill.pid)
    assert {run: statuses[run] for run in kill.runs_left_running} == \
        {run: statuses[run] for run in kill.runs_left_running if statuses[run] in FINAL_STATES}, statuses
    assert "RUNNING" not in statuses.values(), statuses

    # its debris is gone
    assert not find_debris(project), find_debris(project)


def test_outputs_after_the_faults_equal_an_uninterrupted_run(cascade: Cascade, baseline_digests: dict) -> None:
    """Every DVC output and metrics file, after five killed runs and a rerun, equals the uninterrupted run's
    (the session's shared ``tlpipe repro``, maybe on another pytest-xdist worker)."""
    assert code_digest(cascade.code) == baseline_digests["code"], "the checkout changed while the suite ran"
    expected = baseline_digests["digests"]
    digests = output_digests(cascade.project, cascade.source)
    assert sorted(digests) == sorted(expected)
    differing = sorted(path for path, digest in digests.items() if expected[path] != digest)
    assert not differing, f"outputs differ from the uninterrupted run: {differing}"
    assert not find_debris(cascade.project)
    statuses = run_statuses(cascade.project / "mlflow.db")
    assert "RUNNING" not in statuses.values(), {run: s for run, s in statuses.items() if s == "RUNNING"}
    status = subprocess.run([sys.executable, "-m", "dvc", "status"], cwd=cascade.project, env=cascade.env,
                            capture_output=True, text=True, timeout=300)  # and DVC agrees: nothing left to run
    assert "Data and pipelines are up to date" in status.stdout, status.stdout[-3000:] + status.stderr[-3000:]
    print(f"\nfault cascade: {cascade.seconds:.0f} s for five killed runs and the final rerun")
