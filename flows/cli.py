"""The ``tlpipe`` command line (Typer). Heavy imports happen inside each command.

It lives in ``flows`` (the entry-point layer), so the core package ``tlpipe`` never imports flows.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from tlpipe import tracking
from tlpipe.paths import find_root

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="tlpipe: transfer-learning pipeline (DVC stages as Prefect flows, tracked in MLflow).")

RootOption = Annotated[Optional[Path], typer.Option("--root", help="project root (default: found from cwd)")]


def resolve_root(root: Path | None) -> Path:
    """The project root from the option or the working directory."""
    return Path(root).resolve() if root else find_root()


def prepare_environment(root: Path) -> None:
    """Telemetry off and the root pinned for every child process."""
    tracking.quiet_telemetry()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ["TLPIPE_ROOT"] = str(root)


@app.command()
def repro(
    set_: Annotated[Optional[list[str]], typer.Option("--set", "-S", help="param override key=value (runs dvc exp run)")] = None,
    exp: Annotated[bool, typer.Option("--exp", help="run as a DVC experiment")] = False,
    root: RootOption = None,
) -> None:
    """Run the pipeline through DVC under one MLflow pipeline run (what `make run` does)."""
    root = resolve_root(root)
    prepare_environment(root)
    from flows.pipeline import pipeline_flow

    result = pipeline_flow(root=str(root), overrides=list(set_ or []), experiment=exp)
    typer.echo(json.dumps({"stages_ran": result["stages_ran"], "promotion": result["promotion"].get("reason")},
                          indent=2))
    for model, values in result["metrics"].items():
        typer.echo(f"{model:14s} test accuracy {values.get('accuracy', float('nan')):.4f}")


@app.command()
def retrain(
    force: Annotated[bool, typer.Option(help="rerun even if the source is unchanged")] = False,
    root: RootOption = None,
) -> None:
    """Rerun the pipeline if the source data changed; the quality gate picks the champion."""
    root = resolve_root(root)
    prepare_environment(root)
    from flows.retrain import retrain_flow

    result = retrain_flow(root=str(root), force=force)
    typer.echo(json.dumps({k: v for k, v in result.items() if k in ("retrained", "reason", "stages_ran", "promotion")},
                          indent=2, default=str))


@app.command()
def predict(
    images: Annotated[list[str], typer.Argument(help="image files or directories")],
    model: Annotated[Optional[str], typer.Option(help="models:/<name>@champion (default), a run URI or a local model dir")] = None,
    top: Annotated[int, typer.Option(min=1, help="classes to show per image")] = 1,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
    imagenet: Annotated[bool, typer.Option("--imagenet", help="top-k ImageNet classes of the pretrained backbone")] = False,
    backbone: Annotated[str, typer.Option(help="backbone for --imagenet")] = "efficientnet_lite0",
    weights: Annotated[str, typer.Option(help="weights for --imagenet: imagenet or a file")] = "imagenet",
    root: RootOption = None,
) -> None:
    """Classify images with the champion model (or ImageNet classes with --imagenet)."""
    tracking.quiet_telemetry()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if imagenet:
        from tlpipe.imagenet import predict_imagenet

        results = predict_imagenet([Path(p) for p in images], backbone=backbone, weights=weights, top=top)
        rows = [{"path": p, "top": [(c, round(float(s), 4)) for c, s in r]} for p, r in zip(images, results)]
        if as_json:
            typer.echo(json.dumps(rows, indent=2))
        else:
            for row in rows:
                typer.echo(f"{row['path']}: " + ", ".join(f"{c} ({s:.3f})" for c, s in row["top"]))
        return
    from tlpipe.config import load_params
    from tlpipe.predict import format_predictions, predict_images, resolve_model_uri

    project = resolve_root(root)
    prepare_environment(project)
    import mlflow

    mlflow.set_tracking_uri(tracking.tracking_uri(project))
    uri = resolve_model_uri(model, project, load_params(project / "params.yaml").registry.model_name)
    rows = predict_images(uri, images, top=top)
    typer.echo(format_predictions(rows, as_json))
    if any(row.get("error") for row in rows):
        raise typer.Exit(code=1 if all(row.get("error") for row in rows) else 0)


@app.command()
def ui(
    host: Annotated[str, typer.Option(help="bind address")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="port")] = 5000,
    root: RootOption = None,
) -> None:
    """Start the MLflow UI on the project's store."""
    root = resolve_root(root)
    prepare_environment(root)
    command = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", tracking.tracking_uri(root),
               "--host", host, "--port", str(port), "--workers", "1"]
    if not os.environ.get("MLFLOW_TRACKING_URI"):
        command += ["--default-artifact-root", (root / "mlartifacts").as_uri()]
    typer.echo(f"MLflow UI on http://{host}:{port} (store {tracking.tracking_uri(root)})")
    raise typer.Exit(subprocess.call(command))


@app.command("serve-model")
def serve_model(
    model: Annotated[Optional[str], typer.Option(help="model URI (default: models:/<name>@champion)")] = None,
    host: Annotated[str, typer.Option()] = "127.0.0.1",
    port: Annotated[int, typer.Option()] = 5001,
    root: RootOption = None,
) -> None:
    """Serve a model over REST with `mlflow models serve` (POST images to /invocations)."""
    from tlpipe.config import load_params

    root = resolve_root(root)
    prepare_environment(root)
    name = load_params(root / "params.yaml").registry.model_name
    uri = model or f"models:/{name}@champion"
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking.tracking_uri(root), "TLPIPE_PYFUNC_ALLOW_PATHS": "0"}
    command = [sys.executable, "-m", "mlflow", "models", "serve", "-m", uri, "--env-manager", "local",
               "--host", host, "--port", str(port)]
    typer.echo(f"serving {uri} on http://{host}:{port}/invocations")
    raise typer.Exit(subprocess.call(command, env=env))


def prepare_prefect(root: Path | None, api_url: str | None) -> Path:
    """Resolve the root, prepare the environment and point Prefect at ``api_url`` when given."""
    root = resolve_root(root)
    prepare_environment(root)
    if api_url:
        os.environ["PREFECT_API_URL"] = api_url
    return root


@app.command()
def deploy(
    cron: Annotated[Optional[str], typer.Option(help="cron schedule (default: schedule.cron in params.yaml)")] = None,
    api_url: Annotated[Optional[str], typer.Option(help="Prefect API URL, e.g. http://127.0.0.1:4200/api")] = None,
    root: RootOption = None,
) -> None:
    """Register the retrain flow as a scheduled Prefect deployment."""
    root = prepare_prefect(root, api_url)
    from flows.deploy import create_deployment

    deployment_id, name, schedule = create_deployment(root, cron)
    typer.echo(f"deployment {name} ({deployment_id}) scheduled '{schedule}'; run `tlpipe serve` to execute runs")


@app.command()
def serve(
    cron: Annotated[Optional[str], typer.Option(help="cron schedule (default: params.yaml)")] = None,
    api_url: Annotated[Optional[str], typer.Option(help="Prefect API URL")] = None,
    root: RootOption = None,
) -> None:
    """Serve the scheduled retrain deployment: executes its runs until stopped."""
    root = prepare_prefect(root, api_url)
    from flows.deploy import serve_deployment

    serve_deployment(root, cron)


def main() -> None:
    """Console-script entry point (``tlpipe``)."""
    app()


if __name__ == "__main__":
    main()
