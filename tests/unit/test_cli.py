"""The ``tlpipe`` CLI's manners: one-line errors on stderr, exit codes, ``--version``, help without type names.

Real parts: a real SQLite MLflow registry, real git + DVC experiments, a real Keras model saved as an
MLflow pyfunc folder, real stage processes under ``dvc repro``.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from typer.testing import CliRunner

from flows.cli import app
from flows.common import error_line
from tests.conftest import REPO
from tlpipe.tracking.connection import connect, ensure_experiment

TYPE_NAMES = re.compile(r"<[a-z\[\], |]+>|\b(TEXT|INTEGER|PATH|BOOLEAN|FLOAT|list\[str\])\b")


def invoke(*args: str, cwd: Path | None = None):
    """Run the CLI in-process as `tlpipe ARGS` (optionally from ``cwd``); stdout and stderr kept apart."""
    old = Path.cwd()
    if cwd:
        os.chdir(cwd)
    try:
        return CliRunner().invoke(app, list(args), prog_name="tlpipe")
    finally:
        os.chdir(old)


def one_error_line(result, prefix: str) -> str:
    """The single stderr line of a failed command (no traceback)."""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"{prefix}: error: "), lines[0]
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout
    return lines[0]


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A minimal project folder (params.yaml + dvc.yaml) with its own SQLite MLflow store."""
    root = tmp_path / "proj"
    root.mkdir()
    (root / "params.yaml").write_text((REPO / "params.yaml").read_text())
    (root / "dvc.yaml").write_text("stages: {}\n")
    monkeypatch.delenv("TLPIPE_ROOT", raising=False)
    return root


def test_version() -> None:
    result = invoke("--version")
    assert result.exit_code == 0
    assert re.fullmatch(r"tlpipe \d+\.\d+\.\d+\S*\n", result.stdout)


def test_help_texts_name_values_not_python_types() -> None:
    commands = [[], ["predict"], ["repro"], ["retrain"], ["compare"], ["report"], ["ui"], ["serve-model"],
                ["deploy"], ["serve"], ["prefect-server"], ["prefect-server", "start"]]
    for command in commands:
        result = invoke(*command, "--help")
        assert result.exit_code == 0, (command, result.output)
        assert not TYPE_NAMES.search(result.stdout), (command, TYPE_NAMES.search(result.stdout), result.stdout)
    predict = invoke("predict", "--help").stdout
    assert "Usage: tlpipe predict [OPTIONS] IMAGE..." in predict
    assert "--model URI" in predict and "--top N" in predict


@pytest.mark.parametrize("args", [["predict"], ["bogus"], ["--bogus"], ["predict", "--top", "0", "x.jpg"],
                                  ["compare", "only-one"], ["repro", "--set", "no-equals-sign", "--root", "/"]])
def test_usage_errors_exit_2_with_one_line(args: list[str]) -> None:
    result = invoke(*args)
    assert result.exit_code == 2, result.output
    line = one_error_line(result, "tlpipe" + (f" {args[0]}" if not args[0].startswith("-") and args[0] != "bogus"
                                              else ""))
    assert "--help" in line or "expected KEY=VALUE" in line


def test_root_that_is_no_project_is_one_line(tmp_path: Path) -> None:
    result = invoke("report", "--root", str(tmp_path))
    assert result.exit_code == 1
    assert "is not a tlpipe project" in one_error_line(result, "tlpipe report")


def test_outside_a_project_is_one_line_and_debug_shows_the_traceback(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("TLPIPE_ROOT", raising=False)
    result = invoke("predict", "x.jpg", cwd=tmp_path)
    assert result.exit_code == 1
    assert "no tlpipe project at or above" in one_error_line(result, "tlpipe predict")
    assert result.stdout == ""
    debug = invoke("--debug", "predict", "x.jpg", cwd=tmp_path)
    assert debug.exit_code == 1
    assert "Traceback" in debug.stderr and "ProjectNotFoundError" in debug.stderr
    assert debug.stderr.strip().splitlines()[-1].startswith("tlpipe predict: error: no tlpipe project")


def test_debug_is_accepted_after_the_command(tmp_path: Path, monkeypatch) -> None:
    """The console script moves `--debug` to the front: `tlpipe predict x --debug` works as users type it."""
    monkeypatch.delenv("TLPIPE_ROOT", raising=False)
    done = subprocess.run([str(Path(sys.executable).parent / "tlpipe"), "predict", "x.jpg", "--debug"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert "Traceback" in done.stderr and "tlpipe predict: error: no tlpipe project" in done.stderr


def registry_with_champion(project: Path) -> str:
    """A real SQLite registry in ``project``: model 'tlpipe-classifier' v1 with alias champion; returns its run id."""
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{project}/mlflow.db")
    experiment = client.create_experiment("tlpipe", artifact_location=(project / "mlartifacts").as_uri())
    run = client.create_run(experiment)
    client.create_registered_model("tlpipe-classifier")
    version = client.create_model_version("tlpipe-classifier", str(project / "model"), run_id=run.info.run_id)
    client.set_registered_model_alias("tlpipe-classifier", "champion", version.version)
    client.set_terminated(run.info.run_id)
    return run.info.run_id


def test_unknown_alias_or_model_is_one_line(project: Path) -> None:
    registry_with_champion(project)
    result = invoke("predict", "x.jpg", "--model", "models:/tlpipe-classifier@staging", "--root", str(project))
    assert result.exit_code == 1
    line = one_error_line(result, "tlpipe predict")
    assert "has no alias @staging" in line and "@champion -> v1" in line
    result = invoke("predict", "x.jpg", "--model", "models:/tlpipe-classifier/7", "--root", str(project))
    assert "has no version 7" in one_error_line(result, "tlpipe predict")
    result = invoke("predict", "x.jpg", "--model", "models:/nope@champion", "--root", str(project))
    line = one_error_line(result, "tlpipe predict")
    assert "no registered model 'nope'" in line and "registered: tlpipe-classifier" in line
    result = invoke("predict", "x.jpg", "--model", str(project / "no-such-folder"), "--root", str(project))
    assert "neither a URI" in one_error_line(result, "tlpipe predict")


def test_identify_model_pins_the_alias_to_its_version(project: Path) -> None:
    from mlflow import MlflowClient

    from tlpipe.serving.predict import identify_model

    run_id = registry_with_champion(project)
    identity = identify_model("models:/tlpipe-classifier@champion", MlflowClient(f"sqlite:///{project}/mlflow.db"))
    assert (identity.name, identity.version, identity.alias, identity.run_id) == (
        "tlpipe-classifier", "1", "champion", run_id)
    assert identity.load_uri == "models:/tlpipe-classifier/1"
    assert identity.describe() == f"tlpipe-classifier v1 (@champion), run {run_id}"


def test_unreachable_tracking_is_one_line(project: Path, monkeypatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")  # nothing listens on the discard port
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    result = invoke("predict", "x.jpg", "--root", str(project))
    assert result.exit_code == 1
    assert "unreachable" in one_error_line(result, "tlpipe predict")


@pytest.fixture(scope="module")
def pyfunc_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny real Keras classifier saved as a local MLflow pyfunc folder."""
    import keras

    from tlpipe.serving.packaging import save_keras_classifier

    keras.utils.set_random_seed(3)
    inputs = keras.Input((16, 16, 3), dtype="uint8")
    x = keras.layers.GlobalAveragePooling2D()(keras.layers.Rescaling(1 / 255)(keras.ops.cast(inputs, "float32")))
    network = keras.Model(inputs, keras.layers.Dense(2, activation="softmax")(x))
    root = tmp_path_factory.mktemp("cli-model")
    network.save(root / "tiny.keras")
    save_keras_classifier(root / "pyfunc", root / "tiny.keras", ["dark", "light"], 16, "stretch")
    return root / "pyfunc"


def test_predict_results_on_stdout_failures_on_stderr_exit_1(project: Path, pyfunc_model: Path,
                                                             tmp_path: Path) -> None:
    good = tmp_path / "good.png"
    Image.fromarray(np.full((40, 40, 3), 200, np.uint8)).save(good)
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg")
    result = invoke("predict", str(good), str(broken), str(tmp_path / "missing.jpg"), "--model", str(pyfunc_model),
                    "--root", str(project))
    assert result.exit_code == 1, result.output
    out = result.stdout.strip().splitlines()
    assert out[0] == f"model: {pyfunc_model}, classes: [dark, light]" and len(out) == 2
    assert out[1].startswith(str(good))
    errors = result.stderr.strip().splitlines()
    assert len(errors) == 2 and all(line.startswith("tlpipe predict: error: ") for line in errors), errors
    assert "broken.jpg" in errors[0] and "missing.jpg: no such file or directory" in errors[1]

    only_good = invoke("predict", str(good), "--model", str(pyfunc_model), "--json", "--root", str(project))
    assert only_good.exit_code == 0 and only_good.stderr == ""
    rows = json.loads(only_good.stdout)
    assert rows[0]["class"] in {"dark", "light"} and rows[0]["model"]["uri"] == str(pyfunc_model)


def register_champion(project: Path, keras_file: Path, name: str, classes: list[str], tag_classes: bool) -> None:
    """Log ``keras_file`` as a pyfunc into the project's SQLite store, register it as ``name`` and make it
    ``@champion`` (its versions tagged with the class names, as the evaluate stage does, when ``tag_classes``)."""

    from tlpipe.tracking.logged_models import log_keras_classifier
    from tlpipe.tracking.registry import CLASSES_TAG

    client = connect(project)
    run = client.create_run(ensure_experiment(client, project, name))
    log_keras_classifier(client, run.info.run_id, "frozen", keras_file, classes, 16, "stretch",
                         registered_model_name=name)
    client.set_terminated(run.info.run_id)
    version = client.search_model_versions(f"name = '{name}'")[0].version
    if tag_classes:
        client.set_model_version_tag(name, version, CLASSES_TAG, json.dumps(classes))
    client.set_registered_model_alias(name, "champion", version)


def test_predict_answers_with_the_current_tasks_champion_only(project: Path, pyfunc_model: Path,
                                                               tmp_path: Path) -> None:
    """Issue 19: a champion of another task (the ELPV model) never answers for this task's images unless named."""
    photos = tmp_path / "photos"
    for name in ("ants", "bees"):
        (photos / name).mkdir(parents=True)
        Image.fromarray(np.full((40, 40, 3), 90, np.uint8)).save(photos / name / "a.png")
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["data"]["source"] = str(photos)
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    keras_file = pyfunc_model.parent / "tiny.keras"
    register_champion(project, keras_file, "elpv-defect", ["defective", "functional"], tag_classes=True)
    image = str(photos / "ants" / "a.png")

    missing = invoke("predict", image, "--root", str(project))
    assert missing.exit_code == 1 and missing.stdout == ""
    line = one_error_line(missing, "tlpipe predict")
    assert "task 'photos-ants-bees' has no champion yet" in line and "tlpipe repro" in line
    assert "elpv-defect v1 [defective, functional]" in line and "--model models:/NAME@champion" in line
    serve = invoke("serve-model", "--root", str(project))  # fails the same way, before starting a server
    assert serve.exit_code == 1 and "has no champion yet" in one_error_line(serve, "tlpipe serve-model")

    named = invoke("predict", image, "--model", "models:/elpv-defect@champion", "--root", str(project))
    assert named.exit_code == 0, named.output
    assert named.stdout.startswith("model: elpv-defect v1 (@champion), classes: [defective, functional], run ")

    register_champion(project, keras_file, "photos-ants-bees", ["ants", "bees"], tag_classes=False)
    result = invoke("predict", image, "--root", str(project))
    assert result.exit_code == 0, result.output
    first, row = result.stdout.strip().splitlines()
    assert first.startswith("model: photos-ants-bees v1 (@champion), classes: [ants, bees], run ")  # from the model
    assert row.split()[1] in {"ants", "bees"}
    rows = json.loads(invoke("predict", image, "--json", "--root", str(project)).stdout)
    assert rows[0]["model"]["name"] == "photos-ants-bees" and rows[0]["model"]["classes"] == ["ants", "bees"]


def test_predict_imagenet_missing_file_is_one_line_exit_1(tmp_path: Path) -> None:
    result = invoke("predict", "--imagenet", str(tmp_path / "nope.jpg"))
    assert result.exit_code == 1
    assert "nope.jpg: no such file or directory" in one_error_line(result, "tlpipe predict")
    unknown = invoke("predict", "--imagenet", "--backbone", "vgg99", str(tmp_path / "nope.jpg"))
    assert unknown.exit_code == 2
    assert "--backbone 'vgg99' is unknown" in one_error_line(unknown, "tlpipe predict")


def test_report_prints_the_path_or_says_what_to_run(project: Path) -> None:
    missing = invoke("report", "--root", str(project))
    assert missing.exit_code == 1
    assert "tlpipe repro" in one_error_line(missing, "tlpipe report")
    page = project / "reports" / "evaluate" / "report.html"
    page.parent.mkdir(parents=True)
    page.write_text("<html></html>")
    found = invoke("report", "--root", str(project))
    assert found.exit_code == 0 and found.stdout.strip() == str(page)


def test_error_line_folds_multi_line_messages() -> None:
    assert error_line(ValueError("invalid params.yaml:\n  data.x: unknown key\n  svm.y: bad")) == (
        "invalid params.yaml: data.x: unknown key; svm.y: bad")
    assert error_line(ValueError("a\nb")) == "a; b"
    assert error_line(ValueError("")) == "ValueError"


# --- tlpipe compare: real DVC experiments and a real MLflow store ------------------------------------------

METRICS_CMD = ("python -c \"import json,yaml; p=yaml.safe_load(open('params.yaml')); "
               "json.dump({'svm_pixels': {'acc': p['svm']['c'] / 10}, 'frozen': {'acc': 0.5}}, "
               "open('metrics/evaluate.json','w'))\"")


def dvc_project(root: Path, env: dict) -> Path:
    """A git + DVC project whose one stage writes metrics/evaluate.json from params.yaml."""
    root.mkdir()
    (root / "params.yaml").write_text(yaml.safe_dump({"svm": {"c": 1, "kernel": "linear"}, "data": {"size": 32}}))
    (root / "metrics").mkdir()
    (root / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"evaluate": {
        "cmd": METRICS_CMD, "params": ["svm", "data"],
        "metrics": [{"metrics/evaluate.json": {"cache": False}}]}}}))
    for command in (["git", "init", "-q"], [sys.executable, "-m", "dvc", "init", "-q"],
                    [sys.executable, "-m", "dvc", "repro", "-q"], ["git", "add", "-A"],
                    ["git", "commit", "-qm", "baseline"]):
        subprocess.run(command, cwd=root, env=env, check=True, capture_output=True, timeout=300)
    return root


def test_compare_two_dvc_experiments_and_an_mlflow_run(tmp_path: Path) -> None:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    root = dvc_project(tmp_path / "exps", env)
    for name, c in (("exp-low", 2), ("exp-high", 7)):
        subprocess.run([sys.executable, "-m", "dvc", "exp", "run", "-q", "-n", name, "-S", f"svm.c={c}"], cwd=root,
                       env=env, check=True, capture_output=True, timeout=300)
    result = invoke("compare", "exp-low", "exp-high", "--root", str(root))
    assert result.exit_code == 0, result.output
    text = result.stdout
    assert "A: exp-low (DVC experiment" in text and "B: exp-high (DVC experiment" in text
    assert re.search(r"svm_pixels\s+0\.2000\s+0\.7000\s+\+0\.5000", text), text
    assert re.search(r"frozen\s+0\.5000\s+0\.5000\s+\+0\.0000", text), text
    differing = text.split("params that differ")[1]
    assert re.search(r"svm\.c\s+2\s+7", differing) and "kernel" not in differing and "data.size" not in differing

    listed = invoke("exps", "--root", str(root))  # what `make exps` prints: a column per model, by its name
    assert listed.exit_code == 0, listed.output
    assert listed.stdout.splitlines()[0].split() == ["experiment", "svm_pixels", "frozen", "svm.c"]
    assert re.search(r"^  exp-low\s+0\.2000\s+0\.5000\s+2$", listed.stdout, re.MULTILINE), listed.stdout
    assert re.search(r"^  exp-high\s+0\.7000\s+0\.5000\s+7$", listed.stdout, re.MULTILINE), listed.stdout

    # an MLflow pipeline run against the workspace: accuracies from its metrics, params from its stage runs
    from mlflow import MlflowClient

    from tlpipe.tracking.runs import create_pipeline_run
    from tlpipe.tracking.tags import STAGE_TAG

    client = MlflowClient(f"sqlite:///{root}/mlflow.db")
    experiment = client.create_experiment("tlpipe")
    parent = create_pipeline_run(client, experiment, root)
    client.log_metric(parent, "svm_pixels.test_accuracy", 0.3)
    stage = client.create_run(experiment, tags={"mlflow.parentRunId": parent, STAGE_TAG: "svm"})
    client.log_param(stage.info.run_id, "svm.c", "3")
    result = invoke("compare", parent, "workspace", "--root", str(root))
    assert result.exit_code == 0, result.output
    assert f"A: {parent[:8]} (MLflow pipeline run)" in result.stdout
    assert re.search(r"svm_pixels\s+0\.3000\s+0\.\d+", result.stdout)
    assert re.search(r"svm\.c\s+3\s+\d", result.stdout.split("params that differ")[1])

    unknown = invoke("compare", "exp-low", "no-such-exp", "--root", str(root))
    assert unknown.exit_code == 1
    line = one_error_line(unknown, "tlpipe compare")
    assert "'no-such-exp' is not a DVC experiment" in line and "exp-high" in line and "exp-low" in line
