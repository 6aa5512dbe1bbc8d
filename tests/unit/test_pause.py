"""Pause points (tlpipe.ops.pause): how the fault tests stop a stage at a chosen place, deterministically."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from tlpipe.ops.pause import PAUSE_AT_ENV, PAUSE_DIR_ENV, marker_path, pause_point

WAITER = "from tlpipe.ops.pause import pause_point; pause_point('stage.work'); print('went on', flush=True)"


def test_an_unnamed_point_costs_nothing(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv(PAUSE_AT_ENV, "other.point")
    monkeypatch.setenv(PAUSE_DIR_ENV, str(tmp_path))
    pause_point("stage.work")  # returns at once: the test would hang (and time out) otherwise
    assert not list(tmp_path.iterdir())


def start_paused(code: str, folder: Path) -> tuple[subprocess.Popen, Path]:
    """Run ``code`` with the pause point ``stage.work`` named; return the process and its marker, once there."""
    env = {**os.environ, PAUSE_AT_ENV: "stage.work", PAUSE_DIR_ENV: str(folder)}
    child = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True)
    marker = marker_path("stage.work", child.pid, folder)
    while not marker.exists():
        if child.poll() is not None:
            raise AssertionError("the process went past its pause point")
        time.sleep(0.05)
    return child, marker


def test_a_named_point_waits_for_its_marker_to_go_and_then_goes_on(tmp_path: Path) -> None:
    child, marker = start_paused(WAITER, tmp_path)
    try:
        note = json.loads(marker.read_text())
        assert note["point"] == "stage.work" and note["pid"] == child.pid
        assert child.poll() is None  # still waiting: nothing but the marker's removal lets it go on
        marker.unlink()
        out, _ = child.communicate(timeout=60)
        assert out == "went on\n" and child.returncode == 0
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()


TWICE = ("from tlpipe.ops.pause import pause_point\n"
         "for attempt in (1, 2):  # a task and its retry\n"
         "    pause_point('stage.work'); print('attempt', attempt, flush=True)\n")


def test_a_retry_passes_the_point_it_paused_at(tmp_path: Path) -> None:
    child, marker = start_paused(TWICE, tmp_path)
    try:
        marker.unlink()
        out, _ = child.communicate(timeout=60)
        assert out == "attempt 1\nattempt 2\n" and not marker.exists()
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()


def test_a_point_pauses_only_the_stage_it_is_named_after(tmp_path: Path, monkeypatch) -> None:
    """ingest's decoding also runs in the select stage (its split of the source): only ingest pauses there."""
    import types

    from tlpipe.ops import pause

    monkeypatch.setenv(PAUSE_AT_ENV, "ingest.decoding")
    monkeypatch.setenv(PAUSE_DIR_ENV, str(tmp_path))
    main = types.ModuleType("__main__")
    main.__spec__ = types.SimpleNamespace(name="flows.selection")
    monkeypatch.setitem(sys.modules, "__main__", main)
    assert pause.running_stage() == "selection" and not pause.in_stage_of("ingest.decoding")
    pause_point("ingest.decoding")  # returns at once in the select stage (a pause would hang the test)
    assert not list(tmp_path.iterdir())
    main.__spec__ = types.SimpleNamespace(name="flows.ingest")
    assert pause.in_stage_of("ingest.decoding") and not pause.in_stage_of("svm.logging")
