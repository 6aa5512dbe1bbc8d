"""Tests for ``tlpipe predict``'s core: collect files, classify them with a saved pyfunc model."""

from __future__ import annotations

import json
from pathlib import Path

import keras
import numpy as np
import pytest
from PIL import Image

from tlpipe.data.images import decode_file
from tlpipe.serving.packaging import save_keras_classifier
from tlpipe.serving.predict import (
    ModelNotFoundError,
    collect_images,
    format_predictions,
    predict_images,
    resolve_model_uri,
)

SIZE = 32
CLASSES = ["crack", "clean", "dust"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, keras.Model]:
    """A tiny Keras classifier saved as a local MLflow pyfunc folder, and the network itself."""
    keras.utils.set_random_seed(1)
    inputs = keras.Input((SIZE, SIZE, 3), dtype="uint8")
    x = keras.layers.Rescaling(1 / 255)(keras.ops.cast(inputs, "float32"))
    x = keras.layers.GlobalAveragePooling2D()(keras.layers.Conv2D(4, 3, activation="relu")(x))
    network = keras.Model(inputs, keras.layers.Dense(len(CLASSES), activation="softmax")(x))
    root = tmp_path_factory.mktemp("model")
    network.save(root / "concat.keras")
    save_keras_classifier(root / "pyfunc", root / "concat.keras", CLASSES, SIZE, "stretch")
    return root / "pyfunc", network


@pytest.fixture()
def folder(tmp_path: Path) -> Path:
    """3 good images (one in a subfolder), a truncated JPEG, a text file and a hidden file."""
    rng = np.random.default_rng(5)
    (tmp_path / "sub").mkdir()
    for relpath in ("b.png", "a.jpg", "sub/c.JPEG"):
        Image.fromarray(rng.integers(0, 256, (40, 36, 3), dtype=np.uint8)).save(tmp_path / relpath)
    (tmp_path / "corrupt.jpg").write_bytes((tmp_path / "a.jpg").read_bytes()[:300])
    (tmp_path / "notes.txt").write_text("not an image\n")
    (tmp_path / ".hidden.jpg").write_bytes(b"junk")
    return tmp_path


def test_collect_images_expands_folders_and_reports_missing(folder: Path) -> None:
    files, errors = collect_images([str(folder), str(folder / "notes.txt"), str(folder / "a.jpg"), "/no/such"])
    names = [path.relative_to(folder).as_posix() for path in files]
    assert names == ["a.jpg", "b.png", "corrupt.jpg", "sub/c.JPEG", "notes.txt"]
    assert errors == [("/no/such", "no such file or directory")]


def test_predict_images_reports_bad_files_and_classifies_the_rest(model_dir, folder: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TLPIPE_PYFUNC_ALLOW_PATHS", raising=False)  # the model refuses paths: predict sends bytes
    path, network = model_dir
    rows = predict_images(str(path), [str(folder), str(folder / "notes.txt"), str(folder / "missing.png")], top=2)
    by_name = {Path(row["path"]).name: row for row in rows}
    assert list(by_name) == ["a.jpg", "b.png", "corrupt.jpg", "c.JPEG", "notes.txt", "missing.png"]
    good = [folder / "a.jpg", folder / "b.png", folder / "sub" / "c.JPEG"]
    probs = network.predict_on_batch(np.stack([decode_file(p, SIZE, "stretch").pixels for p in good]))
    for image, expected in zip(good, probs):
        row = by_name[image.name]
        assert row["error"] is None
        assert row["class"] == CLASSES[int(expected.argmax())]
        assert row["probability"] == pytest.approx(float(expected.max()), abs=1e-5)
        assert [name for name, _ in row["top"]] == [CLASSES[i] for i in np.argsort(-expected)[:2]]
    for name in ("corrupt.jpg", "notes.txt", "missing.png"):
        assert by_name[name]["class"] is None and by_name[name]["error"]
    assert "not an image" in by_name["notes.txt"]["error"]
    assert by_name["missing.png"]["error"] == "no such file or directory"


def test_format_predictions_as_json_and_text(model_dir, folder: Path) -> None:
    rows = predict_images(str(model_dir[0]), [str(folder)], top=3)
    parsed = json.loads(format_predictions(rows, as_json=True))
    assert [row["path"] for row in parsed] == [row["path"] for row in rows]
    assert all(len(row["top"]) == 3 and isinstance(row["top"][0][1], float) for row in parsed if not row["error"])
    text = format_predictions(rows, as_json=False).splitlines()
    assert len(text) == 4 and sum("ERROR" in line for line in text) == 1
    assert format_predictions([], as_json=True) == "[]"


def test_resolve_model_uri(model_dir, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = model_dir[0]
    assert resolve_model_uri(None, tmp_path, "tlpipe") == "models:/tlpipe@champion"
    for uri in ("models:/tlpipe/3", "runs:/abc/svm_pixels", "file:///tmp/x"):
        assert resolve_model_uri(uri, tmp_path, "tlpipe") == uri
    assert resolve_model_uri(str(path), tmp_path, "tlpipe") == str(path.resolve())
    monkeypatch.chdir(tmp_path)
    assert resolve_model_uri(path.name, path.parent, "tlpipe") == str(path.resolve())
    with pytest.raises(ModelNotFoundError, match="MLmodel"):
        resolve_model_uri(str(tmp_path), tmp_path, "tlpipe")


def test_a_few_files_run_eagerly_and_answer_as_the_traced_model(model_dir, folder: Path) -> None:
    """`tlpipe predict` of a few images skips tracing the network's graph (seconds); the answers stay the same."""
    from tlpipe.serving.predict import classify_files, classify_images, load_image_model, run_eagerly

    path, _ = model_dir
    rows, classes = classify_images(str(path), [str(folder / "a.jpg")])
    assert classes == CLASSES and rows[0]["class"] in CLASSES  # the classes printed beside the model's name
    files = [folder / "a.jpg", folder / "b.png", folder / "sub" / "c.JPEG"]
    model = load_image_model(str(path))
    inner = model.unwrap_python_model()
    traced = classify_files(model, files, 3)
    assert inner.eager is False
    run_eagerly(model)
    assert inner.eager is True
    for before, after in zip(traced, classify_files(model, files, 3)):
        assert after["class"] == before["class"] and after["probability"] == pytest.approx(before["probability"],
                                                                                            abs=1e-5)
