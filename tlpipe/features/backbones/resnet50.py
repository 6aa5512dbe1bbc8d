"""ResNet50 backbone (``keras.applications.ResNet50``) with caffe preprocessing inside.

ImageNet weights come from Keras' own cache (``$KERAS_HOME/models`` or
``~/.keras/models``) or a download; offline and uncached, resolution fails
fast with :class:`WeightsUnavailableError` instead of hanging on the network.
"""

from __future__ import annotations

import os
import socket
import threading
from pathlib import Path

import keras

from tlpipe.features.backbones.common import (
    OFFLINE_HINT,
    PixelPreprocessing,
    WeightsUnavailableError,
    build_feature_model,
    has_classifier_weights,
    is_imagenet,
    is_legacy_h5,
    is_random_init,
    require_weights_file,
)

NAME = "resnet50"
FINAL_LAYER = "conv5_block3_out"
MID_LAYER = "conv3_block4_out"
CAFFE_MEAN_BGR = [103.939, 116.779, 123.68]
WEIGHTS_ORIGIN = "https://storage.googleapis.com/tensorflow/keras-applications/resnet/"
WEIGHTS_HOST = "storage.googleapis.com"
# md5 of the Keras files (same values as keras.src.applications.resnet.WEIGHTS_HASHES).
WEIGHTS_MD5 = {
    True: "2cb95161c43110f7111970584f804107",
    False: "4d473c1dd8becc155b73f8504c6f6626",
}
PROBE_TIMEOUT_S = 3.0
DOWNLOAD_TIMEOUT_S = 20.0


def get_imagenet_file_name(include_top: bool) -> str:
    """Return the file name Keras uses for the ResNet50 ImageNet weights.

    Args:
        include_top: Whether the classifier is included.

    Returns:
        ``resnet50_weights_tf_dim_ordering_tf_kernels[_notop].h5``.
    """
    suffix = "" if include_top else "_notop"
    return f"resnet50_weights_tf_dim_ordering_tf_kernels{suffix}.h5"


def get_keras_home() -> Path:
    """Return Keras' cache root as Keras resolves it (``$KERAS_HOME`` or ``~/.keras``).

    Read at call time, so a changed ``KERAS_HOME`` is honoured.

    Returns:
        The directory.
    """
    return Path(os.environ.get("KERAS_HOME") or "~/.keras").expanduser()


def find_cached_imagenet_file(include_top: bool) -> Path | None:
    """Look for the ImageNet weights in Keras' cache directories.

    Args:
        include_top: Whether the classifier is included.

    Returns:
        The cached file, or None.
    """
    name = get_imagenet_file_name(include_top)
    for root in (get_keras_home(), Path("/tmp/.keras")):
        candidate = root / "models" / name
        if candidate.is_file():
            return candidate
    return None


def probe_host(host: str, port: int = 443, timeout: float = PROBE_TIMEOUT_S) -> str | None:
    """Check quickly whether a host is reachable (DNS look-up and TCP connect).

    The look-up runs in a daemon thread so a stalled resolver cannot hang the caller.

    Args:
        host: Host name.
        port: TCP port.
        timeout: Seconds allowed in all.

    Returns:
        None if reachable, else a short reason.
    """
    result: list[str | None] = [f"timed out after {timeout:.0f} s"]

    def connect() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                result[0] = None
        except OSError as exc:
            result[0] = f"{type(exc).__name__}: {exc}"

    thread = threading.Thread(target=connect, daemon=True)
    thread.start()
    thread.join(timeout)
    return result[0]


def download_imagenet_file(include_top: bool) -> Path:
    """Fetch the ImageNet weights into Keras' cache, failing fast when offline.

    Args:
        include_top: Whether the classifier is included.

    Returns:
        The downloaded file.

    Raises:
        WeightsUnavailableError: If the host is unreachable or the download fails.
    """
    name = get_imagenet_file_name(include_top)
    reason = probe_host(WEIGHTS_HOST)
    if reason is None:
        previous = socket.getdefaulttimeout()
        socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
        try:
            return Path(
                keras.utils.get_file(
                    name,
                    WEIGHTS_ORIGIN + name,
                    cache_subdir="models",
                    file_hash=WEIGHTS_MD5[include_top],
                    cache_dir=str(get_keras_home()),
                )
            )
        except Exception as exc:  # noqa: BLE001 - any download failure becomes one clear error
            reason = f"{type(exc).__name__}: {exc}"
        finally:
            socket.setdefaulttimeout(previous)
    raise WeightsUnavailableError(
        f"ResNet50 ImageNet weights are not available: {name} is not in Keras' cache directory "
        f"{get_keras_home() / 'models'} ($KERAS_HOME/models, default ~/.keras/models) and could not be "
        f"downloaded from {WEIGHTS_ORIGIN + name} ({reason}). Copy that file there, or pass a local "
        f"weights file (features.weights=/path/to/{name}). {OFFLINE_HINT}"
    )


def resolve_weights(weights: str | os.PathLike[str] | None, include_top: bool = False) -> Path | None:
    """Resolve a weights argument to a file, downloading ImageNet weights if needed.

    Args:
        weights: ``"imagenet"``, a weights file path, or None/``"none"``.
        include_top: Whether the classifier is needed.

    Returns:
        The weights file, or None for random initialisation.

    Raises:
        WeightsUnavailableError: If the weights cannot be found or fetched.
        ValueError: If a file lacks the classifier that ``include_top`` needs.
    """
    if is_random_init(weights):
        return None
    if is_imagenet(weights):
        return find_cached_imagenet_file(include_top) or download_imagenet_file(include_top)
    path = require_weights_file(weights, NAME)
    if include_top and not has_classifier_weights(path):
        raise ValueError(
            f"{path} is a notop (feature-only) weights file but include_top=True needs the classifier; "
            f"use a full weights file such as {get_imagenet_file_name(True)}"
        )
    return path


def build_network(image_size: int, include_top: bool) -> tuple[keras.KerasTensor, keras.Model]:
    """Build the ResNet50 graph (random init) on a raw-pixel input with caffe preprocessing.

    Args:
        image_size: Square input size.
        include_top: Whether to add the ImageNet classifier.

    Returns:
        The raw-pixel input tensor and the network (input -> last map or probs).
    """
    inputs = keras.Input((image_size, image_size, 3), name="image", dtype="float32")
    x = PixelPreprocessing(CAFFE_MEAN_BGR, scale=1.0, bgr=True, name="preprocess")(inputs)
    net = keras.applications.ResNet50(
        include_top=include_top, weights=None, input_tensor=x, input_shape=(image_size, image_size, 3)
    )
    return inputs, net


def load_weights_file(net: keras.Model, model: keras.Model, path: Path, include_top: bool) -> None:
    """Load a weights file into the network or the feature model.

    Legacy ``.h5`` files (Keras' own ResNet50 files) go into the network; a
    full file into a notop network is loaded by name. Keras 3 ``.weights.h5``
    files (saved from a model returned by :func:`build`) go into the model.

    Args:
        net: The ResNet50 network.
        model: The dict-output feature model sharing its layers.
        path: Weights file.
        include_top: Whether the network has the classifier.
    """
    if not is_legacy_h5(path):
        model.load_weights(path)
    elif not include_top and has_classifier_weights(path):
        net.load_weights(path, by_name=True)
    else:
        net.load_weights(path)


def build(weights: str | os.PathLike[str] | None, image_size: int, include_top: bool) -> keras.Model:
    """Build the ResNet50 feature model.

    Args:
        weights: ``"imagenet"``, a weights file path, or None/``"none"``.
        image_size: Square input size.
        include_top: Whether to add the ``"probs"`` output.

    Returns:
        Model from raw RGB pixels to ``{"final": (B, 2048), "mid": (B, 512)[, "probs"]}``.
    """
    path = resolve_weights(weights, include_top)
    inputs, net = build_network(image_size, include_top)
    final = net.get_layer(FINAL_LAYER).output
    mid = net.get_layer(MID_LAYER).output
    model = build_feature_model(inputs, final, mid, net.output if include_top else None, name="resnet50_backbone")
    if path is not None:
        load_weights_file(net, model, path, include_top)
    return model
