"""User errors: problems a user can fix (bad params, missing files, unreachable services).

Entry points (the ``tlpipe`` CLI and every ``python -m flows.<stage>``) print a
:class:`UserError` as one line on stderr and exit non-zero; a traceback appears
only with ``--debug`` (or ``TLPIPE_DEBUG=1``) and in the log. Every other
exception is a bug and keeps its traceback.

Existing specific errors subclass :class:`UserError` (mixing in their old base
class, so ``except ValueError`` callers keep working).
"""

from __future__ import annotations


class UserError(Exception):
    """An error the user can fix; its message says what and how."""

    exit_code: int = 1


class UsageError(UserError):
    """Bad command-line usage (exit code 2)."""

    exit_code = 2
