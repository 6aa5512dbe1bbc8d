"""The ``tlpipe`` command group: one-line user and usage errors with their exit codes, the shared options, the
version, and the project root and environment every command starts from (the commands: :mod:`flows.cli`)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any

import typer
from typer.core import TyperGroup

try:  # Typer vendors its own click (typer._click); its UsageError is not click's
    from typer._click.exceptions import UsageError as ClickUsageError
except ImportError:  # pragma: no cover (older Typer on the real click)
    from click.exceptions import UsageError as ClickUsageError

from flows.common import DEBUG_ENV, debug_enabled, quiet_prefect_console, report_user_error
from tlpipe.core.errors import UsageError, UserError
from tlpipe.core.paths import ProjectNotFoundError, find_root
from tlpipe.tracking.connection import quiet_telemetry

DEBUG_KEY = "tlpipe.debug"


class CliGroup(TyperGroup):
    """The command group: user and usage errors become one line on stderr with their exit code.

    Help shows each argument's metavar (``IMAGE``), never a Python type name (``<list[str]>``).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        for command in (self.commands or {}).values():
            for param in command.params:
                if getattr(param, "param_type_name", "") == "argument" and param.metavar:
                    usage = param.metavar + ("..." if param.nargs != 1 else "")
                    param.display_type_rich = lambda ctx=None: None  # type: ignore[method-assign]
                    param._usage_display_name = lambda usage=usage: usage  # type: ignore[method-assign]

    def make_context(self, info_name, args, parent=None, **extra):  # noqa: D102 (click API)
        try:
            return super().make_context(info_name, args, parent=parent, **extra)
        except ClickUsageError as error:  # bad top-level options
            raise typer.Exit(report_usage_error(error)) from None

    def invoke(self, ctx: typer.Context) -> Any:  # noqa: D102 (click API)
        try:
            return super().invoke(ctx)
        except ClickUsageError as error:  # unknown command, bad options or arguments of a command
            raise typer.Exit(report_usage_error(error)) from None
        except UserError as error:
            debug = bool(ctx.meta.get(DEBUG_KEY)) or debug_enabled()
            raise typer.Exit(report_user_error(command_path(ctx), error, debug)) from None


def command_path(ctx: typer.Context) -> str:
    """``tlpipe <command>`` of the command that ran (for error lines)."""
    sub = ctx.invoked_subcommand
    return f"{ctx.command_path} {sub}" if sub else ctx.command_path


def report_usage_error(error: ClickUsageError) -> int:
    """One line for a usage error, pointing at the command's help; return 2."""
    path = error.ctx.command_path if error.ctx else "tlpipe"
    typer.echo(f"{path}: error: {error.format_message()} (see '{path} --help')", err=True)
    return UsageError.exit_code


app = typer.Typer(cls=CliGroup, add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  rich_markup_mode=None,
                  help="tlpipe: transfer-learning pipeline (DVC stages as Prefect flows, tracked in MLflow).")


prefect_app = typer.Typer(cls=CliGroup, no_args_is_help=True, rich_markup_mode=None,
                          help="The project's Prefect server (kept in .prefect/; every run reports to it).")
app.add_typer(prefect_app, name="prefect-server")


RootOption = Annotated[Path | None, typer.Option("--root", metavar="DIR",
                                                    help="project root (default: found from the working directory)")]


HostOption = Annotated[str, typer.Option(metavar="HOST", help="bind address")]


PortOption = Annotated[int, typer.Option(metavar="PORT", help="port")]


ApiUrlOption = Annotated[str | None, typer.Option(
    metavar="URL", help="Prefect API URL (default: $PREFECT_API_URL, else the project's server)")]


def package_version() -> str:
    """The installed tlpipe version."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("tlpipe")
    except PackageNotFoundError:
        return "unknown"


def show_version(value: bool) -> None:
    """``--version``: print ``tlpipe <version>`` and exit."""
    if value:
        typer.echo(f"tlpipe {package_version()}")
        raise typer.Exit()


@app.callback()
def main_options(
    ctx: typer.Context,
    version: Annotated[bool, typer.Option("--version", callback=show_version, is_eager=True,
                                          help="print the version and exit")] = False,
    debug: Annotated[bool, typer.Option("--debug", help="show tracebacks of user errors too")] = False,
) -> None:
    """tlpipe: transfer-learning pipeline (DVC stages as Prefect flows, tracked in MLflow)."""
    ctx.meta[DEBUG_KEY] = debug or debug_enabled()
    if ctx.meta[DEBUG_KEY]:
        os.environ[DEBUG_ENV] = "1"  # the stage processes too


def resolve_root(root: Path | None) -> Path:
    """The project root from ``--root`` (checked) or found from the working directory.

    Raises:
        ProjectNotFoundError: When ``--root`` is not a tlpipe project.
    """
    if not root:
        return find_root()
    folder = Path(root).resolve()
    if not ((folder / "params.yaml").is_file() and (folder / "dvc.yaml").is_file()):
        raise ProjectNotFoundError(f"--root {folder} is not a tlpipe project: expected params.yaml and dvc.yaml there")
    return folder


def prepare_environment(root: Path) -> None:
    """Telemetry off and the root pinned for every child process."""
    quiet_telemetry()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ["TLPIPE_ROOT"] = str(root)


def prepare_prefect(root: Path | None, api_url: str | None = None) -> Path:
    """Resolve the root and point Prefect at ``api_url``, ``$PREFECT_API_URL`` or the project's server.

    Runs before Prefect is imported, so the choice holds for this process and its children.
    """
    from flows.common import use_project_prefect

    root = resolve_root(root)
    prepare_environment(root)
    if api_url:
        os.environ["PREFECT_API_URL"] = api_url
    else:
        use_project_prefect(root)
    if not debug_enabled():
        quiet_prefect_console()
    return root
