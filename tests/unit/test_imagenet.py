"""Tests for offline ImageNet class names, image loading and top-k prediction."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import skimage.data
from PIL import Image

from tlpipe.features.backbones import build_backbone
from tlpipe.features.imagenet import load_class_names, load_image_for_imagenet, predict_imagenet, top1_table

CAT_CLASSES = {"tiger cat", "tabby", "Egyptian cat"}
EXIF_ORIENTATION = 0x0112


@pytest.fixture(scope="module", autouse=True)
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Point TLPIPE_CACHE_DIR at a fresh directory for this module."""
    path = tmp_path_factory.mktemp("tlpipe_cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TLPIPE_CACHE_DIR", str(path))
        yield path


@pytest.fixture(scope="module")
def photo_paths(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """skimage's coffee and chelsea photos saved as JPEG files."""
    folder = tmp_path_factory.mktemp("photos")
    paths = [folder / "coffee.jpg", folder / "chelsea.jpg"]
    Image.fromarray(skimage.data.coffee()).save(paths[0], quality=95)
    Image.fromarray(skimage.data.chelsea()).save(paths[1], quality=95)
    return paths


def test_class_names() -> None:
    names = load_class_names()
    assert len(names) == 1000
    assert (names[0], names[281], names[282], names[285], names[967]) == (
        "tench", "tabby", "tiger cat", "Egyptian cat", "espresso"
    )
    clean = load_class_names("clean")
    assert len(clean) == 1000 and clean[967] == "espresso"
    with pytest.raises(ValueError, match="style"):
        load_class_names("fancy")  # type: ignore[arg-type]


def test_load_image_applies_exif_and_centre_crop(tmp_path: Path) -> None:
    stored = np.zeros((100, 200, 3), dtype=np.uint8)
    stored[:, :100] = (255, 0, 0)
    stored[:, 100:] = (0, 0, 255)
    image = Image.fromarray(stored)
    exif = image.getexif()
    exif[EXIF_ORIENTATION] = 6  # display rotated 90 degrees clockwise: red on top
    path = tmp_path / "rotated.jpg"
    image.save(path, exif=exif, quality=95)
    crop = load_image_for_imagenet(path, 32)
    assert crop.shape == (32, 32, 3) and crop.dtype == np.uint8
    assert crop[2, 16, 0] > 200 and crop[2, 16, 2] < 60
    assert crop[29, 16, 2] > 200 and crop[29, 16, 0] < 60


def test_load_image_palette_and_grey(tmp_path: Path) -> None:
    grey = tmp_path / "grey.png"
    Image.fromarray(np.full((50, 80), 128, dtype=np.uint8)).save(grey)
    palette = tmp_path / "palette.gif"
    Image.fromarray(skimage.data.chelsea()).convert("P").save(palette)
    assert load_image_for_imagenet(grey, 40).shape == (40, 40, 3)
    assert load_image_for_imagenet(palette, 40).shape == (40, 40, 3)


def test_predict_imagenet_coffee_and_chelsea(photo_paths: list[Path]) -> None:
    coffee, chelsea = predict_imagenet(photo_paths, top=3)
    print("coffee:", coffee)
    print("chelsea:", chelsea)
    assert len(coffee) == len(chelsea) == 3
    assert coffee[0][0] == "espresso" and coffee[0][1] > 0.8
    assert chelsea[0][0] in CAT_CLASSES
    assert coffee[0][1] >= coffee[1][1] >= coffee[2][1]


def test_top1_table(photo_paths: list[Path]) -> None:
    model = build_backbone("efficientnet_lite0", weights="imagenet", include_top=True)
    images = np.stack([load_image_for_imagenet(p, 224) for p in photo_paths])
    table = top1_table(images, model)
    assert table[0][:2] == (967, "espresso")
    assert table[1][1] in CAT_CLASSES
    assert all(0.0 < prob <= 1.0 for _, _, prob in table)
    with pytest.raises(ValueError, match="include_top"):
        top1_table(images, build_backbone("efficientnet_lite0", weights=None, image_size=64))
