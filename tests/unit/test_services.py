"""PostgreSQL service helpers that need no server."""

from __future__ import annotations

from pathlib import Path


def test_unreachable_parent_finds_a_private_folder_on_the_path() -> None:
    """On a path whose other folders anyone may enter, the one private folder is the one named; for no user
    (the server runs as this user), nothing is."""
    import os
    import pwd
    import shutil
    import tempfile

    from tlpipe.ops.services import unreachable_parent

    other = next(e for e in pwd.getpwall() if e.pw_uid not in (0, os.getuid()))  # e.g. nobody: always one
    # under the system's temporary folder (world-enterable, sticky), not pytest's private tmp_path
    top = Path(tempfile.mkdtemp(prefix="tlpipe-reach-", dir="/tmp"))
    try:
        os.chmod(top, 0o755)
        private = top / "private"
        (private / "venv" / "bin").mkdir(parents=True)
        os.chmod(private, 0o700)
        assert unreachable_parent(private / "venv" / "bin", None) is None
        assert unreachable_parent(private / "venv" / "bin", other.pw_name) == private.resolve()
        os.chmod(private, 0o755)
        assert unreachable_parent(private / "venv" / "bin", other.pw_name) is None
    finally:
        shutil.rmtree(top, ignore_errors=True)


def test_a_plain_pid_file_of_a_live_stranger_kills_nothing(tmp_path) -> None:
    """A pid alone is no identity (the kernel reuses pids): a pid file without the start time is never trusted."""
    import subprocess

    from tlpipe.ops import services

    stranger = subprocess.Popen(["sleep", "60"], start_new_session=True)  # leads its own group, like a server
    state = services.StateDir(tmp_path)
    try:
        state.mlflow_pid.write_text(str(stranger.pid))
        assert services.read_pid(state.mlflow_pid) is None
        assert services.stop_mlflow(state) is False
        assert stranger.poll() is None  # not killed
    finally:
        stranger.kill()
        stranger.wait()


def test_a_pid_file_names_its_process_only_while_pid_and_start_time_match(tmp_path) -> None:
    """Alive, but started at another time (the pid was reused): gone, nothing killed. The very process: stopped."""
    import json
    import subprocess

    from tlpipe.ops import services
    from tlpipe.ops.process_identity import is_alive, write_pid_file

    child = subprocess.Popen(["sleep", "60"], start_new_session=True)
    state = services.StateDir(tmp_path)
    try:
        recorded = write_pid_file(state.mlflow_pid, child.pid)
        assert services.read_pid(state.mlflow_pid) == child.pid
        state.mlflow_pid.write_text(json.dumps({"pid": child.pid, "started": recorded.started - 100}))
        assert services.read_pid(state.mlflow_pid) is None
        assert services.stop_mlflow(state) is False and child.poll() is None  # not killed
        write_pid_file(state.mlflow_pid, child.pid)
        assert services.stop_mlflow(state) is True
        assert child.poll() is not None and not is_alive(recorded)  # stopped (and reaped by stop_mlflow)
    finally:
        child.kill()
        child.wait()


def _fake_pg_bin(folder):
    folder.mkdir(parents=True)
    for tool in ("initdb", "pg_ctl", "postgres"):
        (folder / tool).write_text("#!/bin/sh\n")
        (folder / tool).chmod(0o755)
    return folder


def test_without_pgserver_the_newest_system_postgresql_is_found(tmp_path, monkeypatch) -> None:
    """pgserver is an optional dependency (no wheels for Python 3.13 or aarch64): without it, Debian's
    /usr/lib/postgresql/<major>/bin is used, the newest major version first; $TLPIPE_PG_BIN still wins."""
    import importlib.util

    from tlpipe import services

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "pgserver" else real_find_spec(name, *a))
    monkeypatch.delenv(services.PG_BIN_ENV, raising=False)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.setattr(services, "SYSTEM_PG_ROOT", tmp_path / "postgresql")
    _fake_pg_bin(tmp_path / "postgresql" / "9" / "bin")
    newest = _fake_pg_bin(tmp_path / "postgresql" / "15" / "bin")
    (tmp_path / "postgresql" / "17" / "bin").mkdir(parents=True)  # incomplete: no binaries
    assert services.postgres_bin_dir() == newest
    explicit = _fake_pg_bin(tmp_path / "explicit")
    monkeypatch.setenv(services.PG_BIN_ENV, str(explicit))
    assert services.postgres_bin_dir() == explicit


def test_without_pgserver_or_a_system_postgresql_the_error_says_how_to_get_one(tmp_path, monkeypatch) -> None:
    import importlib.util

    import pytest

    from tlpipe import services

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "pgserver" else real_find_spec(name, *a))
    monkeypatch.delenv(services.PG_BIN_ENV, raising=False)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.setattr(services, "SYSTEM_PG_ROOT", tmp_path / "none")
    with pytest.raises(services.ServiceError, match=r"apt-get install -y postgresql.*TLPIPE_PG_BIN"):
        services.postgres_bin_dir()
