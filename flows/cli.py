"""The ``tlpipe`` command line (Typer). Heavy imports happen inside each command.

It lives in ``flows`` (the entry-point layer), so the core package ``tlpipe`` never
imports flows. Manners (issue 11/12): results on stdout, errors on stderr; a user
error (:class:`~tlpipe.core.errors.UserError`) prints one line and exits 1, a usage
error exits 2, anything else is a bug and keeps its traceback; ``--debug`` (or
``TLPIPE_DEBUG=1``) shows the traceback of user errors too.

Adding a command: a function decorated with ``@app.command()`` whose options use
``Annotated[..., typer.Option(metavar=...)]`` (no raw type names in the help);
raise a ``UserError`` subclass for anything the user can fix.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Annotated, NoReturn

import typer

from flows.cli_app import (
    ApiUrlOption,
    HostOption,
    PortOption,
    RootOption,
    app,
    prefect_app,
    prepare_environment,
    prepare_prefect,
    resolve_root,
)
from tlpipe.core.errors import UsageError, UserError
from tlpipe.tracking.connection import connect, experiment_name, quiet_telemetry, tracking_uri, ui_url


@app.command()
def repro(
    set_: Annotated[list[str] | None, typer.Option("--set", "-S", metavar="KEY=VALUE",
                                                      help="param override (runs dvc exp run)")] = None,
    exp: Annotated[bool, typer.Option("--exp", help="run as a DVC experiment")] = False,
    root: RootOption = None,
) -> None:
    """Run the pipeline through DVC under one MLflow pipeline run (what `make run` does)."""
    for item in set_ or []:
        if "=" not in item:
            raise UsageError(f"--set {item!r}: expected KEY=VALUE, e.g. svm.c_grid.num=7")
    root = prepare_prefect(root)
    from flows.common import prefect_context
    from flows.pipeline import pipeline_flow

    try:
        with prefect_context(root):
            result = pipeline_flow(root=str(root), overrides=list(set_ or []), experiment=exp)
        typer.echo(json.dumps({"stages_ran": result["stages_ran"], "promotion": result["promotion"].get("reason")},
                              indent=2))
        for model, values in result["metrics"].items():
            accuracy = next((values[k] for k in ("acc", "accuracy") if k in values), float("nan"))
            typer.echo(f"{model:14s} test accuracy {accuracy:.4f}")
    finally:
        tell_prefect_server_lifetime(root)


def tell_prefect_server_lifetime(root: Path) -> None:
    """Say (stderr) that the project's Prefect server stays up: where, until when, how to stop it."""
    from tlpipe.ops.prefect_watchdog import lifetime_note

    if note := lifetime_note(root):
        typer.echo(note, err=True)


@app.command()
def retrain(
    force: Annotated[bool, typer.Option(help="rerun even if DVC reports nothing stale (rebuilds the store)")] = False,
    root: RootOption = None,
) -> None:
    """Rerun the pipeline if DVC reports a stale input (source images, code, params); the gate picks the champion."""
    root = prepare_prefect(root)
    from flows.common import prefect_context
    from flows.retrain import retrain_flow

    with prefect_context(root):
        result = retrain_flow(root=str(root), force=force)
    shown = ("retrained", "reason", "stale", "stages_ran", "promotion")
    typer.echo(json.dumps({k: v for k, v in result.items() if k in shown}, indent=2, default=str))


@app.command()
def predict(
    images: Annotated[list[str], typer.Argument(metavar="IMAGE", help="image files or folders")],
    model: Annotated[str | None, typer.Option(
        metavar="URI", help="models:/NAME@ALIAS (default: the champion of the current task), models:/NAME/VERSION, "
                            "runs:/RUN_ID/NAME or a local model folder")] = None,
    top: Annotated[int, typer.Option(min=1, metavar="N", help="classes to show per image")] = 1,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
    imagenet: Annotated[bool, typer.Option("--imagenet",
                                           help="top ImageNet classes of the pretrained backbone")] = False,
    backbone: Annotated[str, typer.Option(metavar="NAME", help="backbone for --imagenet")] = "efficientnet_lite0",
    weights: Annotated[str, typer.Option(metavar="WEIGHTS",
                                         help="weights for --imagenet: imagenet or a file")] = "imagenet",
    root: RootOption = None,
) -> None:
    """Classify images with the champion of the project's current task (or ImageNet classes with --imagenet).

    Results go to stdout (first the model that answered), errors to stderr. Exit
    code 0 when every input was classified, 1 when any failed, 2 on bad usage.
    """
    global skip_teardown
    skip_teardown = True  # nothing is left to do once the results are printed
    quiet_telemetry()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if imagenet:
        identity, rows = predict_imagenet(images, backbone, weights, top)
    else:
        identity, rows = predict_with_model(images, model, top, root)
    print_predictions(identity, rows, as_json)
    if any(row["error"] for row in rows):
        raise typer.Exit(1)


def predict_imagenet(images: list[str], backbone: str, weights: str, top: int) -> tuple[dict, list[dict]]:
    """The ImageNet classes of ``images`` by a pretrained backbone."""
    from tlpipe.features.backbones import list_backbones
    from tlpipe.serving.predict import predict_imagenet_rows

    if backbone not in list_backbones():
        raise UsageError(f"--backbone {backbone!r} is unknown; choose one of {', '.join(list_backbones())}")
    rows = predict_imagenet_rows(images, backbone, weights, top)
    return {"uri": f"{backbone} ImageNet classifier", "weights": weights}, rows


def predict_with_model(images: list[str], model: str | None, top: int, root: Path | None) -> tuple[dict, list[dict]]:
    """The classes of ``images`` by the model ``--model`` names (default: the current task's champion)."""
    from tlpipe.serving.predict import classify_images

    project = resolve_root(root)
    prepare_environment(project)
    identity = identify_requested_model(model, project)
    rows, classes = classify_images(identity.load_uri, images, top=top)
    identity = identity.with_classes(classes)
    return {**identity.as_dict(), "description": identity.describe()}, rows


def identify_requested_model(model: str | None, project: Path):
    """The model ``--model`` names, checked to exist; by default the ``@champion`` of the project's current
    task (``params.yaml``): a model of another task answers only when named."""
    from tlpipe.core.task import load_task
    from tlpipe.serving.predict import identify_champion, identify_model, resolve_model_uri
    from tlpipe.tracking.fluent import use_store

    if model is None:
        task = load_task(project)
        client = connect(project)
        use_store(client)  # the model loads from a models:/ URI, which MLflow resolves through its fluent store
        return identify_champion(task.name, task.model_name, client)
    uri = resolve_model_uri(model, project)
    if Path(uri).is_dir():
        return identify_model(uri, None)
    client = connect(project)
    use_store(client)
    return identify_model(uri, client)


def print_predictions(identity: dict, rows: list[dict], as_json: bool) -> None:
    """Results on stdout (each JSON row names the model), one line per failed input on stderr."""
    from tlpipe.serving.predict import format_predictions

    good = [row for row in rows if not row["error"]]
    if as_json:
        typer.echo(json.dumps([{**row, "top": [list(p) for p in row["top"]], "model": identity} for row in rows],
                              indent=2))
    else:
        typer.echo(f"model: {identity.get('description') or identity['uri']}")
        if good:
            typer.echo(format_predictions(good, as_json=False))
    for row in rows:
        if row["error"]:
            typer.echo(f"tlpipe predict: error: {row['path']}: {row['error']}", err=True)


@app.command()
def report(
    open_: Annotated[bool, typer.Option("--open", help="open it in the web browser")] = False,
    root: RootOption = None,
) -> None:
    """Print the path of the evaluate stage's HTML report (reports/evaluate/report.html), or open it."""
    path = resolve_root(root) / "reports" / "evaluate" / "report.html"
    if not path.is_file():
        raise UserError(f"no report at {path} yet: run the pipeline first (tlpipe repro)")
    typer.echo(str(path))
    if open_:
        import webbrowser

        if not webbrowser.open(path.as_uri()):
            raise UserError(f"no web browser found to open {path.as_uri()}; open it by hand")


@app.command()
def compare(
    first: Annotated[str, typer.Argument(metavar="A", help="DVC experiment name or MLflow pipeline run id")],
    second: Annotated[str, typer.Argument(metavar="B", help="DVC experiment name or MLflow pipeline run id")],
    all_params: Annotated[bool, typer.Option("--all-params",
                                             help="list every param, not only those that differ")] = False,
    root: RootOption = None,
) -> None:
    """Compare two experiments: each model's test accuracy, and the params that differ."""
    from tlpipe.evaluation.compare import compare_table, load_experiment

    project = resolve_root(root)
    prepare_environment(project)
    typer.echo(compare_table(load_experiment(first, project), load_experiment(second, project), all_params))


@app.command()
def exps(root: RootOption = None) -> None:
    """List the DVC experiments: each model's test accuracy and the params that differ (what `make exps` shows)."""
    from tlpipe.core.names import REPORTED_MODELS
    from tlpipe.evaluation.compare import exps_command, format_exps

    project = resolve_root(root)
    prepare_environment(project)
    from tlpipe.ops.dvc import capture_dvc

    done = capture_dvc(project, exps_command(REPORTED_MODELS))
    if done.returncode != 0:
        lines = (done.stderr or done.stdout).strip().splitlines()
        raise UserError(f"dvc exp show failed (exit {done.returncode}): {lines[-1] if lines else 'no output'}")
    typer.echo(format_exps(done.stdout))


@app.command("compare-backbones")
def compare_backbones(
    backbone: Annotated[list[str] | None, typer.Option(
        "--backbone", "-b", metavar="NAME",
        help="backbone to run (repeat; default efficientnet_lite0, _lite1, _lite2)")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", "-S", metavar="KEY=VALUE",
                                                      help="param override for every run")] = None,
    name: Annotated[str | None, typer.Option("--name", metavar="PREFIX",
                                                help="DVC experiment name prefix (default cmp-<UTC time>)")] = None,
    root: RootOption = None,
) -> None:
    """Run the pipeline once per backbone (DVC's experiment queue) and chart test accuracy against compute."""
    from flows.compare_backbones import compare_backbones as run_comparison
    from tlpipe.evaluation.compare_backbones import DEFAULT_BACKBONES

    project = prepare_prefect(root)
    table, csv_path, png_path = run_comparison(project, backbone or DEFAULT_BACKBONES, set_ or [], name)
    typer.echo(table.to_string(index=False))
    typer.echo(f"table: {csv_path}\nchart: {png_path}")


@app.command()
def ui(
    host: HostOption = "127.0.0.1",
    port: PortOption = 5000,
    root: RootOption = None,
) -> None:
    """Start the MLflow UI on the project's store."""
    root = resolve_root(root)
    prepare_environment(root)
    command = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", tracking_uri(root),
               "--host", host, "--port", str(port), "--workers", "1"]
    if not os.environ.get("MLFLOW_TRACKING_URI"):
        command += ["--default-artifact-root", (root / "mlartifacts").as_uri()]
    typer.echo(f"MLflow UI on http://{host}:{port} (store {tracking_uri(root)})")
    experiment = connect(root).get_experiment_by_name(experiment_name(root))
    if experiment is not None:  # MLflow 3.17 opens in its GenAI view unless the link asks for training
        typer.echo(f"open {ui_url(f'http://{host}:{port}', experiment.experiment_id)}")
    from tlpipe.ops.process_group import guarded_group, signals_raise

    # no GenAI job runner (7 more processes, ~1.7 GB) unless the user asks for it
    os.environ.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    # the server and its workers in a process group of their own, stopped on SIGTERM, SIGHUP, Ctrl-C or exit
    with signals_raise(), guarded_group(command, "the MLflow server") as server:
        code = server.wait()
    raise typer.Exit(code)


@app.command("serve-model")
def serve_model(
    model: Annotated[str | None, typer.Option(metavar="URI", help=(
        "model URI (default: the champion of the current task, models:/TASK@champion)"))] = None,
    host: HostOption = "127.0.0.1",
    port: PortOption = 5001,
    root: RootOption = None,
) -> None:
    """Serve a model over REST with `mlflow models serve` (POST images to /invocations)."""
    root = resolve_root(root)
    prepare_environment(root)
    identity = identify_requested_model(model, root)
    uri = identity.load_uri
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri(root), "TLPIPE_PYFUNC_ALLOW_PATHS": "0"}
    command = [sys.executable, "-m", "mlflow", "models", "serve", "-m", uri, "--env-manager", "local",
               "--host", host, "--port", str(port)]
    typer.echo(f"serving {identity.describe()} on http://{host}:{port}/invocations")
    raise typer.Exit(subprocess.call(command, env=env))


@app.command()
def deploy(
    cron: Annotated[str | None, typer.Option(metavar="CRON",
                                             help="cron schedule (default: schedule.cron in params.yaml)")] = None,
    work_pool: Annotated[str | None, typer.Option("--work-pool", metavar="NAME", help=(
        "register on this Prefect process work pool (created if missing); `tlpipe worker --pool NAME` "
        "executes its runs"))] = None,
    api_url: ApiUrlOption = None,
    root: RootOption = None,
) -> None:
    """Register the retrain flow as a scheduled Prefect deployment."""
    root = prepare_prefect(root, api_url)
    from flows.deploy import create_deployment, deploy_to_work_pool

    if work_pool:
        deployment_id, name, schedule = deploy_to_work_pool(root, work_pool, cron)
        typer.echo(f"deployment {name} ({deployment_id}) on work pool '{work_pool}' scheduled '{schedule}' on "
                   f"{os.environ.get('PREFECT_API_URL')}; start workers with `tlpipe worker --pool {work_pool}`")
        return
    deployment_id, name, schedule = create_deployment(root, cron)
    typer.echo(f"deployment {name} ({deployment_id}) scheduled '{schedule}' on {os.environ.get('PREFECT_API_URL')}; "
               "run `tlpipe serve` to execute runs")


@app.command()
def serve(
    cron: Annotated[str | None, typer.Option(metavar="CRON", help="cron schedule (default: params.yaml)")] = None,
    api_url: ApiUrlOption = None,
    root: RootOption = None,
) -> None:
    """Serve the scheduled retrain deployment: executes its runs until stopped."""
    root = prepare_prefect(root, api_url)
    from flows.deploy import serve_deployment

    serve_deployment(root, cron)


@app.command()
def worker(
    pool: Annotated[str, typer.Option("--pool", metavar="NAME", help="the process work pool to poll")] = "tlpipe",
    name: Annotated[str | None, typer.Option(metavar="NAME", help="worker name (default: Prefect's)")] = None,
    limit: Annotated[int | None, typer.Option(metavar="N", help="at most N flow runs at once")] = None,
    api_url: ApiUrlOption = None,
    root: RootOption = None,
) -> None:
    """Start a Prefect process worker: executes the deployment's runs from the work pool until stopped."""
    prepare_prefect(root, api_url)
    from flows.deploy import worker_command

    typer.echo(f"worker on pool '{pool}' of {os.environ.get('PREFECT_API_URL')}", err=True)
    raise typer.Exit(subprocess.call(worker_command(pool, name, limit)))


@prefect_app.command("start")
def prefect_start(
    port: Annotated[int | None, typer.Option(metavar="PORT", help="port (default: $TLPIPE_PREFECT_PORT or 4200; "
                                                                     "a free one when taken)")] = None,
    root: RootOption = None,
) -> None:
    """Start the project's Prefect server in the background, or find it running; print its URL."""
    from tlpipe.ops.prefect_server import ensure_server, home

    project = resolve_root(root)
    url = ensure_server(project, port)
    typer.echo(f"Prefect server for {project.name}: {url.removesuffix('/api')} (runs kept in {home(project)})")
    typer.echo(f"export PREFECT_API_URL={url}")


@prefect_app.command("stop")
def prefect_stop(root: RootOption = None) -> None:
    """Stop the project's Prefect server (its runs stay in .prefect/prefect.db)."""
    from tlpipe.ops.prefect_server import stop_server

    stopped = stop_server(resolve_root(root))
    typer.echo("Prefect server stopped" if stopped else "no Prefect server was running")


@prefect_app.command("status")
def prefect_status(root: RootOption = None) -> None:
    """Print the project's Prefect server URL; exit 1 when it is not running."""
    from tlpipe.ops.prefect_server import running_url

    url = running_url(resolve_root(root))
    if not url:
        typer.echo("not running (start it: make prefect-server)", err=True)
        raise typer.Exit(1)
    typer.echo(url)


skip_teardown = False
"""Set by a command whose process has nothing left to do once it has printed (``predict``): :func:`main` then
ends the process without the interpreter's teardown of TensorFlow and MLflow (about 2 s on 2 cores)."""


def end_process(code: int) -> NoReturn:
    """Exit with ``code`` at once: the exit handlers run (logging, finalizers) and output is flushed, but the
    interpreter's module teardown is skipped."""
    import atexit

    atexit._run_exitfuncs()  # what a normal exit runs first
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def exit_code(done: SystemExit) -> int:
    """The process exit code a ``SystemExit`` stands for."""
    if done.code is None or isinstance(done.code, int):
        return int(done.code or 0)
    print(done.code, file=sys.stderr)
    return 1


def main() -> None:
    """Console-script entry point (``tlpipe``): ``--debug`` is accepted anywhere on the line."""
    if "--debug" in sys.argv[2:]:
        sys.argv = [sys.argv[0], "--debug", *[arg for arg in sys.argv[1:] if arg != "--debug"]]
    try:
        app()
    except SystemExit as done:
        if skip_teardown:
            end_process(exit_code(done))
        raise


if __name__ == "__main__":
    main()
