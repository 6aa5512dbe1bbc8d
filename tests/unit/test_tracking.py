"""tlpipe.tracking on a real SQLite MLflow store: stale runs, stage and model runs, test metrics, retries."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.tiny_data import write_tiny_store
from tlpipe.core.hashing import file_sha256
from tlpipe.tracking.connection import (
    EXPERIMENT_ENV,
    EXPERIMENT_KIND_TAG,
    HTTP_DEFAULTS,
    TrackingUnavailableError,
    artifact_location,
    compare_url,
    connect,
    ensure_experiment,
    outage_reported,
    ui_url,
)
from tlpipe.tracking.fluent import use_store
from tlpipe.tracking.records import log_test_metrics, set_tags, split_dataset
from tlpipe.tracking.runs import (
    end_run_quietly,
    finish_pipeline_run,
    model_run,
    owner_is_gone,
    process_tags,
    reap_stale_runs,
    stage_run,
)
from tlpipe.tracking.tags import (
    HOST_TAG,
    KIND_TAG,
    MODEL_SHA_TAG,
    MODEL_TAG,
    PARENT_ENV,
    PID_TAG,
    PROCESS_START_TAG,
    REAPED_TAG,
    STAGE_TAG,
)


@pytest.fixture
def root(tmp_path: Path, monkeypatch) -> Path:
    """A project folder whose tracking store is its own ``mlflow.db``."""
    for key in ("MLFLOW_TRACKING_URI", PARENT_ENV, EXPERIMENT_ENV):
        monkeypatch.delenv(key, raising=False)
    return tmp_path


@pytest.fixture
def store(root: Path):
    """(client, experiment id) on the project's SQLite store."""
    client = connect(root)
    return client, ensure_experiment(client, root)


def dead_process_tags() -> dict[str, str]:
    """Process tags of a process that has ended (started, tagged, killed, reaped)."""
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        tags = process_tags(process.pid)
    finally:
        process.kill()
        process.wait()
    return tags


def status(client, run_id: str) -> str:
    return client.get_run(run_id).info.status


def test_reap_ends_runs_whose_process_is_gone_and_their_children(store) -> None:
    client, experiment_id = store
    dead = dead_process_tags()
    stale = client.create_run(experiment_id, tags=dead).info.run_id
    child = client.create_run(experiment_id, tags={"mlflow.parentRunId": stale}).info.run_id  # no owner tags
    grandchild = client.create_run(experiment_id, tags={"mlflow.parentRunId": child, **process_tags()}).info.run_id
    live = client.create_run(experiment_id, tags=process_tags()).info.run_id
    recycled_tags = {**process_tags(), PROCESS_START_TAG: "12345.000"}  # our pid, another process
    recycled = client.create_run(experiment_id, tags=recycled_tags).info.run_id
    elsewhere = client.create_run(experiment_id, tags={**dead, HOST_TAG: "another-host"}).info.run_id
    untagged = client.create_run(experiment_id).info.run_id
    finished = client.create_run(experiment_id, tags=dead).info.run_id
    client.set_terminated(finished, "FINISHED")

    reaped = reap_stale_runs(client, experiment_id)

    assert set(reaped) == {stale, child, grandchild, recycled}
    assert reaped.index(stale) < reaped.index(child) < reaped.index(grandchild)  # parents first
    for run_id in reaped:
        assert status(client, run_id) == "KILLED"
        assert client.get_run(run_id).info.end_time is not None
    assert f"process {dead[PID_TAG]} on {socket.gethostname()}" in \
        client.get_run(stale).data.tags[REAPED_TAG]
    assert {status(client, r) for r in (live, elsewhere, untagged)} == {"RUNNING"}
    assert status(client, finished) == "FINISHED"
    assert reap_stale_runs(client, experiment_id) == []  # nothing left to reap


def test_owner_is_gone_judges_only_this_hosts_tagged_runs() -> None:
    assert owner_is_gone(dead_process_tags())
    assert not owner_is_gone(process_tags())
    assert not owner_is_gone({})
    assert not owner_is_gone({**dead_process_tags(), HOST_TAG: "another-host"})


def test_stage_run_reaps_stale_runs_then_records_its_own_process(root: Path, store) -> None:
    client, experiment_id = store
    stale = client.create_run(experiment_id, run_name="svm", tags=dead_process_tags()).info.run_id
    before = time.time()
    with stage_run("svm", root, {"svm": {"cv_folds": 3}}, "abc") as run_id:
        assert status(client, stale) == "KILLED"
        assert status(client, run_id) == "RUNNING"
        time.sleep(0.3)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags[PID_TAG] == str(os.getpid())
    assert run.data.tags[HOST_TAG] == socket.gethostname()
    assert run.data.tags[STAGE_TAG] == "svm" and run.data.tags["tlpipe.data_hash"] == "abc"
    assert run.data.params["svm.cv_folds"] == "3"
    assert before * 1000 - 5 <= run.info.start_time and run.info.end_time - run.info.start_time >= 300


def test_stage_run_id_is_passed_to_a_task_in_another_thread_and_the_run_ends_once(root: Path, store) -> None:
    import mlflow

    client, _ = store
    seen = {}

    def task(run_id: str) -> None:  # what a Prefect task does with the stage run id the flow passes it
        seen["active"] = mlflow.active_run()
        set_tags(client, run_id, {"from_task": "yes"})

    with stage_run("evaluate", root) as run_id:
        assert mlflow.active_run() is None  # no fluent state: the run id is passed, not found
        thread = threading.Thread(target=task, args=(run_id,))
        thread.start()
        thread.join()
        assert seen["active"] is None
        assert status(client, run_id) == "RUNNING"  # the task's exit does not end the flow's run
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["from_task"] == "yes"
    assert len(client.search_runs([run.info.experiment_id], "tags.`tlpipe.stage` = 'evaluate'")) == 1


def test_stage_run_ends_failed_when_its_work_fails(root: Path, store) -> None:
    client, experiment_id = store
    with pytest.raises(RuntimeError, match="boom"), stage_run("features", root):
        raise RuntimeError("boom")
    [run] = client.search_runs([experiment_id], "tags.`tlpipe.stage` = 'features'")
    assert run.info.status == "FAILED"


def test_model_run_is_a_child_of_the_stage_run_with_its_owner(root: Path, store) -> None:
    client, _ = store
    with stage_run("svm", root) as stage:
        with model_run(client, "svm_features", stage, {"tlpipe.family": "svm"}) as model:
            import mlflow

            assert mlflow.active_run() is None  # the run id is passed, not made the fluent run
    run = client.get_run(model)
    assert run.info.status == "FINISHED" and run.info.run_name == "svm_features"
    assert run.data.tags["mlflow.parentRunId"] == stage
    assert run.data.tags[KIND_TAG] == "model" and run.data.tags[MODEL_TAG] == "svm_features"
    assert run.data.tags[PID_TAG] == str(os.getpid())


def test_experiment_opens_in_the_training_view_with_artifacts_in_mlartifacts(root: Path, store) -> None:
    client, experiment_id = store
    experiment = client.get_experiment(experiment_id)
    assert experiment.tags[EXPERIMENT_KIND_TAG] == "custom_model_development"
    use_store(client)  # mlflow.set_tracking_uri exports MLFLOW_TRACKING_URI: still mlartifacts/
    assert os.environ["MLFLOW_TRACKING_URI"] == f"sqlite:///{root.resolve()}/mlflow.db"
    assert experiment.artifact_location == (root.resolve() / "mlartifacts").as_uri()
    assert artifact_location(root) == experiment.artifact_location
    client.set_experiment_tag(experiment_id, EXPERIMENT_KIND_TAG, "genai_development")  # a user's choice
    assert ensure_experiment(client, root) == experiment_id
    assert client.get_experiment(experiment_id).tags[EXPERIMENT_KIND_TAG] == "genai_development"


def test_ui_links_open_the_model_training_view() -> None:
    assert ui_url("http://127.0.0.1:5000/", "1") == \
        "http://127.0.0.1:5000/#/experiments/1/runs?workflowType=machine_learning"
    assert ui_url("http://h:5000", "3", "abc") == \
        "http://h:5000/#/experiments/3/runs/abc?workflowType=machine_learning"
    assert compare_url("http://h:5000", "1", ["a", "b"]) == \
        'http://h:5000/#/compare-runs?runs=["a","b"]&experiments=["1"]&workflowType=machine_learning'


def test_http_retries_are_mlflows_own_bounded_settings(root: Path, monkeypatch) -> None:
    from mlflow.environment_variables import MLFLOW_HTTP_REQUEST_MAX_RETRIES, MLFLOW_HTTP_REQUEST_TIMEOUT

    for key in HTTP_DEFAULTS:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "7")  # a user's value wins
    connect(root)
    assert MLFLOW_HTTP_REQUEST_MAX_RETRIES.get() == 4  # retried, not zeroed
    assert MLFLOW_HTTP_REQUEST_TIMEOUT.get() == 7


def test_unreachable_server_fails_fast_naming_the_uri(root: Path, monkeypatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")
    with pytest.raises(TrackingUnavailableError, match=r"http://127\.0\.0\.1:9 is unreachable after 2 attempts"):
        connect(root, attempts=2, backoff_s=0.1)


def test_an_error_while_logging_to_a_store_gone_away_is_reported_as_one_line(root: Path, store,
                                                                          monkeypatch) -> None:
    """A logging task's error becomes a user error naming the store only when the store no longer answers;
    with the store up, the task's own error passes unchanged."""
    with pytest.raises(ValueError, match="bad value"), outage_reported(root, "logging the SVMs"):
        raise ValueError("bad value")  # the store answers: not an outage
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")
    with pytest.raises(TrackingUnavailableError, match=r"http://127\.0\.0\.1:9 became unreachable while logging "
                                                       r"the SVMs \(RuntimeError: refused\)") as caught, \
            outage_reported(root, "logging the SVMs"):
        raise RuntimeError("refused\nsecond line")
    assert isinstance(caught.value.__cause__, RuntimeError)
    with pytest.raises(TrackingUnavailableError, match="first"), outage_reported(root, "logging"):
        raise TrackingUnavailableError("first")  # already reported: kept as it is


def test_a_failing_server_is_probed_once_per_attempt_without_mlflows_retries(root: Path, monkeypatch) -> None:
    """A server answering 503 (which MLflow's own client retries, up to 7 times with back-off) gets exactly one
    request per attempt: counted at the server, not timed."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    requests: list[str] = []

    class Unavailable(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            requests.append(self.path)
            self.send_response(503)
            self.end_headers()

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Unavailable)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    uri = f"http://127.0.0.1:{server.server_address[1]}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    try:
        with pytest.raises(TrackingUnavailableError, match=f"{uri} is unreachable after 3 attempts"):
            connect(root, attempts=3, backoff_s=0.01)
    finally:
        server.shutdown()
        server.server_close()
    assert len(requests) == 3, requests
    assert all(path.startswith("/api/2.0/mlflow/experiments/search") for path in requests), requests


def log_fake_model(client, experiment_id: str, model_file: Path) -> tuple[str, str]:
    """A FINISHED model run with a logged model recorded for ``model_file`` (as the stages tag it)."""
    from mlflow.entities import LoggedModelOutput

    run_id = client.create_run(experiment_id, tags={MODEL_TAG: "svm_features",
                                                    MODEL_SHA_TAG: file_sha256(model_file)}
                               ).info.run_id
    model = client.create_logged_model(experiment_id, name="svm_features", source_run_id=run_id)
    client.log_outputs(run_id, [LoggedModelOutput(model.model_id, step=0)])
    client.set_terminated(run_id, "FINISHED")
    return run_id, model.model_id


def test_test_metrics_land_on_the_model_run_and_logged_model_once(root: Path, store, tmp_path: Path) -> None:
    client, experiment_id = store
    store_dir = write_tiny_store(tmp_path / "store", {"train": 4, "val": 2, "test": 3})
    model_file = tmp_path / "svm_features.joblib"
    model_file.write_bytes(b"a model")
    run_id, model_id = log_fake_model(client, experiment_id, model_file)
    killed = client.create_run(experiment_id, tags={MODEL_SHA_TAG: file_sha256(model_file)})
    client.set_terminated(killed.info.run_id, "KILLED")  # a killed attempt on the same file is ignored
    values = {"accuracy": 0.75, "balanced_accuracy": 0.7, "f1_macro": 0.69, "roc_auc": None,
              "per_class": {"ants": {"f1": 0.6}}}

    for _ in range(2):  # an evaluate rerun logs nothing new
        ref = log_test_metrics(client, experiment_id, model_file, values, store_dir, "/data/hymenoptera")

    assert (ref.run_id, ref.model_id, ref.model_uri) == (run_id, model_id, f"models:/{model_id}")
    run = client.get_run(run_id)
    assert {k: v for k, v in run.data.metrics.items()} == {
        "test_accuracy": 0.75, "test_balanced_accuracy": 0.7, "test_f1_macro": 0.69}
    assert len(client.get_metric_history(run_id, "test_accuracy")) == 1
    [test_input] = run.inputs.dataset_inputs
    assert {t.key: t.value for t in test_input.tags}["mlflow.data.context"] == "test"
    assert test_input.dataset.name == "hymenoptera-test"
    model_metrics = client.get_logged_model(model_id).metrics
    assert sorted(m.key for m in model_metrics) == ["test_accuracy", "test_balanced_accuracy", "test_f1_macro"]
    assert {(m.dataset_name, m.dataset_digest) for m in model_metrics} == {
        (test_input.dataset.name, test_input.dataset.digest)}
    other = tmp_path / "other.joblib"
    other.write_bytes(b"never logged")
    assert log_test_metrics(client, experiment_id, other, values, store_dir, "elpv") is None


def test_split_datasets_are_named_and_digested_by_their_images(tmp_path: Path) -> None:
    first = write_tiny_store(tmp_path / "a", {"train": 4, "val": 2, "test": 3})
    train = split_dataset(first, "train", "/x/hymenoptera/")
    assert train.name == "hymenoptera-train" and len(train.df) == 8
    assert split_dataset(first, "train", "elpv").digest == train.digest
    assert split_dataset(first, "test", "elpv").digest != train.digest


def test_tasks_that_create_runs_are_not_retried() -> None:
    from tasks.features import log_features
    from tasks.finetune import log_networks
    from tasks.ingest import log_ingest
    from tasks.svm import log_svms

    assert [t.retries for t in (log_ingest, log_features, log_svms, log_networks)] == [0, 0, 0, 0]


def test_failures_after_the_work_are_logged_not_swallowed(store, caplog: pytest.LogCaptureFixture) -> None:
    """Ending or tagging a run that cannot be reached never raises, but says what failed and what happens."""
    client, _ = store
    missing = "0" * 32  # no such run in the store
    with caplog.at_level("WARNING", logger="tlpipe.tracking"):
        finish_pipeline_run(client, missing, "svm", "FINISHED")
        end_run_quietly(client, missing, "FAILED", raise_errors=False)
    lines = [record.getMessage() for record in caplog.records if record.name == "tlpipe.tracking"]
    assert len(lines) == 2, lines
    assert missing in lines[0] and "svm" in lines[0] and "FINISHED" in lines[0]
    assert missing in lines[1] and "FAILED" in lines[1] and "reap" in lines[1]


def test_a_store_that_cannot_be_created_is_logged(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from tlpipe.tracking.sqlite_store import ensure_sqlite_store

    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    with caplog.at_level("WARNING", logger="tlpipe.local_store"):
        uri = ensure_sqlite_store(blocker / "mlflow.db")  # its folder is a file: SQLite cannot create it
    assert uri.endswith("not-a-folder/mlflow.db")
    lines = [record.getMessage() for record in caplog.records if record.name == "tlpipe.local_store"]
    assert len(lines) == 1 and "not-a-folder/mlflow.db" in lines[0] and "going on" in lines[0]
