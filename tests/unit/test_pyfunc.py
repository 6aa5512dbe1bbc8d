"""Tests for the pyfunc image models: log to a real SQLite MLflow store, load back, predict.

Tiny real models at image size 32: a Keras network with random weights, and
linear SVMs (random labels) on raw pixels and on efficientnet_lite0 ImageNet
features (final; final + mid).
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Iterator
from pathlib import Path

import joblib
import keras
import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow import MlflowClient
from PIL import Image
from sklearn.svm import SVC

from tlpipe.data.images import decode_file, resize_batch, resize_image
from tlpipe.features.extraction import build_extractor
from tlpipe.serving.classifier import decode_cell, to_image_frame
from tlpipe.serving.predict import resolve_model_uri
from tlpipe.tracking.logged_models import log_keras_classifier, log_svm_classifier

SIZE = 32
PIXEL_SIZE = 8
CLASSES = ["crack", "clean", "dust"]
REGISTERED = "tlpipe-test-classifier"
Reference = Callable[[np.ndarray], tuple[list[str], np.ndarray]]


@pytest.fixture(scope="module")
def tracking(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A fresh SQLite tracking store with one experiment, and a fresh weights cache; yields the store folder."""
    root = tmp_path_factory.mktemp("mlflow")
    previous = mlflow.get_tracking_uri()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TLPIPE_CACHE_DIR", str(tmp_path_factory.mktemp("tlpipe_cache")))
        patch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
        patch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        mlflow.set_tracking_uri(f"sqlite:///{root}/mlflow.db")
        experiment = MlflowClient().create_experiment("pyfunc", artifact_location=(root / "mlartifacts").as_uri())
        mlflow.set_experiment(experiment_id=experiment)
        yield root
        mlflow.set_tracking_uri(previous)


def write_images(folder: Path, count: int, seed: int) -> list[Path]:
    """Random-noise photos of various sizes and formats (all at least 32 px a side)."""
    rng = np.random.default_rng(seed)
    paths = []
    for index in range(count):
        height, width = int(rng.integers(32, 70)), int(rng.integers(32, 70))
        path = folder / f"image_{index}.{'png' if index % 2 else 'jpg'}"
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def encode(path: Path) -> str:
    """Base64 of a file's bytes."""
    return base64.b64encode(path.read_bytes()).decode("ascii")


def decoded(paths: list[Path], mode: str) -> np.ndarray:
    """The (N, SIZE, SIZE, 3) training pixels of some files."""
    return np.stack([decode_file(path, SIZE, mode).pixels for path in paths])


def flat_pixels(pixels: np.ndarray) -> np.ndarray:
    """The svm_pixels input, built as :func:`tlpipe.train.svm.load_pixels` does."""
    return resize_batch(pixels, PIXEL_SIZE).reshape(len(pixels), -1).astype(np.float32) * np.float32(1 / 255)


def random_svm(features: np.ndarray, seed: int = 0) -> SVC:
    """A linear SVC with Platt probabilities fitted on random labels (10 per class)."""
    labels = np.resize(np.arange(len(CLASSES)), len(features))
    return SVC(kernel="linear", probability=True, random_state=seed).fit(features, labels)


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Four test image files."""
    return write_images(tmp_path_factory.mktemp("images"), 4, seed=1)


@pytest.fixture(scope="module")
def network(tmp_path_factory: pytest.TempPathFactory) -> tuple[keras.Model, Path]:
    """A tiny Keras classifier uint8 (32, 32, 3) -> softmax(3), and its ``.keras`` file."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((SIZE, SIZE, 3), dtype="uint8")
    x = keras.layers.Rescaling(1 / 255)(keras.ops.cast(inputs, "float32"))
    x = keras.layers.Conv2D(4, 3, activation="relu")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    model = keras.Model(inputs, keras.layers.Dense(len(CLASSES), activation="softmax")(x))
    path = tmp_path_factory.mktemp("network") / "frozen.keras"
    model.save(path)
    return model, path


@pytest.fixture(scope="module")
def logged(tracking: Path, network, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Log the network, an SVM on pixels and two SVMs on efficientnet_lite0 features in one run.

    The features use ImageNet weights (converted offline from the pip package
    into the test's cache), so a rebuilt extractor has the training weights and
    the features are not the near-zero ones of a random init.

    Returns:
        ``{name: (model_info, resize_mode, reference)}`` where ``reference(pixels)``
        gives the underlying model's (class names, probabilities) on training pixels.
    """
    folder = tmp_path_factory.mktemp("svms")
    train = np.random.default_rng(2).integers(0, 256, (30, SIZE, SIZE, 3), dtype=np.uint8)
    extractor = build_extractor("efficientnet_lite0", "imagenet", SIZE, include_top=False)
    extractor.save(folder / "extractor.keras")

    def final(pixels: np.ndarray) -> np.ndarray:
        return np.asarray(extractor.predict_on_batch(pixels)["final"])

    def concat(pixels: np.ndarray) -> np.ndarray:
        out = extractor.predict_on_batch(pixels)
        return np.concatenate([np.asarray(out["final"]), np.asarray(out["mid"])], axis=1)

    svms = {"svm_pixels": random_svm(flat_pixels(train)), "svm_features": random_svm(final(train)),
            "svm_concat": random_svm(concat(train))}
    for name, svm in svms.items():
        joblib.dump(svm, folder / f"{name}.joblib")
    net, net_path = network
    common = {"classes": CLASSES, "image_size": SIZE, "backbone": "efficientnet_lite0", "weights": "imagenet",
              "pixel_size": PIXEL_SIZE}
    with mlflow.start_run() as run:
        client, run_id = mlflow.MlflowClient(), run.info.run_id
        infos = {
            "frozen": log_keras_classifier(client, run_id, "frozen", net_path, CLASSES, SIZE, "stretch",
                                           registered_model_name=REGISTERED),
            "svm_pixels": log_svm_classifier(client, run_id, "svm_pixels", folder / "svm_pixels.joblib", "pixels",
                                             resize_mode="center_crop", **common),
            "svm_features": log_svm_classifier(client, run_id, "svm_features", folder / "svm_features.joblib", "final",
                                               resize_mode="stretch", extractor_path=folder / "extractor.keras",
                                               **common),
            "svm_concat": log_svm_classifier(client, run_id, "svm_concat", folder / "svm_concat.joblib", "concat",
                                             resize_mode="stretch", **common),
        }
    return {
        "frozen": (infos["frozen"], "stretch", network_reference(net)),
        "svm_pixels": (infos["svm_pixels"], "center_crop", svm_reference(svms["svm_pixels"], flat_pixels)),
        "svm_features": (infos["svm_features"], "stretch", svm_reference(svms["svm_features"], final)),
        "svm_concat": (infos["svm_concat"], "stretch", svm_reference(svms["svm_concat"], concat)),
    }


def network_reference(network: keras.Model) -> Reference:
    """Class names and probabilities of a network on training pixels."""
    def reference(pixels: np.ndarray) -> tuple[list[str], np.ndarray]:
        probs = np.asarray(network.predict_on_batch(pixels))
        return [CLASSES[i] for i in probs.argmax(axis=1)], probs
    return reference


def svm_reference(svm: SVC, inputs: Callable[[np.ndarray], np.ndarray]) -> Reference:
    """Class names (``SVC.predict``) and Platt probabilities of an SVM on training pixels."""
    def reference(pixels: np.ndarray) -> tuple[list[str], np.ndarray]:
        features = inputs(pixels)
        return [CLASSES[i] for i in svm.predict(features)], svm.predict_proba(features)
    return reference


def assert_matches(frame: pd.DataFrame, reference, pixels: np.ndarray) -> None:
    """The output frame agrees with the underlying model on the same pixels."""
    names, probs = reference(pixels)
    assert frame["class"].tolist() == names
    assert frame["error"].isna().all()
    got = frame[[f"p_{name}" for name in CLASSES]].to_numpy(dtype=float)
    np.testing.assert_allclose(got, probs, atol=1e-5)
    chosen = probs[np.arange(len(names)), [CLASSES.index(name) for name in names]]
    np.testing.assert_allclose(frame["probability"].to_numpy(dtype=float), chosen, atol=1e-5)


@pytest.mark.parametrize("name", ["frozen", "svm_pixels", "svm_features", "svm_concat"])
def test_logged_model_predicts_like_the_underlying_model(logged: dict, images: list[Path], name: str,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TLPIPE_PYFUNC_ALLOW_PATHS", "1")  # paths too (refused unless allowed)
    info, mode, reference = logged[name]
    model = mlflow.pyfunc.load_model(info.model_uri)
    pixels = decoded(images, mode)
    frame = model.predict(pd.DataFrame({"image": [encode(p) for p in images]}))
    assert list(frame.columns) == ["class", "probability", "error", *[f"p_{c}" for c in CLASSES]]
    assert_matches(frame, reference, pixels)
    assert_matches(model.predict(pd.DataFrame({"image": [str(p) for p in images]})), reference, pixels)
    assert_matches(model.predict(pd.DataFrame({"image": [p.read_bytes() for p in images]})), reference, pixels)
    assert_matches(model.predict(to_image_frame(pixels)), reference, pixels)
    assert_matches(model.predict(to_image_frame(images)), reference, pixels)
    assert_matches(model.unwrap_python_model().predict(None, pixels), reference, pixels)
    assert_matches(model.unwrap_python_model().predict(None, [str(p) for p in images]), reference, pixels)


def test_arrays_at_another_size_are_resized_as_in_training(logged: dict) -> None:
    info, mode, reference = logged["frozen"]
    big = np.random.default_rng(3).integers(0, 256, (2, 48, 40, 3), dtype=np.uint8)
    expected = np.stack([np.asarray(resize_image(Image.fromarray(image), SIZE, mode)) for image in big])
    assert_matches(mlflow.pyfunc.load_model(info.model_uri).predict(to_image_frame(big)), reference, expected)


def test_bad_rows_get_an_error_and_the_rest_are_predicted(logged: dict, images: list[Path], tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TLPIPE_PYFUNC_ALLOW_PATHS", "1")  # paths too (refused unless allowed)
    info, mode, reference = logged["svm_pixels"]
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(images[0].read_bytes()[:200])
    frame = mlflow.pyfunc.load_model(info.model_uri).predict(pd.DataFrame({"image": [
        encode(images[0]), encode(corrupt), "/no/such/file.jpg", base64.b64encode(b"hello").decode(),
        str(images[1])]}))
    errors = frame["error"].tolist()
    assert [error is None for error in errors] == [True, False, False, False, True]
    assert "corrupt" in errors[1] or "truncated" in errors[1]
    assert "base64" in errors[2]
    assert "not an image" in errors[3]
    assert frame.loc[[1, 2, 3], "class"].isna().all() and frame.loc[[1, 2, 3], "probability"].isna().all()
    assert_matches(frame.loc[[0, 4]].reset_index(drop=True), reference, decoded(images[:2], mode))
    json.dumps(frame.to_dict(orient="records"), allow_nan=False)  # None, never NaN: strict JSON


def test_a_plainly_loaded_model_refuses_file_paths(logged: dict, images: list[Path],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Loaded as ``mlflow models serve`` loads it (no tlpipe setting), a model never reads the server's files."""
    monkeypatch.delenv("TLPIPE_PYFUNC_ALLOW_PATHS", raising=False)
    info, mode, reference = logged["svm_pixels"]
    model = mlflow.pyfunc.load_model(info.model_uri)
    frame = model.predict(pd.DataFrame({"image": [str(images[0]), encode(images[0])]}))
    assert frame["class"][0] is None and frame["error"][1] is None
    assert "file paths are refused" in frame["error"][0] and "TLPIPE_PYFUNC_ALLOW_PATHS=1" in frame["error"][0]
    monkeypatch.setenv("TLPIPE_PYFUNC_ALLOW_PATHS", "1")  # explicitly allowed: read
    assert_matches(model.predict(pd.DataFrame({"image": [str(images[0])]})), reference, decoded(images[:1], mode))


def test_registered_champion_loads_by_alias(logged: dict, images: list[Path], tracking: Path) -> None:
    info, mode, reference = logged["frozen"]
    MlflowClient().set_registered_model_alias(REGISTERED, "champion", info.registered_model_version)
    uri = resolve_model_uri(None, tracking, REGISTERED)
    assert uri == f"models:/{REGISTERED}@champion"
    frame = mlflow.pyfunc.load_model(uri).predict(pd.DataFrame({"image": [encode(images[2])]}))
    assert_matches(frame, reference, decoded(images[2:3], mode))


def test_logged_models_carry_signature_example_and_extractor(logged: dict) -> None:
    info, _, _ = logged["frozen"]
    assert info.signature.inputs.input_names() == ["image"]
    assert info.signature.outputs.input_names() == ["class", "probability", "error", *[f"p_{c}" for c in CLASSES]]
    example = mlflow.pyfunc.load_model(info.model_uri).input_example
    assert list(example.columns) == ["image"] and len(base64.b64decode(example["image"][0])) < 2000
    artifacts = {name: set(logged[name][0].flavors["python_function"]["artifacts"]) for name in logged}
    assert artifacts == {"frozen": {"config", "network"}, "svm_pixels": {"config", "svm"},
                         "svm_features": {"config", "svm", "extractor"}, "svm_concat": {"config", "svm", "extractor"}}


def test_models_are_logged_from_code_without_a_pickle(logged: dict) -> None:
    """MLflow "models from code": the code file travels with the model, no cloudpickled instance."""
    for info, _, _ in logged.values():
        flavor = info.flavors["python_function"]
        assert flavor["loader_module"] == "mlflow.pyfunc.loaders.code_model"
        assert flavor["model_code_path"].endswith("pyfunc_model.py") and "python_model" not in flavor
        local = Path(mlflow.artifacts.download_artifacts(info.model_uri))
        assert (local / "pyfunc_model.py").is_file() and not list(local.glob("python_model.pkl*"))


def test_decode_cell_accepts_data_uris_and_rejects_other_types(images: list[Path]) -> None:
    uri = "data:image/jpeg;base64," + encode(images[0])
    assert decode_cell(uri, SIZE, "stretch").shape == (SIZE, SIZE, 3)
    with pytest.raises(ValueError, match="unsupported input"):
        decode_cell(3.5, SIZE, "stretch")
    with pytest.raises(ValueError, match="missing"):
        decode_cell(None, SIZE, "stretch")
    with pytest.raises(ValueError, match="uint8"):
        decode_cell(np.zeros((SIZE, SIZE, 3), dtype=np.float32), SIZE, "stretch")
