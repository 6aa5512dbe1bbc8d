"""Deployment creation against the Prefect test-harness server, checked through the Prefect API."""

from __future__ import annotations

import pytest

from tests.conftest import make_project


def test_deploy_creates_a_scheduled_deployment(tmp_path, tiny_source, prefect_server):
    from prefect.client.orchestration import get_client

    from flows.deploy import create_deployment

    project = make_project(tmp_path / "project", tiny_source)
    deployment_id, name, cron = create_deployment(project, cron="15 4 * * 1")
    assert name == "retrain/tlpipe-retrain" and cron == "15 4 * * 1"
    with get_client(sync_client=True) as client:
        deployment = client.read_deployment(deployment_id)
        assert deployment.name == "tlpipe-retrain"
        assert deployment.parameters == {"root": str(project.resolve())}
        crons = [s.schedule.cron for s in deployment.schedules]
        assert crons == ["15 4 * * 1"]
        assert deployment.schedules[0].active
        assert deployment.schedules[0].schedule.timezone == "UTC"


@pytest.mark.slow
def test_retrain_reruns_exactly_when_dvc_says_the_source_changed(tmp_path, tiny_source, prefect_server,
                                                                  project_env, monkeypatch):
    """retrain asks DVC (``dvc status``): nothing stale -> nothing runs; an image added -> DVC reruns ingest."""
    import subprocess
    import sys

    import numpy as np

    from flows.retrain import UP_TO_DATE, retrain_flow
    from tests.conftest import make_image, use_listing_pipeline

    project = use_listing_pipeline(make_project(tmp_path / "project", tiny_source))
    subprocess.run([sys.executable, "-m", "dvc", "repro"], cwd=project, env=project_env, check=True,
                   capture_output=True)
    listing = (project / "listing.txt").read_text()
    assert retrain_flow(root=str(project)) == {"retrained": False, "stale": {}, "reason": UP_TO_DATE}

    make_image(tiny_source / "dark" / "dark_new.jpg", np.random.default_rng(5), bright=False)
    result = retrain_flow(root=str(project))
    assert result["retrained"] is True
    assert result["stale"] == {"ingest": [{"changed deps": {str(tiny_source): "modified"}}]}
    assert result["stages_ran"] == ["ingest"]
    assert "dark_new.jpg" in (project / "listing.txt").read_text() and "dark_new.jpg" not in listing
    assert retrain_flow(root=str(project))["retrained"] is False


@pytest.mark.slow
def test_retrain_force_reruns_an_up_to_date_pipeline(tmp_path, tiny_source, prefect_server, project_env):
    """`tlpipe retrain --force`, as a user types it: nothing is stale, and the store (here: the listing, the
    same stage name and input) is rebuilt anyway."""
    import json
    import subprocess
    import sys

    from tests.conftest import use_listing_pipeline

    project = use_listing_pipeline(make_project(tmp_path / "project", tiny_source))
    env = {**project_env, "PREFECT_API_URL": prefect_server}
    subprocess.run([sys.executable, "-m", "dvc", "repro"], cwd=project, env=env, check=True, capture_output=True)
    listing = project / "listing.txt"
    before = listing.stat().st_mtime_ns
    plain = subprocess.run([sys.executable, "-m", "flows.cli", "retrain"], cwd=project, env=env,
                           capture_output=True, text=True, timeout=600)
    assert plain.returncode == 0, plain.stderr[-3000:]
    assert json.loads(plain.stdout[plain.stdout.index("{"):])["retrained"] is False
    assert listing.stat().st_mtime_ns == before
    forced = subprocess.run([sys.executable, "-m", "flows.cli", "retrain", "--force"], cwd=project, env=env,
                            capture_output=True, text=True, timeout=600)
    assert forced.returncode == 0, forced.stderr[-3000:]
    result = json.loads(forced.stdout[forced.stdout.index('{\n  "retrained"'):])
    assert result["retrained"] is True and result["stale"] == {}
    assert result["stages_ran"] == ["ingest"]
    assert listing.stat().st_mtime_ns != before  # rebuilt
