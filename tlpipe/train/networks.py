"""Core of the ``finetune`` stages: the course's two transfer-learning models, and the field's next step.

The course's two models put a small dense head on a frozen pretrained backbone::

    frozen: uint8 image -> float32 -> augmentation -> backbone -> final -> Dense(relu) -> Dense(softmax)
    concat: uint8 image -> float32 -> augmentation -> backbone -> [final, mid] -> Dense(relu) -> Dense(softmax)

``finetuned`` (:func:`train_finetuned`) is kept apart from them, so the
course's lesson stays visible: a head trained first, then the backbone's top
blocks fine-tuned at a low learning rate with BatchNorm in inference mode,
on activations cached below those blocks, and predictions averaged over
mirrored copies of the image (test-time augmentation inside the saved model).

The backbone is frozen (``trainable = False``) and called with ``training=False``.
Note that Keras 3 lets an outer ``training=True`` override that argument of a
nested model, so what keeps BatchNorm in inference mode during ``fit`` is that
a BatchNormalization layer whose ``trainable`` is False always uses its moving
statistics; phase 2 keeps every BatchNormalization layer frozen for that reason.

Two training modes (``FinetuneParams.feature_cache``):

* end to end: every epoch streams the memory-mapped ``train.npy`` through
  augmentation and the frozen backbone (a :class:`ArrayBatches` per epoch, in a
  seeded shuffled order).
* feature cache: ``cache_copies`` augmented copies of every training image go
  through the backbone once (:func:`compute_feature_cache`); only the head is
  trained, epoch ``e`` seeing copy ``e % cache_copies``. The trained head is
  then copied into the full image model, which takes images exactly like the
  end-to-end one.

Either way the weights of the epoch with the best validation accuracy (earliest
on ties) are kept, and an optional phase 2 unfreezes the top backbone layers.
"""

from __future__ import annotations

import math
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import keras
import numpy as np
import pandas as pd

from tlpipe.data import store
from tlpipe.features.backbones import build_backbone, check_weights
from tlpipe.core.params import AugmentParams, FinetuneParams

from tlpipe.core.names import NETWORK_MODELS as MODEL_KINDS  # noqa: E402
HISTORY_COLUMNS = ("epoch", "phase", "loss", "accuracy", "val_loss", "val_accuracy", "seconds")
CACHE_FOLDER = "_feature_cache"
MAX_NOISE_STDDEV = 255.0

EpochCallback = Callable[[str, int, dict], None]


@dataclass(frozen=True)
class StoreData:
    """What training reads from an image store.

    Attributes:
        train_path: ``train.npy`` (uint8, N x H x W x 3).
        val_path: ``val.npy``.
        train_labels: One-hot float32 labels of the train rows.
        val_labels: One-hot float32 labels of the val rows.
        classes: Class names in label order.
        image_size: Side of the square images.
    """

    train_path: Path
    val_path: Path
    train_labels: np.ndarray
    val_labels: np.ndarray
    classes: list[str]
    image_size: int


@dataclass(frozen=True)
class FeatureCache:
    """Pooled backbone features of augmented train copies and plain val images.

    Files in ``folder``: ``train_final.npy``/``train_mid.npy`` with
    ``copies * rows`` rows (copy-major: row ``c * rows + i`` is copy ``c`` of
    image ``i``) and ``val_final.npy``/``val_mid.npy``.

    Attributes:
        folder: Where the ``.npy`` files are.
        copies: Augmented copies per training image.
        rows: Training images.
        seconds: Time taken to compute the cache.
    """

    folder: Path
    copies: int
    rows: int
    seconds: float

    def train_features(self, copy: int) -> tuple[np.ndarray, np.ndarray]:
        """Return (final, mid) of one augmented copy of every training image, memory-mapped."""
        rows = slice(copy * self.rows, (copy + 1) * self.rows)
        return tuple(np.load(self.folder / f"train_{k}.npy", mmap_mode="r")[rows] for k in ("final", "mid"))

    def val_features(self) -> tuple[np.ndarray, np.ndarray]:
        """Return (final, mid) of the val images (no augmentation)."""
        return tuple(np.load(self.folder / f"val_{k}.npy") for k in ("final", "mid"))


@dataclass
class BestEpoch:
    """The best epoch so far and its weights: by val accuracy (ties: lower val loss, then earliest), as the
    course's checkpoint does, or with ``monitor="val_loss"`` by val loss (ties: higher accuracy, then earliest).

    The val split is small (a few dozen images), so val accuracy saturates within
    a few epochs; breaking ties on val loss keeps the better-trained head instead
    of the first epoch that reached the plateau. The finetuned model monitors val
    loss: on hymenoptera's 24 val images one undertrained head epoch reached val
    accuracy 1.0 by chance (test 0.86), while its lowest-loss epoch generalises.
    """

    epoch: int = 0
    phase: int = 0
    val_accuracy: float = -math.inf
    val_loss: float = math.inf
    weights: list[np.ndarray] = field(default_factory=list)
    monitor: str = "val_accuracy"

    def beats(self, row: dict) -> bool:
        """Whether ``row`` beats the best so far (the monitored value, then the other)."""
        if self.monitor == "val_loss":
            better = row["val_loss"] < self.val_loss
            tie = row["val_loss"] == self.val_loss and row["val_accuracy"] > self.val_accuracy
        else:
            better = row["val_accuracy"] > self.val_accuracy
            tie = row["val_accuracy"] == self.val_accuracy and row["val_loss"] < self.val_loss
        return better or tie

    def record(self, row: dict) -> None:
        """Make ``row``'s epoch the best (weights untouched)."""
        self.epoch, self.phase = int(row["epoch"]), int(row["phase"])
        self.val_accuracy, self.val_loss = float(row["val_accuracy"]), float(row["val_loss"])

    def update(self, model: keras.Model, row: dict) -> None:
        """Keep ``model``'s weights if ``row`` beats the best."""
        if self.beats(row):
            self.record(row)
            self.weights = model.get_weights()


def monitor_of(kind: str) -> str:
    """The value :class:`BestEpoch` monitors for ``kind``: val loss for the finetuned model, else val accuracy."""
    return "val_loss" if kind == TUNED_KIND else "val_accuracy"


def replay_best(kind: str, history: pd.DataFrame) -> BestEpoch:
    """The epoch (no weights) that training kept for ``kind``, replayed from its history in epoch order."""
    best = BestEpoch(monitor=monitor_of(kind))
    for row in history.to_dict("records"):
        if best.beats(row):
            best.record(row)
    return best


class ArrayBatches(keras.utils.PyDataset):
    """Batches ``(x, one-hot y)`` of aligned arrays, read row by row in a fixed order.

    The arrays may be memory-mapped: each batch copies only its own rows, so
    memory stays at one batch. Rows inside a batch are read in ascending order
    (sequential reads); which rows form a batch follows ``order``.

    Args:
        inputs: One array, or several with the same number of rows (a model with
            several inputs gets a tuple).
        labels: One-hot labels, one row per input row.
        batch_size: Rows per batch (the last batch may be smaller).
        order: Row order for this epoch; ascending when None.
    """

    def __init__(self, inputs: Sequence[np.ndarray], labels: np.ndarray, batch_size: int,
                 order: np.ndarray | None = None) -> None:
        super().__init__()
        self.inputs = list(inputs)
        self.labels = labels
        self.batch_size = batch_size
        self.order = np.arange(len(labels)) if order is None else np.asarray(order)

    def __len__(self) -> int:
        """Number of batches."""
        return math.ceil(len(self.order) / self.batch_size)

    def __getitem__(self, index: int) -> tuple[np.ndarray | tuple[np.ndarray, ...], np.ndarray]:
        """Return batch ``index`` as ``(x, y)``."""
        rows = np.sort(self.order[index * self.batch_size:(index + 1) * self.batch_size])
        xs = tuple(np.asarray(array[rows]) for array in self.inputs)
        return (xs[0] if len(xs) == 1 else xs), self.labels[rows]


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
    x = keras.layers.Dense(units, activation="relu", name="hidden")(x)
    outputs = keras.layers.Dense(n_classes, activation="softmax", name="probs")(x)
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


def load_store_data(store_dir: Path) -> StoreData:
    """Read labels, classes and image size of a store (images stay on disk).

    Raises:
        ValueError: If labels and image rows disagree or images are not square RGB.
    """
    store_dir = Path(store_dir)
    classes = store.load_classes(store_dir)
    paths = {split: store.split_path(store_dir, split) for split in ("train", "val")}
    labels = {}
    for split, path in paths.items():
        shape = store.read_npy_header(path)[0]
        raw = store.split_labels(store_dir, split)
        if len(shape) != 4 or shape[1] != shape[2] or shape[3] != 3 or shape[0] != len(raw) or not len(raw):
            raise ValueError(f"{path}: shape {shape} does not match {len(raw)} labelled square RGB images")
        labels[split] = keras.utils.to_categorical(raw, len(classes)).astype("float32")
    size = store.read_npy_header(paths["train"])[0][1]
    return StoreData(paths["train"], paths["val"], labels["train"], labels["val"], classes, int(size))


def load_frozen_backbone(name: str, weights: str | None, image_size: int, seed: int) -> keras.Model:
    """Build a backbone (seeded, so random-init weights repeat) and freeze it."""
    keras.utils.set_random_seed(seed)
    backbone = build_backbone(name, weights, image_size)
    backbone.trainable = False
    return backbone


def epoch_order(rows: int, seed: int, epoch: int) -> np.ndarray:
    """Return the seeded shuffled row order of one epoch."""
    return np.random.default_rng([seed, epoch]).permutation(rows)


def write_features(writers: dict[str, store.NpyWriter], outputs: dict) -> None:
    """Append one batch of backbone outputs to the ``final``/``mid`` writers."""
    for key, writer in writers.items():
        writer.write(np.asarray(keras.ops.convert_to_numpy(outputs[key]), dtype=np.float32))


def open_writers(folder: Path, split: str, rows: int, backbone: keras.Model) -> dict[str, store.NpyWriter]:
    """Open ``<split>_final.npy`` and ``<split>_mid.npy`` writers of ``rows`` rows."""
    return {k: store.NpyWriter(folder / f"{split}_{k}.npy", rows, (int(backbone.output[k].shape[-1]),), "float32")
            for k in ("final", "mid")}


def compute_feature_cache(backbone: keras.Model, data: StoreData, folder: Path, params: FinetuneParams) -> FeatureCache:
    """Run ``cache_copies`` augmented copies of the train images and the plain val images through the backbone.

    Augmentation runs eagerly with the layers of :func:`build_augmentation`
    (seeded, ``training=True``); the backbone runs with ``predict_on_batch``
    (inference mode). Images are read in order, one batch at a time, and the
    features are streamed to ``.npy`` files in ``folder``.

    Args:
        backbone: The frozen backbone.
        data: The store.
        folder: Empty or new folder for the cache files.
        params: ``cache_copies``, ``batch_size``, ``augment`` and ``seed``.

    Returns:
        The cache.
    """
    start = time.perf_counter()
    folder.mkdir(parents=True, exist_ok=True)
    keras.utils.set_random_seed(params.seed)
    augmentation = build_augmentation(params.augment, params.seed)
    rows = len(data.train_labels)
    writers = open_writers(folder, "train", rows * params.cache_copies, backbone)
    for _ in range(params.cache_copies):
        for batch in store.iter_npy_batches(data.train_path, params.batch_size):
            pixels = augmentation(batch.astype("float32"), training=True)
            write_features(writers, backbone.predict_on_batch(keras.ops.convert_to_numpy(pixels)))
    val_writers = open_writers(folder, "val", len(data.val_labels), backbone)
    for batch in store.iter_npy_batches(data.val_path, params.batch_size):
        write_features(val_writers, backbone.predict_on_batch(batch.astype("float32")))
    for writer in [*writers.values(), *val_writers.values()]:
        writer.close()
    return FeatureCache(folder, params.cache_copies, rows, time.perf_counter() - start)


def report_epoch(kind: str, row: dict, total: int, on_epoch: EpochCallback | None) -> None:
    """Hand one epoch's row to ``on_epoch``, or print it on one line when there is no callback."""
    logs = {k: v for k, v in row.items() if k != "epoch"}
    if on_epoch is not None:
        on_epoch(kind, row["epoch"], logs)
        return
    print(f"[{kind}] epoch {row['epoch']}/{total} (phase {row['phase']}) {row['seconds']:.1f}s - "
          f"loss {row['loss']:.4f} - accuracy {row['accuracy']:.4f} - "
          f"val_loss {row['val_loss']:.4f} - val_accuracy {row['val_accuracy']:.4f}", flush=True)


def fit_epochs(model: keras.Model, make_batches: Callable[[int], ArrayBatches], val_batches: ArrayBatches,
               epochs: range, phase: int, kind: str, total: int, best: BestEpoch,
               on_epoch: EpochCallback | None) -> list[dict]:
    """Train one epoch per ``fit`` call, each with its own freshly ordered batches.

    One ``fit`` per epoch means no batch of epoch ``e + 1`` can be prefetched
    in the order of epoch ``e``, so runs are reproducible on every backend.

    Args:
        model: A compiled model.
        make_batches: Epoch index (0-based) -> that epoch's training batches.
        val_batches: Validation batches.
        epochs: 0-based epoch indices to run.
        phase: 1 (head) or 2 (unfrozen top layers).
        kind: Model kind, for reporting.
        total: Epochs in all phases, for reporting.
        best: Updated after every epoch.
        on_epoch: ``on_epoch(kind, epoch (1-based), logs)``, or None to print.

    Returns:
        One history row per epoch (:data:`HISTORY_COLUMNS`).
    """
    rows = []
    for epoch in epochs:
        start = time.perf_counter()
        result = model.fit(make_batches(epoch), validation_data=val_batches, epochs=1, shuffle=False, verbose=0)
        logs = {k: float(v[-1]) for k, v in result.history.items()}
        row = {"epoch": epoch + 1, "phase": phase, "loss": logs["loss"], "accuracy": logs["accuracy"],
               "val_loss": logs["val_loss"], "val_accuracy": logs["val_accuracy"],
               "seconds": time.perf_counter() - start}
        best.update(model, row)
        report_epoch(kind, row, total, on_epoch)
        rows.append(row)
    return rows


def image_batches(data: StoreData, params: FinetuneParams) -> tuple[Callable[[int], ArrayBatches], ArrayBatches]:
    """Return (epoch -> shuffled train batches, val batches), both reading the memory-mapped store."""
    train = np.load(data.train_path, mmap_mode="r")
    val = np.load(data.val_path, mmap_mode="r")
    rows = len(data.train_labels)

    def make(epoch: int) -> ArrayBatches:
        return ArrayBatches([train], data.train_labels, params.batch_size, epoch_order(rows, params.seed, epoch))

    return make, ArrayBatches([val], data.val_labels, params.batch_size)


def cache_batches(kind: str, cache: FeatureCache, data: StoreData,
                  params: FinetuneParams) -> tuple[Callable[[int], ArrayBatches], ArrayBatches]:
    """Return (epoch -> shuffled batches of copy ``epoch % copies``, val batches) of cached features."""
    def make(epoch: int) -> ArrayBatches:
        inputs = head_inputs(kind, *cache.train_features(epoch % cache.copies))
        return ArrayBatches(inputs, data.train_labels, params.batch_size, epoch_order(cache.rows, params.seed, epoch))

    return make, ArrayBatches(head_inputs(kind, *cache.val_features()), data.val_labels, params.batch_size)


def train_head_on_cache(kind: str, cache: FeatureCache, data: StoreData, params: FinetuneParams, best: BestEpoch,
                        on_epoch: EpochCallback | None = None) -> tuple[keras.Model, list[dict]]:
    """Train a head on cached features for ``params.epochs`` epochs; return it with the best weights restored."""
    final, mid = cache.val_features()
    head = build_head(kind, final.shape[1], mid.shape[1], len(data.classes), params)
    compile_model(head, params, params.learning_rate)
    make, val = cache_batches(kind, cache, data, params)
    total = params.epochs + (params.unfreeze_epochs if params.unfreeze_layers else 0)
    rows = fit_epochs(head, make, val, range(params.epochs), 1, kind, total, best, on_epoch)
    head.set_weights(best.weights)
    return head, rows


def unfreeze_top_layers(backbone: keras.Model, count: int) -> None:
    """Make the last ``count`` layers of ``backbone.layers`` trainable, BatchNormalization excepted."""
    backbone.trainable = True
    for index, layer in enumerate(backbone.layers):
        top = index >= len(backbone.layers) - count
        layer.trainable = top and not isinstance(layer, keras.layers.BatchNormalization)


def train_model(kind: str, data: StoreData, backbone: keras.Model, params: FinetuneParams,
                cache: FeatureCache | None, on_epoch: EpochCallback | None = None) -> tuple[keras.Model, pd.DataFrame]:
    """Train one model (phase 1 in the mode ``cache`` implies, then optional phase 2).

    Args:
        kind: A value of :data:`MODEL_KINDS`.
        data: The store.
        backbone: A frozen backbone; phase 2 changes its top layers, so give
            each model its own when ``params.unfreeze_layers`` is set.
        params: Training params.
        cache: Train the head on these features; end to end when None.
        on_epoch: See :func:`train_models`.

    Returns:
        The full image model holding the best epoch's weights, and its history.
    """
    keras.utils.set_random_seed(params.seed)
    best = BestEpoch(monitor=monitor_of(kind))
    n_classes, phase2 = len(data.classes), params.unfreeze_epochs if params.unfreeze_layers else 0
    if cache is not None:
        head, rows = train_head_on_cache(kind, cache, data, params, best, on_epoch)
        model = build_image_model(kind, backbone, data.image_size, n_classes, params, head=head)
        best.weights = model.get_weights()
    else:
        model = build_image_model(kind, backbone, data.image_size, n_classes, params)
        compile_model(model, params, params.learning_rate)
        make, val = image_batches(data, params)
        rows = fit_epochs(model, make, val, range(params.epochs), 1, kind, params.epochs + phase2, best, on_epoch)
    if phase2:
        unfreeze_top_layers(backbone, params.unfreeze_layers)
        compile_model(model, params, params.unfreeze_learning_rate)
        make, val = image_batches(data, params)
        epochs = range(params.epochs, params.epochs + phase2)
        rows += fit_epochs(model, make, val, epochs, 2, kind, params.epochs + phase2, best, on_epoch)
    model.set_weights(best.weights)
    backbone.trainable = False
    compile_model(model, params, params.learning_rate)
    model.optimizer.build(model.trainable_variables)  # saved with matching (fresh) optimizer state
    history = pd.DataFrame(rows, columns=list(HISTORY_COLUMNS))
    return model, history


TUNED_KIND = "finetuned"
TUNE_CACHE_FOLDER = "_tune_cache"
TTA_FLIPS = {"none": [], "horizontal": [(True, False)], "flips": [(True, False), (False, True), (True, True)]}


@dataclass(frozen=True)
class TuneCache:
    """Activations below the ``blocks`` fine-tuned blocks: ``copies`` augmented train copies, plain val.

    Files in ``folder``: ``train_cut.npy`` (float16, copy-major like
    :class:`FeatureCache`), ``train_mid.npy``, ``val_cut.npy``, ``val_mid.npy``.
    """

    folder: Path
    copies: int
    rows: int
    seconds: float
    blocks: int

    def train_inputs(self, copy: int) -> list[np.ndarray]:
        """(cut, mid) of one augmented copy of every training image, memory-mapped."""
        rows = slice(copy * self.rows, (copy + 1) * self.rows)
        return [np.load(self.folder / f"train_{k}.npy", mmap_mode="r")[rows] for k in ("cut", "mid")]

    def val_inputs(self) -> list[np.ndarray]:
        """(cut, mid) of the val images."""
        return [np.load(self.folder / f"val_{k}.npy") for k in ("cut", "mid")]


def augment_batch(augmentation: keras.Sequential, batch: np.ndarray, vertical: bool,
                  rng: np.random.Generator) -> np.ndarray:
    """The course's augmentation (``training=True``), plus a random upside-down flip when ``vertical``."""
    pixels = keras.ops.convert_to_numpy(augmentation(batch.astype("float32"), training=True))
    if vertical:
        flip = rng.random(len(pixels)) < 0.5
        pixels[flip] = pixels[flip, ::-1]
    return pixels


def compute_tune_cache(bottom: keras.Model, data: StoreData, folder: Path, params: FinetuneParams,
                       blocks: int) -> TuneCache:
    """Run ``finetuned_copies`` augmented copies of the train images and the val images through ``bottom``.

    The activations entering the fine-tuned blocks are stored as float16 (half
    the disk, well inside their range), the pooled mid-level tap as float32.
    """
    start = time.perf_counter()
    folder.mkdir(parents=True, exist_ok=True)
    keras.utils.set_random_seed(params.seed)
    augmentation = build_augmentation(params.finetuned_augmentation(), params.seed)
    rng = np.random.default_rng(params.seed)
    cut_shape = tuple(int(d) for d in bottom.output["cut"].shape[1:])
    mid_dim = int(bottom.output["mid"].shape[-1])
    rows, copies = len(data.train_labels), params.finetuned_copies

    def writers(split: str, count: int) -> dict[str, store.NpyWriter]:
        return {"cut": store.NpyWriter(folder / f"{split}_cut.npy", count, cut_shape, "float16"),
                "mid": store.NpyWriter(folder / f"{split}_mid.npy", count, (mid_dim,), "float32")}

    def write(out: dict[str, store.NpyWriter], pixels: np.ndarray) -> None:
        outputs = bottom.predict_on_batch(pixels)
        out["cut"].write(np.asarray(outputs["cut"], dtype=np.float16))
        out["mid"].write(np.asarray(outputs["mid"], dtype=np.float32))

    train = writers("train", rows * copies)
    for _ in range(copies):
        for batch in store.iter_npy_batches(data.train_path, params.batch_size):
            write(train, augment_batch(augmentation, batch, params.finetuned_vertical_flip, rng))
    val = writers("val", len(data.val_labels))
    for batch in store.iter_npy_batches(data.val_path, params.batch_size):
        write(val, batch.astype("float32"))
    for writer in [*train.values(), *val.values()]:
        writer.close()
    return TuneCache(folder, copies, rows, time.perf_counter() - start, blocks)


def build_tuned_head(final_dim: int, mid_dim: int, n_classes: int, params: FinetuneParams) -> keras.Model:
    """The finetuned model's head: final [+ mid] -> Dropout -> [Dense(units, relu)] -> Dense(softmax).

    Inputs are always ``[final, mid]`` (``mid`` unused unless ``finetuned_mid``).
    """
    final, mid = keras.Input((final_dim,), name="final"), keras.Input((mid_dim,), name="mid")
    x = keras.layers.Concatenate(name="final_mid")([final, mid]) if params.finetuned_mid else final
    if params.finetuned_dropout:
        x = keras.layers.Dropout(params.finetuned_dropout, seed=params.seed, name="dropout")(x)
    if params.finetuned_units:
        x = keras.layers.Dense(params.finetuned_units, activation="relu", name="hidden")(x)
    outputs = keras.layers.Dense(n_classes, activation="softmax", name="probs")(x)
    return keras.Model([final, mid], outputs, name="head")


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


def train_finetuned(data: StoreData, backbone_name: str, weights: str | None, params: FinetuneParams,
                    cache_folder: Path, on_epoch: EpochCallback | None = None
                    ) -> tuple[keras.Model, pd.DataFrame, TuneCache]:
    """Train the ``finetuned`` model: head first, then the top backbone blocks, on cached activations.

    1. The backbone is split below its last ``finetuned_blocks`` blocks, at
       most those above the mid-level tap (:func:`tlpipe.features.backbones.split_top_blocks`;
       the number used is ``tuned_blocks`` in the metrics);
       ``finetuned_copies`` augmented copies of the train images
       (:meth:`~tlpipe.core.params.FinetuneParams.finetuned_augmentation`) go through the frozen bottom once
       (:func:`compute_tune_cache`).
    2. Phase 1 (``finetuned_head_epochs``): only the head learns (the
       ``optimizer`` of every network, ``finetuned_head_learning_rate``), on the top's outputs.
    3. Phase 2 (``finetuned_epochs``): the top blocks learn too, at
       ``finetuned_learning_rate``; every BatchNormalization layer stays frozen,
       so it keeps using its ImageNet moving statistics (inference mode).
    4. The epoch with the lowest val loss (then higher val accuracy) is kept, and the
       saved model averages its probabilities over the ``finetuned_tta`` flips.

    Epoch ``e`` trains on augmented copy ``e % copies``, as the feature cache does.

    Returns:
        The image model, its history (:data:`HISTORY_COLUMNS`) and the cache.
    """
    from tlpipe.features.backbones import split_top_blocks, tunable_blocks

    keras.utils.set_random_seed(params.seed)
    backbone = build_backbone(backbone_name, weights, data.image_size)
    backbone.trainable = False
    blocks = min(params.finetuned_blocks, tunable_blocks(backbone))
    bottom, top = split_top_blocks(backbone, blocks)
    cache = compute_tune_cache(bottom, data, cache_folder, params, blocks)
    if on_epoch is None:
        print(f"tune cache: {cache.rows} images x {cache.copies} copies in {cache.seconds:.1f}s", flush=True)
    cut = keras.Input(tuple(int(d) for d in top.input.shape[1:]), name="cut")
    mid = keras.Input((int(bottom.output["mid"].shape[-1]),), name="mid")
    head = build_tuned_head(int(top.output.shape[-1]), int(mid.shape[-1]), len(data.classes), params)
    trainer = keras.Model([cut, mid], head([top(cut, training=False), mid]), name=f"{TUNED_KIND}_trainer")
    rows = len(data.train_labels)

    def make(epoch: int) -> ArrayBatches:
        return ArrayBatches(cache.train_inputs(epoch % cache.copies), data.train_labels, params.batch_size,
                            epoch_order(rows, params.seed, epoch))

    val = ArrayBatches(cache.val_inputs(), data.val_labels, params.batch_size)
    best, total = BestEpoch(monitor=monitor_of(TUNED_KIND)), params.finetuned_head_epochs + params.finetuned_epochs
    top.trainable = False
    compile_model(trainer, params, params.finetuned_head_learning_rate)
    history = fit_epochs(trainer, make, val, range(params.finetuned_head_epochs), 1, TUNED_KIND, total, best,
                         on_epoch)
    if params.finetuned_epochs:
        trainer.set_weights(best.weights)  # phase 2 starts from the best head
        top.trainable = True
        for layer in top.layers:
            if isinstance(layer, keras.layers.BatchNormalization):
                layer.trainable = False
        compile_model(trainer, params, params.finetuned_learning_rate)
        history += fit_epochs(trainer, make, val, range(params.finetuned_head_epochs, total), 2, TUNED_KIND,
                              total, best, on_epoch)
    trainer.set_weights(best.weights)
    model = build_tuned_image_model(backbone, head, data.image_size, params.finetuned_tta_flips())
    compile_model(model, params, params.finetuned_learning_rate)
    model.optimizer.build(model.trainable_variables)  # saved with matching (fresh) optimizer state
    return model, pd.DataFrame(history, columns=list(HISTORY_COLUMNS)), cache


def summarize(kind: str, history: pd.DataFrame, cache: FeatureCache | TuneCache | None, backbone_name: str,
              weights: str | None, data: StoreData, seconds: float) -> dict:
    """Build the metrics dict of one model."""
    best = replay_best(kind, history)  # the epoch whose weights were kept, by the kind's own monitor
    phase1, phase2 = history[history["phase"] == 1], history[history["phase"] == 2]
    return {
        "kind": kind,
        "mode": "tune_cache" if isinstance(cache, TuneCache) else "feature_cache" if cache else "end_to_end",
        "backbone": backbone_name, "weights": "none" if weights is None else str(weights),
        "epochs": int(len(history)), "best_epoch": best.epoch, "best_phase": best.phase,
        "best_val_accuracy": best.val_accuracy, "best_val_loss": best.val_loss,
        "train_seconds": round(seconds, 3), "seconds_per_epoch": round(float(phase1["seconds"].mean()), 3),
        "phase2_seconds_per_epoch": round(float(phase2["seconds"].mean()), 3) if len(phase2) else None,
        "cache_seconds": round(cache.seconds, 3) if cache else 0.0, "cache_copies": cache.copies if cache else 0,
        "train_images": int(len(data.train_labels)), "val_images": int(len(data.val_labels)),
        "classes": list(data.classes),
        **({"tuned_blocks": cache.blocks} if isinstance(cache, TuneCache) else {}),
    }


def plot_curves(history: pd.DataFrame, path: Path, title: str, kind: str, best_epoch: int | None = None) -> None:
    """Save the train-vs-val accuracy and loss figure of one network, best epoch marked.

    Drawn by :func:`tlpipe.render.plots.plot_training_curves` (the evaluate report's figure, for one model).
    """
    from tlpipe.render.plots import plot_training_curves

    plot_training_curves({kind: history}, {} if best_epoch is None else {kind: best_epoch}, path, title)


def write_outputs(folder: Path, kind: str, model: keras.Model, history: pd.DataFrame, metrics: dict) -> None:
    """Write ``<kind>.keras``, ``_history.csv``, ``_curves.png`` and ``_metrics.json`` into ``folder``."""
    model.save(folder / f"{kind}.keras")
    store.write_csv(folder / f"{kind}_history.csv", history)
    plot_curves(history, folder / f"{kind}_curves.png", f"{kind} ({metrics['mode']}): solid = train, dashed = "
                "validation, ★ = kept (best) epoch", kind, metrics.get("best_epoch"))
    store.write_json(folder / f"{kind}_metrics.json", metrics)


def train_models(store_dir: Path, out_dir: Path, kinds: Sequence[str], backbone_name: str, weights: str | None,
                 params: FinetuneParams, on_epoch: EpochCallback | None = None) -> dict[str, dict]:
    """Train the requested models on a store and publish them atomically at ``out_dir``.

    One frozen backbone serves every kind (each gets its own when phase 2
    unfreezes layers), and with ``params.feature_cache`` one cache does. Per kind,
    ``out_dir`` gets ``<kind>.keras`` (uint8 image in, probabilities out; load
    after ``import tlpipe.features.backbones``), ``<kind>_history.csv``,
    ``<kind>_curves.png`` and ``<kind>_metrics.json``.

    Args:
        store_dir: Image store (``train``/``val`` splits are used).
        out_dir: Output folder, replaced as a whole on success.
        kinds: Values of :data:`MODEL_KINDS`.
        backbone_name: Backbone name.
        weights: ``"imagenet"``, a weights file path, or None/``"none"`` (random).
        params: Training params.
        on_epoch: Called as ``on_epoch(kind, epoch, logs)`` after every epoch
            (``epoch`` 1-based; ``logs``: phase, loss, accuracy, val_loss,
            val_accuracy, seconds); when None each epoch is printed instead.

    Returns:
        ``{kind: metrics}`` as written to ``<kind>_metrics.json``.
    """
    kinds = check_kinds(kinds)
    check_weights(backbone_name, weights)
    data = load_store_data(Path(store_dir))
    staging = store.staging_dir(Path(out_dir))
    course = [kind for kind in kinds if kind != TUNED_KIND]
    try:
        cache = None
        shared = load_frozen_backbone(backbone_name, weights, data.image_size, params.seed) if course else None
        if params.feature_cache and course:
            cache = compute_feature_cache(shared, data, staging / CACHE_FOLDER, params)
            if on_epoch is None:
                print(f"feature cache: {cache.rows} images x {cache.copies} copies in {cache.seconds:.1f}s", flush=True)
        results = {}
        for kind in kinds:
            start = time.perf_counter()
            if kind == TUNED_KIND:
                model, history, tune_cache = train_finetuned(data, backbone_name, weights, params,
                                                             staging / TUNE_CACHE_FOLDER, on_epoch)
                results[kind] = summarize(kind, history, tune_cache, backbone_name, weights, data,
                                          time.perf_counter() - start)
                write_outputs(staging, kind, model, history, results[kind])
                shutil.rmtree(staging / TUNE_CACHE_FOLDER, ignore_errors=True)
                continue
            backbone = shared
            if params.unfreeze_layers and kind != course[0]:
                backbone = load_frozen_backbone(backbone_name, weights, data.image_size, params.seed)
            model, history = train_model(kind, data, backbone, params, cache, on_epoch)
            results[kind] = summarize(kind, history, cache, backbone_name, weights, data, time.perf_counter() - start)
            write_outputs(staging, kind, model, history, results[kind])
        shutil.rmtree(staging / CACHE_FOLDER, ignore_errors=True)
        store.publish_dir(staging, Path(out_dir))
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return results
