"""The project locks (``fcntl.flock``): a second holder fails at once naming the first; a killed holder never blocks."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tlpipe.ops.lock import LockHeldError, file_lock, pipeline_lock, pipeline_lock_path
from tlpipe.ops.prefect_server import main_project_root

HOLD = ("import sys, time; from tlpipe.ops.lock import pipeline_lock\n"
        "with pipeline_lock(sys.argv[1]):\n    print('held', flush=True); time.sleep(600)\n")


def hold_in_child(root: Path) -> subprocess.Popen:
    """A child process holding the pipeline lock of ``root`` (returns once it holds it)."""
    child = subprocess.Popen([sys.executable, "-c", HOLD, str(root)], stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "held"
    return child


def test_second_holder_fails_at_once_naming_the_first(tmp_path: Path) -> None:
    child = hold_in_child(tmp_path)
    try:
        # the holder keeps the lock for 600 s: a lock that waited instead of failing would run into the
        # test's timeout (pytest-timeout), so raising here means it failed at once
        with pytest.raises(LockHeldError) as caught:
            with pipeline_lock(tmp_path):
                pass
        message = str(caught.value)
        assert f"a tlpipe pipeline run in {tmp_path} is already running: pid {child.pid} since " in message
        assert str(pipeline_lock_path(tmp_path)) in message
    finally:
        child.kill()
        child.wait()


def test_a_killed_holder_leaves_no_blocking_lock(tmp_path: Path) -> None:
    child = hold_in_child(tmp_path)
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert pipeline_lock_path(tmp_path).read_text()  # the note of the killed holder is still there...
    with pipeline_lock(tmp_path):  # ...but the kernel released its lock
        assert '"pid": ' in pipeline_lock_path(tmp_path).read_text()
    assert pipeline_lock_path(tmp_path).read_text() == ""  # released cleanly: the note is cleared


def test_waiting_holder_gets_the_lock_when_it_is_released(tmp_path: Path) -> None:
    child = hold_in_child(tmp_path)
    try:
        with pytest.raises(LockHeldError), file_lock(pipeline_lock_path(tmp_path), "x", wait_s=0.5):
            pass
    finally:
        child.kill()
        child.wait()
    with file_lock(pipeline_lock_path(tmp_path), "x", wait_s=5):
        pass


def test_queued_experiment_workspaces_belong_to_their_project(tmp_path: Path) -> None:
    workspace = tmp_path / "proj" / ".dvc" / "tmp" / "exps" / "tmpabc123"
    workspace.mkdir(parents=True)
    (tmp_path / "proj" / "dvc.yaml").write_text("stages: {}\n")
    assert main_project_root(workspace) == (tmp_path / "proj").resolve()
    assert main_project_root(tmp_path / "proj") == (tmp_path / "proj").resolve()
