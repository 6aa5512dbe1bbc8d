"""Helpers of the scale-out tests: run a command and fail with its output tail."""

from __future__ import annotations

import subprocess
from pathlib import Path


def run(command: list[str], cwd: Path, env: dict, timeout: int = 900) -> str:
    """Run ``command``; fail the test with the tail of its output when it exits non-zero."""
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"{' '.join(map(str, command))} exited {result.returncode}:\n{output[-6000:]}"
    return output
