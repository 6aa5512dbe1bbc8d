"""Data and models on a DVC remote: push after a run, pull in a fresh clone, and nothing is left to run.

The remote is a local directory (the production form is S3 through the ``dvc-s3`` plugin; the commands are
the same). The run is a copy of the session's tiny pipeline run (``pipeline_baseline``), brought up to date
first in case an earlier test changed its source.
"""

from __future__ import annotations

import hashlib
import shutil
import sys

import pytest

from tests.conftest import dvc_outputs, stage_env
from tests.scale.helpers import run

DVC = [sys.executable, "-m", "dvc"]


def file_digests(project, relpaths: list[str]) -> dict[str, str]:
    """SHA-256 of the raw bytes of each file."""
    return {relpath: hashlib.sha256((project / relpath).read_bytes()).hexdigest() for relpath in relpaths}


@pytest.mark.slow
def test_push_then_pull_in_a_fresh_clone_restores_every_output(tmp_path, pipeline_baseline, prefect_server):
    project = tmp_path / "project"
    shutil.copytree(pipeline_baseline.project, project, symlinks=True)
    env = stage_env(prefect_server)
    run([*DVC, "repro"], project, env, timeout=1800)  # normally runs nothing
    outputs = dvc_outputs(project)
    assert any(p.startswith("data/store/") for p in outputs) and any(p.startswith("models/") for p in outputs)

    remote = tmp_path / "remote"
    run([*DVC, "remote", "add", "-d", "store", str(remote)], project, env)  # the documented one command
    pushed = run([*DVC, "push"], project, env)
    assert "pushed" in pushed and any(remote.rglob("*"))
    git = ["git"]
    run([*git, "add", "dvc.lock", ".dvc/config", "metrics", "params.yaml"], project, env)  # what this run used
    run([*git, "commit", "-qm", "run results"], project, env)

    clone = tmp_path / "clone"
    run([*git, "clone", "-q", str(project), str(clone)], tmp_path, env)
    assert not (clone / "data").exists() and not (clone / "models").exists()
    run([*DVC, "pull"], clone, env)
    assert file_digests(clone, outputs) == file_digests(project, outputs)  # every stage output, byte for byte
    status = run([*DVC, "status"], clone, env)
    assert "Data and pipelines are up to date." in status, status
    repro = run([*DVC, "repro"], clone, env)
    assert "Running stage" not in repro, repro
    assert run([*DVC, "metrics", "show"], clone, env) == run([*DVC, "metrics", "show"], project, env)
