"""Deployment creation against the Prefect test-harness server, checked through the Prefect API."""

from __future__ import annotations

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


def test_retrain_skips_when_source_unchanged(tmp_path, tiny_source, prefect_server, project_env, monkeypatch):
    """With a recorded source hash equal to the current one, retrain does not rerun anything."""
    import json

    from flows.retrain import retrain_flow
    from tlpipe.config import load_params
    from tlpipe.ingest import hash_source
    from tlpipe.sources import list_source

    project = make_project(tmp_path / "project", tiny_source)
    data = load_params(project / "params.yaml").data
    current = hash_source(list_source(data.source, data.classes, data.elpv_label, data.elpv_threshold))
    report = project / "reports" / "ingest" / "data_report.json"
    report.parent.mkdir(parents=True)
    report.write_text(json.dumps({"source_hash": current}))
    result = retrain_flow(root=str(project))
    assert result == {"retrained": False, "source_hash": current, "reason": "source unchanged"}
    assert not (project / "data").exists()
