"""The one door to MLflow's fluent API, for the calls that work only on an active run or the global store.

``mlflow.pyfunc.log_model`` logs into the active run of the thread, ``mlflow.register_model`` and
``mlflow.pyfunc.load_model("models:/...")`` use the process's tracking URI. Everything else takes an
``MlflowClient`` and a run id explicitly; these helpers take them too and set what the fluent call needs.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

logger = logging.getLogger("tlpipe.tracking")


def use_store(client) -> None:
    """Point MLflow's fluent API (process-wide) at ``client``'s tracking store."""
    import mlflow

    mlflow.set_tracking_uri(client.tracking_uri)


@contextmanager
def active_run(client, run_id: str) -> Iterator[None]:
    """Make ``run_id`` (on ``client``'s store) the active fluent run of this thread for the block.

    Nothing happens when it already is. Otherwise MLflow resumes it and, on exit,
    ends it; it is then put back to RUNNING for its owner to end.
    """
    import mlflow

    use_store(client)
    active = mlflow.active_run()
    if active is not None and active.info.run_id == run_id:
        yield
        return
    mlflow.set_experiment(experiment_id=client.get_run(run_id).info.experiment_id)
    try:
        with mlflow.start_run(run_id=run_id, nested=active is not None):
            yield
    finally:
        try:
            client.update_run(run_id, status="RUNNING")
        except Exception as error:  # the owner ends it anyway
            logger.warning("could not put MLflow run %s back to RUNNING after this block used it (%s: %s); it "
                           "shows as ended until its owner ends it with its own status", run_id,
                           type(error).__name__, error)
