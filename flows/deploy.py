"""Scheduled Prefect deployment of the retrain flow (``tlpipe deploy`` / ``tlpipe serve``)."""

from __future__ import annotations

from pathlib import Path

from prefect.schedules import Cron

from tlpipe.config import load_params
from flows.retrain import retrain_flow


def build_schedule(root: Path, cron: str | None) -> tuple[str, Cron, str]:
    """The deployment name and its cron schedule (CLI value, else params.yaml)."""
    params = load_params(Path(root) / "params.yaml").schedule
    expression = cron or params.cron
    return params.deployment_name, Cron(expression, timezone=params.timezone), expression


def create_deployment(root: Path, cron: str | None = None) -> tuple[str, str, str]:
    """Create or update the deployment on the Prefect server; return (id, full name, cron)."""
    name, schedule, expression = build_schedule(root, cron)
    deployment = retrain_flow.to_deployment(
        name=name, schedules=[schedule], parameters={"root": str(Path(root).resolve())},
        description="Retrain tlpipe when its source data changed; quality-gated promotion.",
        tags=["tlpipe"],
    )
    deployment_id = deployment.apply()
    return str(deployment_id), f"{retrain_flow.name}/{name}", expression


def serve_deployment(root: Path, cron: str | None = None) -> None:
    """Serve the deployment: create it and execute its scheduled runs until interrupted."""
    name, schedule, _ = build_schedule(root, cron)
    retrain_flow.serve(name=name, schedules=[schedule], parameters={"root": str(Path(root).resolve())},
                       tags=["tlpipe"])
