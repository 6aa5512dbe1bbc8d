"""Scheduled Prefect deployment of the retrain flow (``tlpipe deploy`` / ``tlpipe serve`` / ``tlpipe worker``).

Two ways to execute its runs:

* ``tlpipe serve``: one long-lived process serves the deployment (``flow.serve``);
* ``tlpipe deploy --work-pool NAME`` + ``tlpipe worker --pool NAME``: the deployment lives on a
  Prefect *process* work pool, and any number of workers (``prefect worker start --pool NAME``, on any
  machine that reaches the Prefect server and holds the project at the same path) poll the pool; the
  server hands each flow run to exactly one of them. The flow is loaded from the project folder
  (``flow.from_source(<root>, "flows/retrain.py:retrain_flow")``: local storage, so the only pull step is
  ``set_working_directory``; no image is built and nothing is pushed), and each run starts in that folder.
"""

from __future__ import annotations

from pathlib import Path

from prefect.schedules import Cron

from flows.retrain import retrain_flow
from tlpipe.core.params import load_params


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


ENTRYPOINT = "flows/retrain.py:retrain_flow"
POOL_TYPE = "process"


def ensure_work_pool(name: str) -> bool:
    """Create the process work pool ``name`` on the Prefect server unless it exists; return whether created.

    Raises:
        UsageError: When a pool of that name exists with another type (its workers could not run us).
    """
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    from tlpipe.core.errors import UsageError

    with get_client(sync_client=True) as client:
        try:
            pool = client.read_work_pool(name)
        except ObjectNotFound:
            try:
                client.create_work_pool(WorkPoolCreate(name=name, type=POOL_TYPE))
                return True
            except ObjectAlreadyExists:  # created concurrently
                return False
        if pool.type != POOL_TYPE:
            raise UsageError(f"work pool '{name}' has type '{pool.type}'; tlpipe deploys to a '{POOL_TYPE}' pool: "
                             "choose another name")
        return False


def deploy_to_work_pool(root: Path, work_pool: str, cron: str | None = None) -> tuple[str, str, str]:
    """Create or update the retrain deployment on the process work pool ``work_pool`` (created if missing).

    The flow is loaded from ``root`` (local storage: the pull step only changes into ``root``), runs
    start in ``root`` (``working_dir`` job variable) and get ``root`` as their parameter.

    Returns:
        (deployment id, full name ``retrain/<name>``, cron expression).
    """
    from prefect import Flow

    root = Path(root).resolve()
    name, schedule, expression = build_schedule(root, cron)
    ensure_work_pool(work_pool)
    flow = Flow.from_source(source=str(root), entrypoint=ENTRYPOINT)
    deployment_id = flow.deploy(
        name=name, work_pool_name=work_pool, build=False, push=False, schedules=[schedule],
        parameters={"root": str(root)}, job_variables={"working_dir": str(root)}, tags=["tlpipe"],
        description="Retrain tlpipe when its source data changed; quality-gated promotion.",
        print_next_steps=False, ignore_warnings=True,
    )
    return str(deployment_id), f"{flow.name}/{name}", expression


def worker_command(work_pool: str, name: str | None = None, limit: int | None = None) -> list[str]:
    """The ``prefect worker start`` command line for a process worker on ``work_pool``."""
    import sys

    command = [sys.executable, "-m", "prefect", "worker", "start", "--pool", work_pool, "--type", POOL_TYPE,
               "--install-policy", "never"]
    if name:
        command += ["--name", name]
    if limit:
        command += ["--limit", str(limit)]
    return command


def serve_deployment(root: Path, cron: str | None = None) -> None:
    """Serve the deployment: create it and execute its scheduled runs until interrupted."""
    name, schedule, _ = build_schedule(root, cron)
    retrain_flow.serve(name=name, schedules=[schedule], parameters={"root": str(Path(root).resolve())},
                       tags=["tlpipe"])
