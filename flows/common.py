"""The one shared opening of every entry point: user errors as one line, Prefect server and tags.

Each stage module ends with ``run_stage(<flow>)`` under ``if __name__ == "__main__"``
(what ``dvc repro`` runs as ``python -m flows.<stage>``); the ``tlpipe`` CLI uses
:func:`report_user_error`, :func:`quiet_prefect_console` and :func:`use_project_prefect`.

* Errors: a :class:`~tlpipe.core.errors.UserError` prints ``tlpipe <stage>: error: <message>``
  on stderr, one line, and exits with its code (1, or 2 for usage). Its traceback
  stays in the Prefect run log (the UI) and reaches the console only with
  ``--debug`` or ``TLPIPE_DEBUG=1``. Any other exception is a bug: full traceback.
* Prefect server: the project's own server (:mod:`tlpipe.ops.prefect_server`), unless
  ``$PREFECT_API_URL`` is set or ``TLPIPE_PREFECT_SERVER=ephemeral``.
* Tags: every stage flow run is tagged ``tlpipe`` and ``project:<name>``, plus what
  ``$TLPIPE_PREFECT_TAGS`` carries (the pipeline flow passes ``pipeline:<flow run id>``).
"""

from __future__ import annotations

import logging
import os
import sys
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

from tlpipe.core.errors import UserError

DEBUG_ENV = "TLPIPE_DEBUG"
TAGS_ENV = "TLPIPE_PREFECT_TAGS"
TRUE_WORDS = frozenset({"1", "true", "yes", "on"})


def debug_enabled(argv: list[str] | None = None) -> bool:
    """Whether tracebacks of user errors should be shown (``--debug`` or ``TLPIPE_DEBUG=1``)."""
    return os.environ.get(DEBUG_ENV, "").strip().lower() in TRUE_WORDS or "--debug" in (argv or [])


def error_line(error: BaseException) -> str:
    """An error message folded into one line (a multi-line message joins its lines with '; ')."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()] or [type(error).__name__]
    head, rest = lines[0], lines[1:]
    if not rest:
        return head
    return f"{head} {'; '.join(rest)}" if head.endswith(":") else "; ".join(lines)


def report_user_error(prog: str, error: UserError, debug: bool) -> int:
    """Print a user error as one line on stderr (its traceback first, with ``debug``); return its exit code."""
    if debug:
        traceback.print_exception(error, file=sys.stderr)
    print(f"{prog}: error: {error_line(error)}", file=sys.stderr, flush=True)
    return int(getattr(error, "exit_code", 1))


def is_user_error(record: logging.LogRecord) -> bool:
    """Whether a log record carries a :class:`UserError` traceback."""
    return bool(record.exc_info) and isinstance(record.exc_info[1], UserError)


class QuietUserErrors(logging.Filter):
    """Console filter: a user error's traceback and Prefect's failure lines stay out of the console.

    Records carrying a :class:`UserError` are dropped, and so are the
    "Finished in state Failed" lines that follow one and the events worker's
    shutdown notice (the entry point prints the error itself, once). The Prefect
    API handler is not filtered: the run log in the UI keeps everything.
    """

    AFTER_ERROR = ("Finished in state Failed", "Still processing items")

    def __init__(self) -> None:
        super().__init__("tlpipe-quiet-user-errors")
        self.seen_user_error = False

    def filter(self, record: logging.LogRecord) -> bool:
        if is_user_error(record):
            self.seen_user_error = True
            return False
        message = record.getMessage()
        if message.startswith("Finished in state Failed") and any(
                f"{name}: " in message for name in user_error_names()):
            self.seen_user_error = True
            return False
        return not (self.seen_user_error and message.startswith(self.AFTER_ERROR))


def user_error_names() -> set[str]:
    """Class names of :class:`UserError` and every subclass imported so far."""
    names, pending = set(), [UserError]
    while pending:
        cls = pending.pop()
        names.add(cls.__name__)
        pending.extend(cls.__subclasses__())
    return names


def quiet_prefect_console() -> None:
    """Attach :class:`QuietUserErrors` to Prefect's console handlers (after configuring Prefect's logging)."""
    from prefect.logging.configuration import setup_logging
    from prefect.logging.handlers import PrefectConsoleHandler

    root = logging.getLogger()
    if not any(isinstance(h, PrefectConsoleHandler) for h in root.handlers):
        setup_logging()
    for logger in (root, *[logging.getLogger(name) for name in ("prefect", "uvicorn", "fastapi")]):
        for handler in logger.handlers:
            if isinstance(handler, PrefectConsoleHandler) and not any(
                    isinstance(f, QuietUserErrors) for f in handler.filters):
                handler.addFilter(QuietUserErrors())


def stage_tags(root: Path) -> list[str]:
    """Prefect tags of a run in project ``root``: ``tlpipe``, ``project:<name>``, plus ``$TLPIPE_PREFECT_TAGS``."""
    from tlpipe.ops.prefect_server import main_project_root

    extra = [tag.strip() for tag in os.environ.get(TAGS_ENV, "").split(",") if tag.strip()]
    return list(dict.fromkeys(["tlpipe", f"project:{main_project_root(root).name}", *extra]))


def use_project_prefect(root: Path) -> str | None:
    """Point this process (and its children) at the project's Prefect server; return its URL.

    Call before Prefect is imported (the CLI does): it sets ``$PREFECT_API_URL``.
    Returns None when ``$PREFECT_API_URL`` was already set or ephemeral mode is asked for.
    """
    from tlpipe.ops.prefect_server import api_url_for

    url = api_url_for(root)
    if url:
        os.environ["PREFECT_API_URL"] = url
    return url


@contextmanager
def prefect_context(root: Path) -> Iterator[None]:
    """Prefect settings and tags for one entry point, after Prefect was imported.

    Prefect reads ``$PREFECT_API_URL`` when it is imported, so the project's server
    is applied with ``temporary_settings``; the run tags with ``prefect.tags``.
    """
    import prefect
    from prefect.settings import PREFECT_API_URL, temporary_settings

    url = use_project_prefect(root)
    with temporary_settings(updates={PREFECT_API_URL: url}) if url else nullcontext(), \
            prefect.tags(*stage_tags(root)):
        yield


def run_stage(flow_fn: Callable[..., Any], **parameters: Any) -> None:
    """Run a stage flow as its process's entry point (``python -m flows.<stage>``), then exit.

    Exit code 0 on success; a user error's code (1, or 2) with one line on stderr;
    any other exception propagates (a bug: full traceback).
    """
    from tlpipe.core.paths import find_root

    name = getattr(flow_fn, "name", getattr(flow_fn, "__name__", "stage"))
    debug = debug_enabled(sys.argv[1:])
    if not debug:
        quiet_prefect_console()
    try:
        root = find_root()
        with prefect_context(root):
            flow_fn(**parameters)
    except UserError as error:
        sys.exit(report_user_error(f"tlpipe {name}", error, debug))
