"""The features stage's core: streamed, ordered, aligned outputs; TF and JAX backends; ImageNet CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tlpipe.core.params import FeaturesParams
from tlpipe.data import store

SIZE = 32


@pytest.fixture(scope="module")
def tiny_store(tmp_path_factory) -> Path:
    """A store of 3 splits with distinct random images (sizes 7/3/5, not batch multiples)."""
    root = tmp_path_factory.mktemp("store")
    rng = np.random.default_rng(0)
    rows = []
    for split, count in (("train", 7), ("val", 3), ("test", 5)):
        images = rng.integers(0, 256, (count, SIZE, SIZE, 3), dtype=np.uint8)
        with store.NpyWriter(store.split_path(root, split), count, (SIZE, SIZE, 3)) as writer:
            writer.write(images)
        for i in range(count):
            rows.append({"split": split, "index": i, "relpath": f"{split}/{i}.png", "class_name": "ab"[i % 2],
                         "label": i % 2, "sha256": f"{split}{i}", "width": SIZE, "height": SIZE, "mode": "RGB"})
    store.write_csv(root / store.MANIFEST, pd.DataFrame(rows))
    store.write_json(root / store.CLASSES, ["a", "b"])
    return root


def test_features_are_ordered_aligned_and_published(tiny_store, tmp_path):
    from tlpipe.features.extraction import build_extractor, extract_features

    out = tmp_path / "features"
    meta = extract_features(tiny_store, out, FeaturesParams(backbone="efficientnet_lite0", batch_size=2))
    assert meta["counts"] == {"train": 7, "val": 3, "test": 5}
    assert (meta["final_dim"], meta["mid_dim"], meta["device"], meta["precision"]) == (1280, 240, "cpu", "float32")
    assert not meta["imagenet_top1"]  # no ImageNet head at 32 px
    model = build_extractor("efficientnet_lite0", "imagenet", SIZE, include_top=False)
    for split in store.SPLITS:
        images = np.load(store.split_path(tiny_store, split))
        want = model.predict(images, batch_size=len(images), verbose=0)
        for kind in ("final", "mid"):
            got = np.load(out / f"{split}_{kind}.npy")
            np.testing.assert_allclose(got, want[kind], rtol=1e-4, atol=1e-5)  # row i is image i
    assert json.loads((out / "meta.json").read_text())["backbone"] == "efficientnet_lite0"
    assert (out / "extractor.keras").exists()
    assert not list(tmp_path.glob(".features.tmp-*"))


def test_missing_resnet_weights_fail_before_any_work(tiny_store, tmp_path, monkeypatch):
    from tlpipe.features.backbones import WeightsUnavailableError
    from tlpipe.features.extraction import extract_features

    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    from tlpipe.features.backbones import resnet50 as resnet50_module

    monkeypatch.setattr(resnet50_module, "WEIGHTS_HOST", "keras-weights.invalid")  # offline everywhere
    with pytest.raises(WeightsUnavailableError, match="resnet50_weights_tf_dim_ordering_tf_kernels"):
        extract_features(tiny_store, tmp_path / "features", FeaturesParams(backbone="resnet50"))
    assert not (tmp_path / "features").exists()


def test_features_stage_runs_under_jax(tiny_store, tmp_path):
    """Same stage code on KERAS_BACKEND=jax (the GPU path) gives the TensorFlow features."""
    from tlpipe.features.extraction import extract_features

    extract_features(tiny_store, tmp_path / "tf", FeaturesParams(backbone="efficientnet_lite0", batch_size=4))
    code = ("import sys; from pathlib import Path; from tlpipe.core.params import FeaturesParams; "
            "from tlpipe.features.extraction import extract_features; "
            "m = extract_features(Path(sys.argv[1]), Path(sys.argv[2]), FeaturesParams(backbone='efficientnet_lite0', batch_size=4)); "
            "assert m['keras_backend'] == 'jax', m")
    env = {**os.environ, "KERAS_BACKEND": "jax", "JAX_PLATFORMS": "cpu"}
    result = subprocess.run([sys.executable, "-c", code, str(tiny_store), str(tmp_path / "jax")], env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    for split in store.SPLITS:
        for kind in ("final", "mid"):
            np.testing.assert_allclose(np.load(tmp_path / "jax" / f"{split}_{kind}.npy"),
                                       np.load(tmp_path / "tf" / f"{split}_{kind}.npy"), rtol=1e-3, atol=1e-3)


def test_cli_predict_imagenet_on_real_photos(tmp_path):
    """`tlpipe predict --imagenet` as the course does: coffee -> espresso, chelsea -> a cat."""
    from PIL import Image
    from skimage import data
    from typer.testing import CliRunner

    from flows.cli import app

    coffee, chelsea = tmp_path / "coffee.jpg", tmp_path / "chelsea.jpg"
    Image.fromarray(data.coffee()).save(coffee)
    Image.fromarray(data.chelsea()).save(chelsea)
    result = CliRunner().invoke(app, ["predict", "--imagenet", str(coffee), str(chelsea), "--top", "3", "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.output[result.output.index("["):])
    assert rows[0]["top"][0][0] == "espresso"
    assert rows[1]["top"][0][0] in {"tiger cat", "tabby", "Egyptian cat"}
    assert len(rows[0]["top"]) == 3
