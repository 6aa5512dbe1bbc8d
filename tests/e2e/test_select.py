"""End to end: the select stage races backbones on tiny data, and DVC reruns exactly what its choice requires.

The race is the one of the session's tiny pipeline run (``pipeline_baseline`` with ``RACE``: Lite0 and Lite1 at
32 px, tests/conftest.py); pinning a choice is tried on a copy of that project.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import clone_project, stage_env

LATER_STAGES = ("ingest", "features", "svm", "finetune", "evaluate")


def dvc(project: Path, env: dict, *args: str) -> str:
    result = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=project, env=env, capture_output=True,
                            text=True, timeout=1500)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    return output


def set_backbone(project: Path, backbone: str) -> None:
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["features"]["backbone"] = backbone
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


@pytest.mark.slow
def test_select_races_on_train_and_a_pinned_or_changed_choice_reruns_exactly_what_it_must(
        pipeline_baseline, prefect_server, tmp_path):
    output = pipeline_baseline.output
    for stage in ("select", *LATER_STAGES):
        assert f"Running stage '{stage}'" in output

    project = pipeline_baseline.project
    choice = json.loads((project / "data" / "selection.json").read_text())
    assert set(choice) == {"backbone", "image_size"} and choice["image_size"] == 32
    table = (project / "reports" / "select" / "candidates.csv").read_text()
    assert "lite0@32" in table and "lite1@32" in table
    race = json.loads((project / "reports" / "select" / "race.json").read_text())
    assert all(row["cv_accuracy"] is not None and row["images"] > 0 for row in race["candidates"].values())
    metric = json.loads((project / "metrics" / "select.json").read_text())
    assert metric["choice"] == f"{choice['backbone'].replace('efficientnet_', '')}@32"
    assert "Backbone and input size (select stage)" in (project / "reports" / "evaluate" / "report.html").read_text()
    meta = json.loads((project / "data" / "features" / "meta.json").read_text())
    assert meta["backbone"] == choice["backbone"]  # the later stages used the choice

    # pinning the value the race chose: select reruns (its param changed) and writes the same choice, so no stage
    # that uses the choice reruns; evaluate does, because its report shows select's table (now one pinned row)
    project = clone_project(project, tmp_path / "pinned")
    env = stage_env(prefect_server)
    set_backbone(project, choice["backbone"])
    output = dvc(project, env, "repro")
    assert "Running stage 'select'" in output and "Running stage 'evaluate'" in output
    assert not any(f"Running stage '{stage}'" in output for stage in LATER_STAGES[:-1]), output[-3000:]
    assert json.loads((project / "data" / "selection.json").read_text()) == choice

    # pinning another backbone: the choice changes, so every later stage is out of date
    other = "efficientnet_lite1" if choice["backbone"] == "efficientnet_lite0" else "efficientnet_lite0"
    set_backbone(project, other)
    dvc(project, env, "repro", "select")
    assert json.loads((project / "data" / "selection.json").read_text())["backbone"] == other
    status = dvc(project, env, "status")
    for stage in LATER_STAGES:
        assert f"{stage}:" in status, status
