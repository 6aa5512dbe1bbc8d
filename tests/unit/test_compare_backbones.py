"""Tests for the backbone comparison: compute counted from Keras models, results read from DVC experiments, chart."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import keras
import pandas as pd
import pytest
import yaml

from flows import compare_backbones as flow_cb
from tlpipe.evaluation import compare_backbones as cb

GIT = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]


def test_count_macs_of_known_layers() -> None:
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(4, 3, strides=2, padding="same")(inputs)  # 4*4 outputs * 3*3*3 * 4
    x = keras.layers.DepthwiseConv2D(3, padding="same")(x)  # 4*4 * 3*3 * 4
    x = keras.layers.Conv2D(6, 1, groups=2)(x)  # 4*4 * 1*1*(4/2) * 6
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(5)(x)  # 6 * 5
    inner = keras.Model(inputs, outputs)
    outer_in = keras.Input((8, 8, 3))
    outer = keras.Model(outer_in, keras.layers.Dense(2)(inner(outer_in)))  # nested model + 5 * 2
    want = 16 * 27 * 4 + 16 * 9 * 4 + 16 * 2 * 6 + 30
    assert cb.count_macs(inner) == want
    assert cb.count_macs(outer) == want + 10


def test_backbone_gflops_grow_with_the_family() -> None:
    """Lite0 at 224 is ~0.38 GFLOPs (multiply-adds, as in the EfficientNet paper); Lite2 at 260 more."""
    lite0 = cb.backbone_gflops("efficientnet_lite0", 224)
    assert 0.35 < lite0 < 0.42
    assert cb.backbone_gflops("efficientnet_lite0", 448) == pytest.approx(4 * lite0, rel=0.01)  # per pixel
    assert cb.backbone_gflops("efficientnet_lite2", 260) > 2 * lite0


def runs() -> list[cb.BackboneRun]:
    return [cb.BackboneRun("efficientnet_lite0", "cmp-efficientnet-lite0", 224, 50.0,
                           {"svm_features": 0.9, "frozen": 0.88, "svm_pixels": 0.6}),
            cb.BackboneRun("efficientnet_lite2", "cmp-efficientnet-lite2", 260, 20.0,
                           {"svm_features": 0.95, "frozen": 0.9, "svm_pixels": 0.62})]


def test_build_table_one_row_per_backbone_and_model(tmp_path: Path) -> None:
    table = cb.build_table(runs(), {("efficientnet_lite0", 224): 0.38, ("efficientnet_lite2", 260): 0.86})
    assert list(table.columns) == cb.COLUMNS
    assert len(table) == 6
    row = table[(table["backbone"] == "efficientnet_lite2") & (table["model"] == "frozen")].iloc[0]
    assert (row["accuracy"], row["gflops"], row["images_per_second"], row["image_size"]) == (0.9, 0.86, 20.0, 260)
    csv_path, png_path = cb.write_report(table, tmp_path / "out", "test chart")
    assert pd.read_csv(csv_path).equals(table)
    assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list((tmp_path / "out").glob(".*"))  # written atomically, no temp files left


def commit_experiment(repo: Path, name: str, backbone: str, accuracy: float, speed: float = 12.5) -> None:
    """Commit an experiment's params and metrics and point ``refs/exps/.../<name>`` at it, as DVC does:
    ``metrics/evaluate.json`` in git, ``metrics/features.json`` in the DVC cache (a cached stage output)."""
    (repo / "params.yaml").write_text(yaml.safe_dump({"data": {"image_size": "native"},
                                                      "features": {"backbone": backbone}}))
    (repo / "metrics").mkdir(exist_ok=True)
    (repo / "metrics" / "evaluate.json").write_text(json.dumps({"svm_features": {"acc": accuracy}}))
    (repo / "metrics" / "features.json").write_text(json.dumps({"images_per_second": speed}))
    if not (repo / ".dvc").is_dir():
        subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=repo, check=True)
    subprocess.run([sys.executable, "-m", "dvc", "add", "-q", "metrics/features.json"], cwd=repo, check=True)
    subprocess.run([*GIT, "add", "-A"], cwd=repo, check=True)
    subprocess.run([*GIT, "commit", "-qm", name], cwd=repo, check=True)
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True).stdout.strip()
    subprocess.run(["git", "update-ref", f"refs/exps/ab/{'0' * 38}/{name}", head], cwd=repo, check=True)


def test_read_run_from_an_experiment_commit(tmp_path: Path) -> None:
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    commit_experiment(tmp_path, "cmp-efficientnet-lite1", "efficientnet_lite1", 0.93)
    commit_experiment(tmp_path, "cmp-efficientnet-lite0", "efficientnet_lite0", 0.91, speed=30.0)
    run = flow_cb.read_run(tmp_path, "efficientnet_lite1", "cmp-efficientnet-lite1")  # not the workspace's file
    assert run == cb.BackboneRun("efficientnet_lite1", "cmp-efficientnet-lite1", 240, 12.5, {"svm_features": 0.93})
    assert not subprocess.run(["git", "ls-files", "metrics/features.json"], cwd=tmp_path, capture_output=True,
                              text=True).stdout  # read from the DVC cache at the experiment's commit
    with pytest.raises(cb.ComparisonError, match="did not finish"):
        flow_cb.read_run(tmp_path, "efficientnet_lite2", "cmp-efficientnet-lite2")


def test_bad_requests_fail_before_any_run(tmp_path: Path) -> None:
    with pytest.raises(cb.ComparisonError, match="distinct names"):
        flow_cb.compare_backbones(tmp_path, ["efficientnet_lite0", "vgg16"])
    with pytest.raises(cb.ComparisonError, match="distinct names"):
        flow_cb.compare_backbones(tmp_path, ["efficientnet_lite0", "efficientnet_lite0"])
    with pytest.raises(cb.ComparisonError, match="not features.backbone"):
        flow_cb.compare_backbones(tmp_path, ["efficientnet_lite0"], ["features.backbone=resnet50"])
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    commit_experiment(tmp_path, "cmp-efficientnet-lite0", "efficientnet_lite0", 0.9)
    with pytest.raises(cb.ComparisonError, match="exist already"):
        flow_cb.compare_backbones(tmp_path, ["efficientnet_lite0"], prefix="cmp")
