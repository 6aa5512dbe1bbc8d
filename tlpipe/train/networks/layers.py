"""The networks' layers: augmentation, heads on pooled features, the image models around a backbone, optimizers."""

from __future__ import annotations

from collections.abc import Sequence

import keras
import numpy as np

from tlpipe.core.names import NETWORK_MODELS as MODEL_KINDS
from tlpipe.core.params import AugmentParams, FinetuneParams
from tlpipe.features.backbones import build_backbone
from tlpipe.train.networks.data import seed_training

MAX_NOISE_STDDEV = 255.0


def head_inputs(kind: str, final: object, mid: object) -> list:
    """Return what a head of ``kind`` reads, in its input order: ``[final]`` or ``[final, mid]``."""
    return [final] if kind == "frozen" else [final, mid]


def build_augmentation(params: AugmentParams, seed: int) -> keras.Sequential:
    """Build the course's ImageDataGenerator augmentation as Keras 3 layers.

    Acts on float32 pixels in 0..255 and only when called with ``training=True``
    (``fit`` does that; ``predict`` does not). Layers whose amount is zero are
    left out (an ``Identity`` layer stands in when all are); each layer's seed
    is ``seed`` plus its fixed position, so turning one off does not change the
    others' draws.

    Two Keras 3.15 workarounds: ``RandomShear`` gets ``(0, shear)``, which draws
    the same symmetric shear (the layer flips the sign at random) but, unlike a
    plain float, survives ``.keras`` save/load; ``GaussianNoise`` only takes a
    stddev up to 1, so the noise is added in 0..1 units between two
    ``Rescaling`` layers, which is ``noise_stddev`` in pixel units.

    Args:
        params: Augmentation amounts.
        seed: Base seed.

    Raises:
        ValueError: If ``noise_stddev`` exceeds 255.
    """
    if params.noise_stddev > MAX_NOISE_STDDEV:
        raise ValueError(f"noise_stddev must be at most {MAX_NOISE_STDDEV}, got {params.noise_stddev}")
    fill = {"fill_mode": "nearest"}
    L = keras.layers
    layers = []
    if params.rotation_degrees:
        layers.append(L.RandomRotation(params.rotation_degrees / 360.0, seed=seed, name="rotation", **fill))
    if params.height_shift or params.width_shift:
        layers.append(L.RandomTranslation(params.height_shift, params.width_shift, seed=seed + 1,
                                          name="translation", **fill))
    if params.shear:
        layers.append(L.RandomShear((0.0, params.shear), (0.0, params.shear), seed=seed + 2, name="shear", **fill))
    if params.zoom:
        layers.append(L.RandomZoom(params.zoom, seed=seed + 3, name="zoom", **fill))
    if params.horizontal_flip:
        layers.append(L.RandomFlip("horizontal", seed=seed + 4, name="flip"))
    if params.noise_stddev:
        layers += [L.Rescaling(1.0 / 255.0, name="to_unit"),
                   L.GaussianNoise(params.noise_stddev / 255.0, seed=seed + 5, name="noise"),
                   L.Rescaling(255.0, name="to_pixels")]
    return keras.Sequential(layers or [L.Identity(name="identity")], name="augmentation")


def build_head(kind: str, final_dim: int, mid_dim: int, n_classes: int, params: FinetuneParams) -> keras.Model:
    """Build the trainable head: final [+ mid] -> Dense(units, relu) -> Dense(n_classes, softmax).

    Args:
        kind: ``"frozen"`` (input: final) or ``"concat"`` (inputs: final, mid).
        final_dim: Width of the pooled final features.
        mid_dim: Width of the pooled mid-level features.
        n_classes: Output classes.
        params: Supplies ``frozen_units`` / ``concat_units``.

    Returns:
        A model named ``"head"``.
    """
    check_kinds([kind])
    final = keras.Input((final_dim,), name="final")
    if kind == "frozen":
        inputs, x, units = final, final, params.frozen_units
    else:
        mid = keras.Input((mid_dim,), name="mid")
        inputs, x, units = [final, mid], keras.layers.Concatenate(name="final_mid")([final, mid]), params.concat_units
    x = keras.layers.Dense(units, activation="relu", name="hidden",
                           kernel_initializer=seeded_glorot(params.seed + 3))(x)  # the Dense default, seeded
    outputs = keras.layers.Dense(n_classes, activation="softmax", name="probs",
                                 kernel_initializer=seeded_glorot(params.seed + 4))(x)
    return keras.Model(inputs, outputs, name="head")


def build_image_model(kind: str, backbone: keras.Model, image_size: int, n_classes: int, params: FinetuneParams,
                      head: keras.Model | None = None) -> keras.Model:
    """Build the full classifier: uint8 image -> float32 -> augmentation -> frozen backbone -> head.

    Args:
        kind: A value of :data:`MODEL_KINDS`.
        backbone: A :func:`tlpipe.features.backbones.build_backbone` model; set to
            ``trainable = False`` here.
        image_size: Side of the square uint8 input.
        n_classes: Output classes.
        params: Head sizes, augmentation and seed.
        head: A trained head whose weights are copied into the new model's
            head; a freshly initialised head when None.

    Returns:
        The model, input ``"image"`` (uint8), output class probabilities.
    """
    backbone.trainable = False
    inputs = keras.Input((image_size, image_size, 3), dtype="uint8", name="image")
    pixels = keras.ops.cast(inputs, "float32")
    pixels = build_augmentation(params.augment, params.seed)(pixels)
    features = backbone(pixels, training=False)
    new_head = build_head(kind, int(features["final"].shape[-1]), int(features["mid"].shape[-1]), n_classes, params)
    if head is not None:
        new_head.set_weights(head.get_weights())
    inputs_of_head = head_inputs(kind, features["final"], features["mid"])
    outputs = new_head(inputs_of_head[0] if kind == "frozen" else inputs_of_head)
    return keras.Model(inputs, outputs, name=f"{kind}_classifier")


def make_optimizer(name: str, learning_rate: float) -> keras.optimizers.Optimizer:
    """Return a fresh optimizer for the ``optimizer`` param."""
    builders = {"rmsprop": keras.optimizers.RMSprop, "adam": keras.optimizers.Adam, "sgd": keras.optimizers.SGD}
    return builders[name](learning_rate=learning_rate)


def compile_model(model: keras.Model, params: FinetuneParams, learning_rate: float) -> None:
    """Compile with categorical cross-entropy and an ``accuracy`` metric."""
    model.compile(optimizer=make_optimizer(params.optimizer, learning_rate), loss="categorical_crossentropy",
                  metrics=[keras.metrics.CategoricalAccuracy(name="accuracy")])


def load_frozen_backbone(name: str, weights: str | None, image_size: int, seed: int) -> keras.Model:
    """Build a backbone (seeded, so random-init weights repeat) and freeze it."""
    seed_training(seed)
    backbone = build_backbone(name, weights, image_size)
    backbone.trainable = False
    return backbone


def unfreeze_top_layers(backbone: keras.Model, count: int) -> None:
    """Make the last ``count`` layers of ``backbone.layers`` trainable, BatchNormalization excepted."""
    backbone.trainable = True
    for index, layer in enumerate(backbone.layers):
        top = index >= len(backbone.layers) - count
        layer.trainable = top and not isinstance(layer, keras.layers.BatchNormalization)


TTA_FLIPS = {"none": [], "horizontal": [(True, False)], "flips": [(True, False), (False, True), (True, True)]}


def augment_batch(augmentation: keras.Sequential, batch: np.ndarray, vertical: bool,
                  rng: np.random.Generator) -> np.ndarray:
    """The course's augmentation (``training=True``), plus a random upside-down flip when ``vertical``."""
    pixels = keras.ops.convert_to_numpy(augmentation(batch.astype("float32"), training=True))
    if vertical:
        flip = rng.random(len(pixels)) < 0.5
        pixels[flip] = pixels[flip, ::-1]
    return pixels


def build_tuned_head(final_dim: int, mid_dim: int, n_classes: int, params: FinetuneParams) -> keras.Model:
    """The finetuned model's head: final [+ mid] -> Dropout -> [Dense(units, relu)] -> Dense(softmax).

    Inputs are always ``[final, mid]`` (``mid`` unused unless ``finetuned_mid``).
    """
    final, mid = keras.Input((final_dim,), name="final"), keras.Input((mid_dim,), name="mid")
    x = keras.layers.Concatenate(name="final_mid")([final, mid]) if params.finetuned_mid else final
    if params.finetuned_dropout:
        x = keras.layers.Dropout(params.finetuned_dropout, seed=params.seed, name="dropout")(x)
    if params.finetuned_units:
        x = keras.layers.Dense(params.finetuned_units, activation="relu", name="hidden",
                               kernel_initializer=seeded_glorot(params.seed + 1))(x)
    outputs = keras.layers.Dense(n_classes, activation="softmax", name="probs",
                                 kernel_initializer=seeded_glorot(params.seed + 2))(x)
    return keras.Model([final, mid], outputs, name="head")


def seeded_glorot(seed: int) -> keras.initializers.Initializer:
    """Keras' default kernel initializer with a seed of its own. Without one, an initializer draws its seed
    from Python's global ``random`` when it is built, and the process's other threads (Prefect's, MLflow's) may too:
    ``finetuned``'s head started from other weights in some runs (the fault test's digests differed from
    the first epoch's loss on), however the process had been seeded."""
    return keras.initializers.GlorotUniform(seed=seed)


def build_tuned_image_model(backbone: keras.Model, head: keras.Model, image_size: int, tta: str) -> keras.Model:
    """uint8 image -> float32 -> backbone -> head, averaged over the flipped copies of ``tta``.

    Args:
        backbone: The (fine-tuned) backbone; frozen here for saving.
        head: The trained head (``[final, mid]`` -> probabilities).
        image_size: Side of the square uint8 input.
        tta: A key of :data:`TTA_FLIPS`: ``none``, ``horizontal`` (average with the
            mirror image) or ``flips`` (also upside down and both).
    """
    from tlpipe.features.backbones import FlipImages

    backbone.trainable = False
    inputs = keras.Input((image_size, image_size, 3), dtype="uint8", name="image")
    pixels = keras.ops.cast(inputs, "float32")
    views = [pixels] + [FlipImages(h, v, name=f"flip_{'h' if h else ''}{'v' if v else ''}")(pixels)
                        for h, v in TTA_FLIPS[tta]]
    probs = []
    for view in views:
        features = backbone(view, training=False)
        probs.append(head([features["final"], features["mid"]]))
    outputs = probs[0] if len(probs) == 1 else keras.layers.Average(name="tta_mean")(probs)
    return keras.Model(inputs, outputs, name=f"{TUNED_KIND}_classifier")


def check_kinds(kinds: Sequence[str]) -> list[str]:
    """Validate model kinds.

    Raises:
        ValueError: If empty, repeated, or not in :data:`MODEL_KINDS`.
    """
    kinds = list(kinds)
    unknown = [k for k in kinds if k not in MODEL_KINDS]
    if unknown or not kinds or len(set(kinds)) != len(kinds):
        raise ValueError(f"kinds must be distinct values of {MODEL_KINDS}, got {kinds}")
    return kinds


TUNED_KIND = "finetuned"
