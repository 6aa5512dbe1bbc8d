"""DVC as a child process: the one way the project runs ``dvc`` (this interpreter's DVC, venv activated or not)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def dvc_command(*args: str) -> list[str]:
    """``python -m dvc <args>`` with this interpreter, so the project's environment's DVC runs."""
    return [sys.executable, "-m", "dvc", *args]


def dvc_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """This process's environment plus ``env``, with this interpreter's folder first on PATH
    (``dvc.yaml`` runs ``bin/python``, which prefers the interpreter that started DVC)."""
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    return {**os.environ, **(env or {}), "PATH": path}


def run_dvc(root: Path, args: list[str], env: dict[str, str] | None = None) -> int:
    """Run ``dvc <args>`` in ``root`` with its output on this process's console; return its exit code."""
    print("$", " ".join(args), flush=True)
    return subprocess.call(dvc_command(*args), cwd=root, env=dvc_env(env))


def capture_dvc(root: Path, args: list[str], timeout_s: float | None = None) -> subprocess.CompletedProcess:
    """Run ``dvc <args>`` in ``root`` and capture its output (text)."""
    return subprocess.run(dvc_command(*args), cwd=root, capture_output=True, text=True, timeout=timeout_s)
