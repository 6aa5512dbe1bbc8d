"""``tlpipe compare-backbones`` end to end on tiny data (issue 20, item 14): the command as a user runs it,
through DVC's experiment queue, in a copy of the shared tiny pipeline's project (``baseline_copy``).

The one backbone asked for is the one the shared run's select stage chose (its ``features.backbone`` is
``auto``), so in DVC's queue the select stage runs again (its params changed) and makes the same choice, and
the evaluate stage reruns (its report shows select's table, whose timings differ); features, svm and finetune
have unchanged inputs and do not run: the test pays for the orchestration, not for a pipeline. What it checks is everything after the queue: each experiment's metrics
read back from its commit and from the DVC cache, the table and chart, and the MLflow run, against what the
shared run measured. The table's and chart's contents for several backbones are unit-tested in
``tests/unit/test_compare_backbones.py``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from tests.conftest import stage_env
from tests.e2e.test_faults import stages_ran

pytestmark = pytest.mark.slow


def test_compare_backbones_queues_runs_reads_back_and_logs(baseline_copy: Path, prefect_server: str) -> None:
    from mlflow import MlflowClient

    from tlpipe.core.task import load_task

    project = baseline_copy
    backbone = json.loads((project / "data" / "selection.json").read_text())["backbone"]  # select's choice
    expected = json.loads((project / "metrics" / "evaluate.json").read_text())
    features = json.loads((project / "metrics" / "features.json").read_text())
    before = subprocess.run(["git", "status", "--porcelain"], cwd=project, capture_output=True, text=True).stdout

    result = subprocess.run([sys.executable, "-m", "flows.cli", "compare-backbones", "-b", backbone,
                             "--name", "tiny"], cwd=project, env=stage_env(prefect_server),
                            capture_output=True, text=True, timeout=900)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    assert set(stages_ran(output)) <= {"select", "evaluate"}, output[-3000:]

    folder = project / "reports" / "compare_backbones"
    table = pd.read_csv(folder / "backbones.csv")
    assert set(table["backbone"]) == {backbone}
    assert set(table["experiment"]) == {f"tiny-{backbone.replace('_', '-')}"}
    measured = {row.model: row.accuracy for row in table.itertuples(index=False)}
    assert measured == pytest.approx({model: values["acc"] for model, values in expected.items()})
    assert (table["images_per_second"] == features["images_per_second"]).all()  # read through the DVC cache
    assert (table["gflops"] > 0).all() and (table["image_size"] == 32).all()
    assert (folder / "backbones.png").stat().st_size > 10_000
    assert f"table: {folder / 'backbones.csv'}" in output

    client = MlflowClient(f"sqlite:///{project}/mlflow.db")
    experiment = client.get_experiment_by_name(load_task(project).name)  # the task the runs were for
    runs = client.search_runs([experiment.experiment_id], "tags.`tlpipe.kind` = 'compare-backbones'")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    logged = runs[0].data.metrics
    assert logged == pytest.approx({
        **{f"{backbone}.{model}.test_accuracy": accuracy for model, accuracy in measured.items()},
        f"{backbone}.gflops": float(table["gflops"].iloc[0]),
        f"{backbone}.images_per_second": float(features["images_per_second"])})
    artifacts = [a.path for a in client.list_artifacts(runs[0].info.run_id, "compare_backbones")]
    assert sorted(artifacts) == ["compare_backbones/backbones.csv", "compare_backbones/backbones.png"]

    # the workspace is as it was: the experiment ran in DVC's temporary workspace (reports/ is git-ignored)
    after = subprocess.run(["git", "status", "--porcelain"], cwd=project, capture_output=True, text=True).stdout
    assert after == before
