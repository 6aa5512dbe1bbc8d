"""Trained models as MLflow pyfunc models that take images, not features.

Every model (the networks ``frozen``/``concat``/``finetuned``, the SVMs ``svm_features``,
``svm_concat``, ``svm_pixels``, and the evaluate stage's ``ensemble`` when it is
kept) is logged as one :class:`ImageClassifier`:
its artifacts hold everything between an image file and a class name, so a
served model needs neither the store, the features nor the backbone weights.

Artifacts of one model (names in ``context.artifacts``):
    config: ``config.json``: kind (``network``/``svm``/``ensemble``), classes, image_size,
        resize_mode and, for SVMs, feature, pixel_size, backbone, weights; for an
        ensemble, members and each member's temperature (None: its probabilities as they are).
    network: the full Keras model, uint8 images -> softmax (networks only).
    svm: the joblib'd :class:`tlpipe.train.svm.LinearSVM` (primal linear SVM with calibrated
        probabilities; older runs: ``SVC(kernel="linear", probability=True)``) (SVMs only).
    extractor: the backbone as a ``.keras`` model, uint8 images ->
        {"final", "mid"} (SVMs on features only).
    <member> (ensembles only): one folder per member holding that member's own
        artifacts as files named by key (``config.json``, ``network.keras`` or
        ``svm.joblib``, ``extractor.keras``). The ensemble averages the members'
        probabilities (networks' temperature-scaled, :mod:`tlpipe.serving.calibration`)
        and answers the most probable class.

Input: a DataFrame with a string column ``image`` (base64 image bytes, raw
bytes, or a uint8 (H, W, 3) array per cell), or, when calling
:meth:`ImageClassifier.predict` directly, a uint8 array (N, H, W, 3). Paths to
files are refused unless the model's process sets ``TLPIPE_PYFUNC_ALLOW_PATHS=1``
(:func:`paths_allowed`), so a served model never reads the server's files for a
client; ``tlpipe predict`` sends the files' bytes. A model loaded with
``mlflow.pyfunc.load_model`` enforces the DataFrame signature: wrap arrays and
lists with :func:`to_image_frame` first. Every image is decoded exactly as
the training images were (:func:`tlpipe.data.images.decode_bytes` with the
training size and resize mode).

Output: a DataFrame with ``class``, ``probability``, ``error`` and one
``p_<class>`` column per class. A row that cannot be decoded gets class None,
null probabilities and the reason in ``error``; the other rows are unaffected.
For SVMs ``class`` is the SVM's ``predict`` (its decision function, the model the
metrics were computed with) and ``probability`` its sigmoid-calibrated (Platt)
probability, which is usually but not always the largest ``p_<class>``.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import os
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
from PIL import Image

from tlpipe.data.images import ImageRejected, ResizeMode, decode_bytes, decode_file, resize_image
from tlpipe.serving.calibration import average_probabilities, scale_temperature

KINDS = ("network", "svm", "ensemble")
SVM_FEATURES = ("final", "concat", "pixels")
BATCH_SIZE = 32
MAX_PATH_CHARS = 4096

PATHS_ENV = "TLPIPE_PYFUNC_ALLOW_PATHS"

logger = logging.getLogger("tlpipe.pyfunc")


def paths_allowed() -> bool:
    """Whether models in this process may read files named in their input: only with ``TLPIPE_PYFUNC_ALLOW_PATHS=1``.

    Off unless set, so a served model (``mlflow models serve``, ``tlpipe serve-model``)
    never reads or probes the server's own files for a REST client.
    """
    return os.environ.get(PATHS_ENV, "0") == "1"


def refused_path_reason() -> str:
    """What a path input is told when :func:`paths_allowed` is off."""
    return f"file paths are refused (set {PATHS_ENV}=1 in the model's process to allow them); send the image bytes"


def decode_base64(text: str) -> bytes:
    """Decode standard or URL-safe base64, with or without a ``data:...;base64,`` prefix.

    Raises:
        ImageRejected: If ``text`` is not valid base64.
    """
    if text.startswith("data:") and "," in text:
        text = text.split(",", 1)[1]
    text = "".join(text.split())
    altchars = b"-_" if ("-" in text or "_" in text) else None
    try:
        return base64.b64decode(text, altchars=altchars, validate=True)
    except (binascii.Error, ValueError):
        shown = text[:60] + ("..." if len(text) > 60 else "")
        if not paths_allowed():
            raise ImageRejected(f"not valid base64 ({refused_path_reason()}): {shown!r}") from None
        raise ImageRejected(f"neither an existing file nor valid base64: {shown!r}") from None


def is_existing_file(text: str) -> bool:
    """Whether ``text`` names an existing file (short strings only; never raises).

    Always False unless :func:`paths_allowed`: the file system is not even probed.
    """
    if not paths_allowed():
        return False
    if len(text) > MAX_PATH_CHARS or "\n" in text:
        return False
    try:
        return Path(text).is_file()
    except (OSError, ValueError):
        return False


def resize_array(pixels: np.ndarray, size: int, mode: ResizeMode) -> np.ndarray:
    """Check a uint8 (H, W, 3) array and bring it to (size, size, 3) as training did."""
    if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[-1] != 3:
        raise ImageRejected(f"expected a uint8 (H, W, 3) array, got {pixels.dtype} {pixels.shape}")
    if pixels.shape[:2] == (size, size):
        return pixels
    return np.asarray(resize_image(Image.fromarray(pixels), size, mode), dtype=np.uint8)


def decode_cell(cell: object, size: int, mode: ResizeMode) -> np.ndarray:
    """Turn one input cell into a (size, size, 3) uint8 array.

    Args:
        cell: Image bytes, base64 image bytes, a uint8 (H, W, 3) array, or (only
            when :func:`paths_allowed`) a path to an existing file.
        size: Training image size.
        mode: Training resize mode.

    Raises:
        ImageRejected: With the reason the cell cannot be used.
    """
    if isinstance(cell, np.ndarray):
        return resize_array(cell, size, mode)
    if isinstance(cell, (bytes, bytearray, memoryview)):
        return decode_bytes(bytes(cell), size, mode).pixels
    if isinstance(cell, Path):
        if not paths_allowed():
            raise ImageRejected(refused_path_reason())
        return decode_file(cell, size, mode).pixels
    if isinstance(cell, str):
        if is_existing_file(cell):
            return decode_file(Path(cell), size, mode).pixels
        return decode_bytes(decode_base64(cell), size, mode).pixels
    if cell is None or (isinstance(cell, float) and np.isnan(cell)):
        raise ImageRejected("missing image")
    raise ImageRejected(f"unsupported input of type {type(cell).__name__}")


def to_image_frame(images: Any) -> pd.DataFrame:
    """Wrap any accepted input as the model's DataFrame (column ``image``, object cells).

    Args:
        images: A DataFrame with an ``image`` column (returned as is), a uint8
            array (N, H, W, 3) or (H, W, 3), or a list of paths, bytes, base64
            strings or arrays.

    Raises:
        ValueError: On a DataFrame without an ``image`` column or an array of
            the wrong rank.
    """
    if isinstance(images, pd.DataFrame):
        if "image" not in images.columns:
            raise ValueError(f"expected a column 'image', got columns {list(images.columns)}")
        return images
    if isinstance(images, np.ndarray):
        if images.ndim == 3:
            images = images[None]
        if images.ndim != 4:
            raise ValueError(f"expected images (N, H, W, 3), got shape {images.shape}")
        cells = list(images)
    elif isinstance(images, (str, bytes, Path)):
        cells = [images]
    else:
        cells = [str(item) if isinstance(item, Path) else item for item in images]
    return pd.DataFrame({"image": pd.Series(cells, dtype=object)})


def label_columns(svm_classes: np.ndarray, classes: list[str]) -> np.ndarray:
    """Column index in ``classes`` of each of an SVM's ``classes_`` (integer labels or names)."""
    if np.issubdtype(np.asarray(svm_classes).dtype, np.integer):
        return np.asarray(svm_classes, dtype=np.int64)
    return np.asarray([classes.index(str(name)) for name in svm_classes], dtype=np.int64)


def load_keras(path: str | Path):
    """Load a ``.keras`` file that may contain a tlpipe backbone (custom layers registered)."""
    import keras

    import tlpipe.features.backbones  # noqa: F401  (registers tlpipe>PixelPreprocessing)

    return keras.saving.load_model(path, compile=False)


class ImageClassifier(mlflow.pyfunc.PythonModel):
    """An MLflow pyfunc model: images in, class names and probabilities out.

    Logged "from code" (:data:`tlpipe.serving.packaging.MODEL_CODE`): MLflow stores no pickled instance,
    the code file creates an empty one and :meth:`load_context` reads the model
    state from the artifacts.
    """

    # Inputs vary (DataFrame, array, list) and the signature is given explicitly:
    # skip MLflow's type-hint wrapping of ``predict`` (and its warning). For the
    # same reason ``predict`` has no annotations: MLflow 3 would derive a signature.
    _skip_type_hint_validation = True

    eager = False
    """Run the Keras models eagerly instead of through their traced graph (``predict_on_batch``).

    Tracing costs 1-3 s once and then makes each call fast: right for a served model and
    for scoring many images; eager is faster for one call on a few images (``tlpipe predict``,
    :meth:`use_eager`)."""

    def use_eager(self, eager: bool = True) -> None:
        """Choose eager runs (:attr:`eager`) for this model and its ensemble members."""
        self.eager = eager
        for member, _ in getattr(self, "members", []):
            member.use_eager(eager)

    def run_keras(self, model, pixels: np.ndarray):
        """A Keras model's outputs for a batch of uint8 images (inference mode, eager or traced)."""
        return model(pixels, training=False) if self.eager else model.predict_on_batch(pixels)

    def load_context(self, context) -> None:
        """Read the config and load the network, or the SVM (and its extractor)."""
        from tlpipe.features.extraction import tf_log_level

        tf_log_level()
        self.config = json.loads(Path(context.artifacts["config"]).read_text())
        self.classes: list[str] = list(self.config["classes"])
        self.network = self.svm = self.extractor = None
        self.members: list[tuple[ImageClassifier, float | None]] = []
        if self.config["kind"] == "ensemble":
            temperatures = self.config.get("temperatures", {})
            self.members = [(load_member(context.artifacts[name]), temperatures.get(name))
                            for name in self.config["members"]]
        elif self.config["kind"] == "network":
            self.network = load_keras(context.artifacts["network"])
            check_output_width(self.network, len(self.classes))
        else:
            import joblib

            self.svm = joblib.load(context.artifacts["svm"])
            self.svm_columns = label_columns(self.svm.classes_, self.classes)
            if "extractor" in context.artifacts:
                self.extractor = load_keras(context.artifacts["extractor"])

    def predict(self, context, model_input, params=None):
        """Classify images.

        Args:
            context: The MLflow context (unused; state comes from :meth:`load_context`).
            model_input: A DataFrame with an ``image`` column, a uint8 array
                (N, H, W, 3), or a list of bytes/base64 strings (paths: see :func:`paths_allowed`).
            params: Unused.

        Returns:
            A DataFrame, one row per input row: ``class``, ``probability``,
            ``error``, ``p_<class>`` per class.
        """
        cells = to_image_frame(model_input)["image"].tolist()
        parts = [self.predict_cells(cells[start:start + BATCH_SIZE])
                 for start in range(0, len(cells), BATCH_SIZE)]
        if not parts:
            return self.build_frame(np.zeros(0, dtype=np.int64), np.zeros((0, len(self.classes))), [])
        return pd.concat(parts, ignore_index=True)

    def predict_cells(self, cells: list) -> pd.DataFrame:
        """Decode and classify one batch of cells; undecodable cells become error rows."""
        size, mode = int(self.config["image_size"]), self.config["resize_mode"]
        errors: list[str | None] = []
        pixels = []
        for cell in cells:
            try:
                pixels.append(decode_cell(cell, size, mode))
                errors.append(None)
            except (ImageRejected, OSError, SyntaxError, ValueError, EOFError) as error:
                errors.append(describe_error(error))
        indices = np.full(len(cells), -1, dtype=np.int64)
        probs = np.full((len(cells), len(self.classes)), np.nan)
        good = np.flatnonzero([error is None for error in errors])
        if len(good):
            indices[good], probs[good] = self.classify(np.stack(pixels))
        return self.build_frame(indices, probs, errors)

    def classify(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Class index and per-class probabilities for (n, size, size, 3) uint8 images."""
        if self.members:
            return self.classify_ensemble(pixels)
        if self.network is not None:
            probs = np.asarray(self.run_keras(self.network, pixels), dtype=np.float64)
            return probs.argmax(axis=1), probs
        inputs = self.svm_inputs(pixels)
        probs = np.zeros((len(pixels), len(self.classes)))
        probs[:, self.svm_columns] = self.svm.predict_proba(inputs)
        return label_columns(self.svm.predict(inputs), self.classes), probs

    def classify_ensemble(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The members' calibrated probabilities averaged; the class is the most probable one."""
        probas = []
        for member, temperature in self.members:
            probs = member.classify(pixels)[1]
            probas.append(probs if temperature is None else scale_temperature(probs, temperature))
        probs = average_probabilities(probas)
        return probs.argmax(axis=1), probs

    def svm_inputs(self, pixels: np.ndarray) -> np.ndarray:
        """The SVM's input vectors, built exactly as in training."""
        feature = self.config["feature"]
        if feature == "pixels":
            from tlpipe.data.images import resize_batch

            flat = resize_batch(pixels, int(self.config["pixel_size"])).reshape(len(pixels), -1)
            return flat.astype(np.float32) * np.float32(1 / 255)
        outputs = self.run_keras(self.extractor, pixels)
        final = np.asarray(outputs["final"], dtype=np.float32)
        if feature == "final":
            return final
        return np.concatenate([final, np.asarray(outputs["mid"], dtype=np.float32)], axis=1)

    def build_frame(self, indices: np.ndarray, probs: np.ndarray, errors: list[str | None]) -> pd.DataFrame:
        """The output DataFrame; with error rows, missing numbers are None (JSON null), not NaN."""
        frame = pd.DataFrame({
            "class": pd.Series([self.classes[i] if i >= 0 else None for i in indices], dtype=object),
            "probability": probs[np.arange(len(indices)), np.maximum(indices, 0)],
            "error": pd.Series(errors, dtype=object),
            **{f"p_{name}": probs[:, column] for column, name in enumerate(self.classes)},
        })
        frame.loc[indices < 0, "probability"] = np.nan
        if (indices < 0).any():
            numbers = [column for column in frame.columns if column not in ("class", "error")]
            frame[numbers] = frame[numbers].astype(object).where(frame[numbers].notna(), None)
        return frame


def load_member(folder: str | Path) -> ImageClassifier:
    """One ensemble member from its artifact folder (files named by artifact key: ``config.json``, ...)."""
    from types import SimpleNamespace

    member = ImageClassifier()
    member.load_context(SimpleNamespace(artifacts={path.stem: str(path) for path in Path(folder).iterdir()}))
    return member


def describe_error(error: Exception) -> str:
    """The per-row error message for an input that could not be decoded."""
    if isinstance(error, ImageRejected):
        return str(error)
    return f"corrupt or truncated image: {type(error).__name__}: {error}"


def check_output_width(network, classes: int) -> None:
    """Fail when a network's softmax width does not match the number of class names."""
    width = network.output_shape[-1]
    if width != classes:
        raise ValueError(f"the network outputs {width} probabilities but {classes} class names were given")


