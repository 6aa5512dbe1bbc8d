"""A trained model as a pyfunc model folder: its artifacts (config, network or SVM, extractor, ensemble members),
signature, input example and requirements, saved from code (:mod:`tlpipe.serving.pyfunc_model`).

Logging one into an MLflow run: :mod:`tlpipe.tracking.logged_models`.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import tempfile
from importlib import metadata
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
from PIL import Image

from tlpipe.serving.classifier import SVM_FEATURES

logger = logging.getLogger("tlpipe.pyfunc")

REQUIREMENTS = ("keras", "tensorflow-cpu", "scikit-learn", "pillow", "numpy", "pandas")


EXAMPLE_SIDE = 32  # the smallest image decode_bytes accepts


def build_signature(classes: list[str]):
    """Input: string column ``image``; output: class, probability, error, p_<class>."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    outputs = [ColSpec("string", "class", required=False), ColSpec("double", "probability", required=False),
               ColSpec("string", "error", required=False)]
    outputs += [ColSpec("double", f"p_{name}", required=False) for name in classes]
    return ModelSignature(inputs=Schema([ColSpec("string", "image")]), outputs=Schema(outputs))


def build_input_example() -> pd.DataFrame:
    """One small base64 JPEG (a 32x32 colour gradient) in the ``image`` column."""
    ramp = np.linspace(0, 255, EXAMPLE_SIDE, dtype=np.uint8)
    pixels = np.stack(np.broadcast_arrays(ramp[None, :], ramp[:, None], ramp[::-1][None, :]), axis=-1)
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels)).save(buffer, format="JPEG", quality=80)
    return pd.DataFrame({"image": [base64.b64encode(buffer.getvalue()).decode("ascii")]})


def list_requirements() -> list[str]:
    """Pinned requirements of the serving code, read from the installed distributions (offline).

    Informational: tlpipe itself is not on an index, so serve with ``--env-manager local``.
    """
    pins = []
    for name in REQUIREMENTS:
        try:
            pins.append(f"{name}=={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            pins.append(name)
    return pins


def write_config(folder: Path, config: dict) -> Path:
    """Write the model config as ``config.json`` in ``folder``."""
    path = Path(folder) / "config.json"
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return path


MODEL_CODE = Path(__file__).with_name("pyfunc_model.py")
"""The models-from-code file MLflow logs with every model (it calls ``mlflow.models.set_model``)."""


def model_options(classes: list[str], artifacts: dict[str, str]) -> dict:
    """The keyword arguments shared by ``save_model`` and ``log_model`` (the model is logged from code)."""
    return {
        "python_model": str(MODEL_CODE),
        "artifacts": artifacts,
        "signature": build_signature(classes),
        "input_example": build_input_example(),
        "pip_requirements": list_requirements(),
    }


def keras_artifacts(folder: Path, keras_model_path: Path, classes: list[str], image_size: int,
                    resize_mode: str) -> dict[str, str]:
    """Config and network artifacts of a network classifier."""
    if not Path(keras_model_path).is_file() or Path(keras_model_path).suffix != ".keras":
        raise ValueError(f"expected an existing .keras file, got {keras_model_path}")
    config = {"kind": "network", "classes": list(classes), "image_size": int(image_size),
              "resize_mode": resize_mode}
    return {"config": str(write_config(folder, config)), "network": str(keras_model_path)}


def svm_artifacts(folder: Path, svm_path: Path, feature: str, classes: list[str], image_size: int,
                  resize_mode: str, backbone: str, weights: str | None, pixel_size: int,
                  extractor_path: Path | None = None) -> dict[str, str]:
    """Config, SVM and (for features) extractor artifacts of an SVM classifier.

    The extractor is ``extractor_path`` when given, else it is built here with
    the training backbone and weights and saved as ``.keras``; either way the
    served model never resolves weights itself.
    """
    if feature not in SVM_FEATURES:
        raise ValueError(f"unknown SVM feature {feature!r}; expected one of {SVM_FEATURES}")
    config = {"kind": "svm", "classes": list(classes), "image_size": int(image_size), "resize_mode": resize_mode,
              "feature": feature, "pixel_size": int(pixel_size), "backbone": backbone, "weights": weights}
    artifacts = {"config": str(write_config(folder, config)), "svm": str(svm_path)}
    if feature != "pixels":
        artifacts["extractor"] = str(extractor_path or save_extractor(folder, backbone, weights, image_size))
    return artifacts


def save_extractor(folder: Path, backbone: str, weights: str | None, image_size: int) -> Path:
    """Build the features stage's extractor and save it as ``extractor.keras`` in ``folder``."""
    from tlpipe.features.backbones.common import is_random_init
    from tlpipe.features.extraction import build_extractor

    if is_random_init(weights):
        logger.warning("rebuilding a randomly initialised %s gives new weights: the served SVM will not see the "
                       "features it was trained on; pass the features stage's extractor instead", backbone)
    path = Path(folder) / "extractor.keras"
    build_extractor(backbone, weights, int(image_size), include_top=False).save(path)
    return path


def save_keras_classifier(path: Path, keras_model_path: Path, classes: list[str], image_size: int,
                          resize_mode: str) -> None:
    """Save a network as a pyfunc model folder at ``path`` (which must not exist yet).

    Args:
        path: Target MLflow model folder.
        keras_model_path: The full Keras model (uint8 images -> softmax), ``.keras``.
        classes: Class names in label order.
        image_size: Training image size.
        resize_mode: Training resize mode (``stretch`` or ``center_crop``).
    """
    with tempfile.TemporaryDirectory(prefix="tlpipe-pyfunc-") as folder:
        artifacts = keras_artifacts(Path(folder), keras_model_path, classes, image_size, resize_mode)
        mlflow.pyfunc.save_model(path=str(path), **model_options(classes, artifacts))


def trained_artifacts(folder: Path, name: str, model_path: Path, store_dir: Path, features_dir: Path | None,
                      params) -> dict[str, str]:
    """The artifacts of one of the pipeline's trained models (:func:`keras_artifacts` or :func:`svm_artifacts`).

    Arguments as :func:`tlpipe.tracking.logged_models.log_trained_model`; the config (and a rebuilt extractor)
    is written in ``folder``.
    """
    from tlpipe.core.names import SVM_MODELS, model_family
    from tlpipe.data import store
    from tlpipe.features.extraction import EXTRACTOR, normalise_weights

    classes = store.load_classes(store_dir)
    image_size = store.image_size(store_dir, "test")
    if model_family(name) == "network":
        return keras_artifacts(folder, model_path, classes, image_size, params.data.resize_mode)
    feature = SVM_MODELS[name]
    extractor = Path(features_dir) / EXTRACTOR if feature != "pixels" and features_dir is not None else None
    return svm_artifacts(folder, model_path, feature, classes, image_size, params.data.resize_mode,
                         params.features.backbone, normalise_weights(params.features.weights),
                         params.svm.pixel_size, extractor)


def ensemble_artifacts(folder: Path, members: dict[str, Path], temperatures: dict[str, float | None],
                       store_dir: Path, features_dir: Path | None, params) -> dict[str, str]:
    """Config of an ensemble and one folder per member holding its artifacts as files named by key.

    Args:
        folder: An empty working folder.
        members: ``{model name: its .joblib or .keras file}``, in the ensemble's order.
        temperatures: ``{model name: T}`` (None: the member's probabilities as they are).
        store_dir, features_dir, params: As :func:`tlpipe.tracking.logged_models.log_trained_model`.
    """
    import shutil

    from tlpipe.data import store

    artifacts = {}
    for name, model_path in members.items():
        member_dir = Path(folder) / name
        member_dir.mkdir(parents=True)
        for key, source in trained_artifacts(member_dir, name, model_path, store_dir, features_dir, params).items():
            target = member_dir / f"{key}{Path(source).suffix}"
            if Path(source) != target:
                shutil.copyfile(source, target)
        artifacts[name] = str(member_dir)
    config = {"kind": "ensemble", "classes": store.load_classes(store_dir),
              "image_size": store.image_size(store_dir, "test"),
              "resize_mode": params.data.resize_mode, "members": list(members),
              "temperatures": {name: temperatures.get(name) for name in members}}
    artifacts["config"] = str(write_config(folder, config))
    return artifacts
