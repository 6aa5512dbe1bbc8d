"""Tests for the finetune core: real Keras training on a tiny store, random backbone weights."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import keras
import numpy as np
import pandas as pd
import pytest

import tlpipe.features.backbones  # noqa: F401  (registers the custom layer for load_model)
from tlpipe.core.params import AugmentParams, FinetuneParams
from tlpipe.data import store
from tlpipe.features.backbones import build_backbone
from tlpipe.train.networks import caches, fitting, layers, training
from tlpipe.train.networks import data as network_data

SIZE = 32
BACKBONE = "efficientnet_lite0"
COUNTS = {"train": 12, "val": 4, "test": 2}  # per class
MODES = {"end_to_end": False, "feature_cache": True}
COURSE_KINDS = ("frozen", "concat")  # the course's two models; the finetuned model has its own tests below


def make_images(label: int, count: int, rng: np.random.Generator) -> np.ndarray:
    """Dark (label 0) or bright (label 1) noisy uint8 images."""
    low, high = (20, 60) if label == 0 else (190, 230)
    return rng.integers(low, high, (count, SIZE, SIZE, 3), dtype=np.uint8)


def write_store(folder: Path) -> Path:
    """Write a two-class store (dark vs bright images) in the layout of :mod:`tlpipe.data.store`."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    records = []
    for split, count in COUNTS.items():
        labels = np.repeat([0, 1], count)
        with store.NpyWriter(store.split_path(folder, split), len(labels), (SIZE, SIZE, 3)) as writer:
            for index, label in enumerate(labels):
                writer.write(make_images(int(label), 1, rng)[0])
                records.append({"split": split, "index": index, "relpath": f"{split}/{index}.png",
                                "class_name": ["dark", "bright"][label], "label": int(label),
                                "sha256": f"{split}{index}", "width": SIZE, "height": SIZE, "mode": "RGB"})
    store.write_csv(folder / store.MANIFEST, pd.DataFrame(records))
    store.write_json(folder / store.CLASSES, ["dark", "bright"])
    return folder


def tiny_params(**changes: object) -> FinetuneParams:
    """Small, fast training params."""
    base = {"batch_size": 8, "epochs": 2, "frozen_units": 32, "concat_units": 32, "cache_copies": 2}
    return FinetuneParams(**{**base, **changes})


def backbone_of(model: keras.Model) -> keras.Model:
    """The backbone sub-model of a full image model."""
    return model.get_layer("efficientnet_lite0_backbone")


def all_weights(model: keras.Model) -> list[np.ndarray]:
    """Every weight of a model (BatchNorm moving statistics included) as numpy arrays."""
    return [np.array(w) for w in model.get_weights()]


def calibrate_batchnorm(backbone: keras.Model) -> None:
    """Set BatchNorm moving statistics to the batch statistics of one pass over fixture-like images.

    A randomly initialised EfficientNet-Lite0 in inference mode shrinks its
    features to ~1e-13; calibrated statistics keep them of order one, so the
    head has something to learn from.
    """
    norms = [layer for layer in backbone.layers if isinstance(layer, keras.layers.BatchNormalization)]
    rng = np.random.default_rng(1)
    images = np.concatenate([make_images(label, 16, rng) for label in (0, 1)]).astype("float32")
    for layer in norms:
        layer.momentum = 0.0
    backbone(images, training=True)
    for layer in norms:
        layer.momentum = 0.99


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_store(tmp_path_factory.mktemp("ft") / "store")


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-init backbone saved to a weights file, so every build starts from the same weights."""
    keras.utils.set_random_seed(1)
    path = tmp_path_factory.mktemp("weights") / "lite0.weights.h5"
    calibrate_batchnorm(backbone := build_backbone(BACKBONE, None, SIZE))
    backbone.save_weights(path)
    return path


@pytest.fixture(scope="module")
def runs(store_dir: Path, weights_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """Train both kinds in both modes; keep the in-memory models and the epoch callbacks."""
    results = {}
    for mode, cached in MODES.items():
        models, epochs = {}, []
        original = training.write_outputs

        def capture(folder: Path, kind: str, model: keras.Model, *args: object) -> None:
            models[kind] = model
            original(folder, kind, model, *args)

        out = tmp_path_factory.mktemp(mode) / "models"
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(training, "write_outputs", capture)
            metrics = training.train_models(store_dir, out, COURSE_KINDS, BACKBONE, str(weights_file),
                                            tiny_params(feature_cache=cached),
                                            on_epoch=lambda kind, epoch, logs: epochs.append((kind, epoch, logs)))
        loaded = {kind: keras.saving.load_model(out / f"{kind}.keras") for kind in COURSE_KINDS}
        results[mode] = {"out": out, "metrics": metrics, "models": models, "loaded": loaded, "epochs": epochs}
    yield results


@pytest.fixture(scope="module")
def cache(store_dir: Path, weights_file: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple:
    """(data, frozen backbone, feature cache with 2 copies) of the tiny store."""
    data = network_data.load_store_data(store_dir)
    backbone = layers.load_frozen_backbone(BACKBONE, str(weights_file), SIZE, seed=0)
    return data, backbone, caches.compute_feature_cache(backbone, data, tmp_path_factory.mktemp("cache"),
                                                          tiny_params())


def predict(model: keras.Model, inputs: object) -> np.ndarray:
    """Inference-mode outputs of an eager call (cheaper than tracing ``predict`` for a few rows)."""
    return keras.ops.convert_to_numpy(model(inputs, training=False))


@pytest.mark.parametrize("mode", MODES)
def test_outputs_and_metrics(runs: dict, mode: str) -> None:
    run = runs[mode]
    for kind in COURSE_KINDS:
        for suffix in (".keras", "_history.csv", "_curves.png", "_metrics.json"):
            assert (run["out"] / f"{kind}{suffix}").is_file()
        history = pd.read_csv(run["out"] / f"{kind}_history.csv")
        assert list(history.columns) == list(network_data.HISTORY_COLUMNS)
        assert history["epoch"].tolist() == [1, 2] and set(history["phase"]) == {1}
        metrics = run["metrics"][kind]
        assert metrics["mode"] == mode and metrics["best_epoch"] in (1, 2)
        assert metrics["best_val_accuracy"] == history["val_accuracy"].max()
        assert (metrics["cache_seconds"] > 0) == (mode == "feature_cache")
    assert [(k, e) for k, e, _ in run["epochs"]] == [("frozen", 1), ("frozen", 2), ("concat", 1), ("concat", 2)]
    assert set(run["epochs"][0][2]) == {"phase", "loss", "accuracy", "val_loss", "val_accuracy", "seconds"}
    assert not list(run["out"].parent.glob(".*tmp*"))  # staging published, cache removed
    assert not (run["out"] / caches.CACHE_FOLDER).exists()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kind", COURSE_KINDS)
def test_saved_model_predicts_like_in_memory(runs: dict, store_dir: Path, mode: str, kind: str) -> None:
    images, _ = store.load_split(store_dir, "test")
    loaded = runs[mode]["loaded"][kind]
    assert loaded.input.dtype == "uint8"
    want = predict(runs[mode]["models"][kind], images)
    np.testing.assert_array_equal(predict(loaded, images), want)
    np.testing.assert_allclose(want.sum(axis=1), 1.0, rtol=1e-5)
    assert not np.allclose(want[:, 0], want[0, 0])  # features reach the head: outputs vary by image


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kind", COURSE_KINDS)
def test_saved_model_holds_best_epoch(runs: dict, store_dir: Path, mode: str, kind: str) -> None:
    """The saved model scores the best epoch's val accuracy and loss on the val images."""
    images, labels = store.load_split(store_dir, "val")
    probs = predict(runs[mode]["loaded"][kind], images)
    metrics = runs[mode]["metrics"][kind]
    assert (probs.argmax(axis=1) == labels).mean() == pytest.approx(metrics["best_val_accuracy"])
    loss = -np.log(probs[np.arange(len(labels)), labels]).mean()
    assert loss == pytest.approx(metrics["best_val_loss"], rel=1e-4)


def test_best_epoch_breaks_accuracy_ties_on_val_loss_then_earliest() -> None:
    model = keras.Sequential([keras.Input((1,)), keras.layers.Dense(1)])
    best = fitting.BestEpoch()
    rows = [(0.5, 0.9), (0.7, 0.6), (0.7, 0.4), (0.7, 0.4), (0.7, 0.5), (0.6, 0.1)]
    for epoch, (accuracy, loss) in enumerate(rows, start=1):
        model.layers[0].kernel.assign([[float(epoch)]])
        best.update(model, {"epoch": epoch, "phase": 1, "val_accuracy": accuracy, "val_loss": loss})
    assert (best.epoch, best.val_accuracy, best.val_loss) == (3, 0.7, 0.4)
    assert best.weights[0][0, 0] == 3.0
    # the finetuned model monitors val loss (ties: higher accuracy, then earliest)
    by_loss = fitting.BestEpoch(monitor="val_loss")
    for epoch, (accuracy, loss) in enumerate([(1.0, 0.3), (0.9, 0.2), (0.95, 0.2), (0.97, 0.2)], start=1):
        model.layers[0].kernel.assign([[float(epoch)]])
        by_loss.update(model, {"epoch": epoch, "phase": 1, "val_accuracy": accuracy, "val_loss": loss})
    assert (by_loss.epoch, by_loss.val_accuracy, by_loss.val_loss) == (4, 0.97, 0.2)


@pytest.mark.parametrize(("kind", "kept"), [("frozen", 1), ("concat", 1), (layers.TUNED_KIND, 2)])
def test_summary_reports_the_epoch_whose_weights_are_kept(store_dir: Path, kind: str, kept: int) -> None:
    """Epoch 1 has the best val accuracy, epoch 2 the lowest val loss: the course's models keep epoch 1,
    the finetuned model (monitoring val loss) keeps epoch 2, and the summary (gate score, logged step,
    curves' star) must name the same epoch and its val accuracy."""
    history = pd.DataFrame([(1, 1, 0.5, 0.9, 0.9, 1.0, 1.0), (2, 1, 0.4, 0.8, 0.3, 0.9, 1.0),
                            (3, 2, 0.3, 0.9, 0.6, 0.8, 1.0)], columns=list(network_data.HISTORY_COLUMNS))
    model = keras.Sequential([keras.Input((1,)), keras.layers.Dense(1)])
    best = fitting.BestEpoch(monitor="val_loss" if kind == layers.TUNED_KIND else "val_accuracy")
    for row in history.to_dict("records"):
        best.update(model, row)
    assert best.epoch == kept
    metrics = training.summarize(kind, history, None, BACKBONE, None, network_data.load_store_data(store_dir), 1.0)
    assert (metrics["best_epoch"], metrics["best_phase"]) == (kept, 1)
    assert (metrics["best_val_accuracy"], metrics["best_val_loss"]) == (best.val_accuracy, best.val_loss)


@pytest.mark.parametrize("mode", MODES)
def test_backbone_and_batchnorm_stats_unchanged(runs: dict, weights_file: Path, mode: str) -> None:
    reference = build_backbone(BACKBONE, str(weights_file), SIZE)
    assert any("moving_mean" in w.path for w in reference.weights)
    for kind in COURSE_KINDS:
        loaded = runs[mode]["loaded"][kind]
        assert not backbone_of(loaded).trainable
        for got, want in zip(all_weights(backbone_of(loaded)), all_weights(reference), strict=True):
            np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("mode", MODES)
def test_same_seed_same_history(runs: dict, store_dir: Path, weights_file: Path, tmp_path: Path, mode: str) -> None:
    """Concat alone (second in the fixture run) repeats the fixture's history and weights exactly."""
    first = runs[mode]["out"]
    training.train_models(store_dir, tmp_path / "again", ["concat"], BACKBONE, str(weights_file),
                          tiny_params(feature_cache=MODES[mode]), on_epoch=lambda *a: None)
    columns = [c for c in network_data.HISTORY_COLUMNS if c != "seconds"]
    want = pd.read_csv(first / "concat_history.csv")[columns]
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "again" / "concat_history.csv")[columns], want)
    again = keras.saving.load_model(tmp_path / "again" / "concat.keras")
    for got, ref in zip(all_weights(again), all_weights(runs[mode]["models"]["concat"]), strict=True):
        np.testing.assert_array_equal(got, ref)


@pytest.mark.parametrize("kind", COURSE_KINDS)
def test_cached_head_equals_full_model_on_val(cache: tuple, kind: str) -> None:
    data, backbone, features = cache
    params = tiny_params()
    copy0, copy1 = features.train_arrays(0)[0], features.train_arrays(1)[0]
    assert copy0.shape == (features.rows, 1280) and not np.allclose(copy0, copy1, rtol=1e-3, atol=0)
    head, rows = fitting.train_head_on_cache(kind, features, data, params, fitting.BestEpoch(), lambda *a: None)
    assert len(rows) == params.epochs
    model = layers.build_image_model(kind, backbone, SIZE, 2, params, head=head)
    val_inputs = layers.head_inputs(kind, *features.val_arrays())
    want = predict(head, val_inputs[0] if kind == "frozen" else val_inputs)
    np.testing.assert_allclose(predict(model, np.load(data.val_path)), want, rtol=1e-3, atol=1e-5)


def test_loss_decreases_on_separable_data(cache: tuple) -> None:
    data, _, features = cache
    params = tiny_params(epochs=6, learning_rate=3e-3)
    _, rows = fitting.train_head_on_cache("frozen", features, data, params, fitting.BestEpoch(), lambda *a: None)
    losses = [row["loss"] for row in rows]
    assert losses[-1] < losses[0]
    # 8 val images make val accuracy too coarse to threshold; training accuracy must not get worse
    assert rows[-1]["accuracy"] >= rows[0]["accuracy"]


@pytest.mark.slow
def test_phase2_continues_history_and_keeps_batchnorm(store_dir: Path, weights_file: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    params = tiny_params(epochs=1, unfreeze_layers=8, unfreeze_epochs=2)
    metrics = training.train_models(store_dir, tmp_path / "out", ["frozen"], BACKBONE, str(weights_file), params)
    assert capsys.readouterr().out.count("[frozen] epoch") == 3  # no callback: one printed line per epoch
    history = pd.read_csv(tmp_path / "out" / "frozen_history.csv")
    assert history["phase"].tolist() == [1, 2, 2] and history["epoch"].tolist() == [1, 2, 3]
    assert metrics["frozen"]["phase2_seconds_per_epoch"] > 0
    loaded = backbone_of(keras.saving.load_model(tmp_path / "out" / "frozen.keras"))
    reference = build_backbone(BACKBONE, str(weights_file), SIZE)
    for got, want in zip(loaded.weights, reference.weights, strict=True):
        if "moving_" in want.path:
            np.testing.assert_array_equal(np.array(got), np.array(want))


def test_unfreeze_top_layers_skips_batchnorm(weights_file: Path) -> None:
    backbone = layers.load_frozen_backbone(BACKBONE, str(weights_file), SIZE, seed=0)
    layers.unfreeze_top_layers(backbone, 6)
    trainable = {layer.name for layer in backbone.layers if layer.trainable and layer.weights}
    assert "head_conv" in trainable and "head_bn" not in trainable
    assert not any(isinstance(backbone.get_layer(n), keras.layers.BatchNormalization) for n in trainable)
    assert not backbone.get_layer("stem_conv").trainable


def test_array_batches_shuffle_each_epoch_and_cover_all_rows() -> None:
    data = np.arange(10)[:, None]
    labels = np.eye(2, dtype="float32")[np.arange(10) % 2]
    orders = []
    for epoch in range(2):
        batches = network_data.ArrayBatches([data], labels, 4, network_data.epoch_order(10, 42, epoch))
        assert len(batches) == 3
        rows = np.concatenate([batches[i][0][:, 0] for i in range(len(batches))])
        assert sorted(rows) == list(range(10))
        orders.append(rows)
    assert not np.array_equal(*orders)
    np.testing.assert_array_equal(network_data.epoch_order(10, 42, 1), network_data.epoch_order(10, 42, 1))


def test_augmentation_only_in_training() -> None:
    augmentation = layers.build_augmentation(AugmentParams(), seed=0)
    assert [layer.name for layer in augmentation.layers] == [
        "rotation", "translation", "shear", "zoom", "flip", "to_unit", "noise", "to_pixels"]
    images = np.random.default_rng(0).uniform(0, 255, (2, SIZE, SIZE, 3)).astype("float32")
    np.testing.assert_allclose(keras.ops.convert_to_numpy(augmentation(images, training=False)), images, rtol=1e-5)
    assert not np.allclose(keras.ops.convert_to_numpy(augmentation(images, training=True)), images)
    none = AugmentParams(rotation_degrees=0, width_shift=0, height_shift=0, shear=0, zoom=0,
                         horizontal_flip=False, noise_stddev=0)
    assert [layer.name for layer in layers.build_augmentation(none, seed=0).layers] == ["identity"]


def test_bad_kinds_rejected(store_dir: Path, tmp_path: Path) -> None:
    for kinds in ([], ["frozen", "frozen"], ["linear"]):
        with pytest.raises(ValueError, match="kinds"):
            training.train_models(store_dir, tmp_path / "out", kinds, BACKBONE, None, tiny_params())
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- the finetuned model (beyond the course)

def tuned_params(**changes: object) -> FinetuneParams:
    """Tiny params of the finetuned model: 2 head epochs, 2 epochs on the top 2 blocks."""
    base = {"batch_size": 8, "finetuned_copies": 2, "finetuned_head_epochs": 2, "finetuned_epochs": 2,
            "finetuned_blocks": 2, "finetuned_head_learning_rate": 3e-3, "finetuned_learning_rate": 1e-3}
    return FinetuneParams(**{**base, **changes})


@pytest.fixture(scope="module")
def tuned(store_dir: Path, weights_file: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The finetuned model trained alone (flip TTA on), its metrics, epochs and the saved file."""
    out, epochs = tmp_path_factory.mktemp("tuned") / "models", []
    metrics = training.train_models(store_dir, out, [layers.TUNED_KIND], BACKBONE, str(weights_file),
                                    tuned_params(finetuned_tta="flips", finetuned_mid=True, finetuned_units=8,
                                                 finetuned_vertical_flip=True),
                                    on_epoch=lambda kind, epoch, logs: epochs.append((kind, epoch, logs["phase"])))
    return {"out": out, "metrics": metrics[layers.TUNED_KIND], "epochs": epochs,
            "model": keras.saving.load_model(out / f"{layers.TUNED_KIND}.keras")}


def test_tuned_model_outputs_history_and_best_epoch(tuned: dict, store_dir: Path) -> None:
    kind = layers.TUNED_KIND
    for suffix in (".keras", "_history.csv", "_curves.png", "_metrics.json"):
        assert (tuned["out"] / f"{kind}{suffix}").is_file()
    assert not (tuned["out"] / caches.TUNE_CACHE_FOLDER).exists()
    history = pd.read_csv(tuned["out"] / f"{kind}_history.csv")
    assert history["phase"].tolist() == [1, 1, 2, 2] and history["epoch"].tolist() == [1, 2, 3, 4]
    assert tuned["epochs"] == [(kind, 1, 1), (kind, 2, 1), (kind, 3, 2), (kind, 4, 2)]
    metrics = tuned["metrics"]
    assert metrics["mode"] == "tune_cache" and metrics["cache_copies"] == 2 and metrics["cache_seconds"] > 0
    assert metrics["tuned_blocks"] == 2
    images, labels = store.load_split(store_dir, "val")
    np.testing.assert_allclose(predict(tuned["model"], images).sum(axis=1), 1.0, rtol=1e-5)
    # the best epoch is chosen without TTA: the same network without the flipped views scores it
    plain = layers.build_tuned_image_model(backbone_of(tuned["model"]), tuned["model"].get_layer("head"), SIZE,
                                             "none")
    probs = predict(plain, images)
    assert (probs.argmax(axis=1) == labels).mean() == pytest.approx(metrics["best_val_accuracy"])
    loss = -np.log(probs[np.arange(len(labels)), labels]).mean()
    assert loss == pytest.approx(metrics["best_val_loss"], rel=1e-3)


def test_tuned_model_averages_flipped_views(tuned: dict, store_dir: Path) -> None:
    """TTA is inside the saved model: flipping the input only reorders the views it averages."""
    model = tuned["model"]
    assert [layer.name for layer in model.layers if isinstance(layer, tlpipe.features.backbones.FlipImages)] == [
        "flip_h", "flip_v", "flip_hv"]
    images, _ = store.load_split(store_dir, "test")
    np.testing.assert_allclose(predict(model, images[:, :, ::-1]), predict(model, images), rtol=1e-4, atol=1e-6)


def changed_layers(backbone: keras.Model, reference: keras.Model) -> set[str]:
    """Block names (``block14``, ``head``...) whose weights differ; BatchNorm must not have changed at all."""
    changed = set()
    for got, want in zip(backbone.weights, reference.weights, strict=True):
        if "moving_" in want.path or "/gamma" in want.path or "/beta" in want.path:
            np.testing.assert_array_equal(np.array(got), np.array(want))  # BatchNorm frozen
        elif not np.array_equal(np.array(got), np.array(want)):
            changed.add(want.path.split("/")[0].split("_")[0])
    return changed


def test_tuned_model_changes_only_top_blocks_and_keeps_batchnorm(tuned: dict, weights_file: Path) -> None:
    reference = build_backbone(BACKBONE, str(weights_file), SIZE)
    changed = changed_layers(backbone_of(tuned["model"]), reference)
    if tuned["metrics"]["best_phase"] == 2:
        assert changed and changed <= {"block14", "block15", "head"}, changed  # the top 2 blocks and the head conv
    else:  # the best epoch was a head-only one: the backbone is the pretrained one
        assert changed == set()


def test_phase2_trains_the_top_blocks_only(store_dir: Path, weights_file: Path, tmp_path: Path) -> None:
    """Forcing phase 2 to win (no head epochs to speak of, then a step that learns): top kernels move, nothing
    else. At 1e-4 phase 2's val loss falls steadily (0.87 in phase 1, then 0.50, 0.24, 0.22); at 1e-3 the
    first phase-2 epoch diverged (train loss 30) and which phase won depended on the run."""
    params = tuned_params(finetuned_head_epochs=1, finetuned_head_learning_rate=1e-6, finetuned_epochs=3,
                          finetuned_learning_rate=1e-4, finetuned_tta="none")
    data = network_data.load_store_data(store_dir)
    model, history, _ = fitting.train_finetuned(data, BACKBONE, str(weights_file), params, tmp_path / "cache",
                                                 on_epoch=lambda *a: None)
    assert history["phase"].tolist() == [1, 2, 2, 2]
    changed = changed_layers(backbone_of(model), build_backbone(BACKBONE, str(weights_file), SIZE))
    best_phase = int(history.sort_values(["val_loss", "val_accuracy"], ascending=[True, False]).iloc[0]["phase"])
    assert best_phase == 2 and changed and changed <= {"block14", "block15", "head"}, (best_phase, changed)


def test_tuned_cache_reproduces_the_backbone(store_dir: Path, weights_file: Path, tmp_path: Path) -> None:
    """Bottom + top on the cached activations give the backbone's own features (float16 cache)."""
    data = network_data.load_store_data(store_dir)
    backbone = build_backbone(BACKBONE, str(weights_file), SIZE)
    bottom, top = tlpipe.features.backbones.split_top_blocks(backbone, 2)
    cache = caches.compute_tune_cache(bottom, data, tmp_path / "cache", tuned_params(), 2)
    cut, mid = cache.val_arrays()
    assert cut.dtype == np.float16 and cache.train_arrays(1)[0].shape == (cache.rows, *cut.shape[1:])
    want = backbone.predict(np.load(data.val_path).astype("float32"), verbose=0)
    np.testing.assert_allclose(mid, want["mid"], rtol=1e-5, atol=1e-6)
    got = top.predict(cut.astype("float32"), verbose=0)
    np.testing.assert_allclose(got, want["final"], rtol=2e-2, atol=1e-3 * np.abs(want["final"]).max())
    assert tlpipe.features.backbones.tunable_blocks(backbone) == 10  # Lite0: blocks 6..15, above the tap in block 5
    with pytest.raises(ValueError, match="blocks to fine-tune must be 1..10"):
        tlpipe.features.backbones.split_top_blocks(backbone, 11)


def test_tuned_blocks_are_capped_at_the_tunable_ones(store_dir: Path, weights_file: Path, tmp_path: Path) -> None:
    params = tuned_params(finetuned_blocks=99, finetuned_head_epochs=1, finetuned_epochs=0, finetuned_copies=1)
    model, history, cache = fitting.train_finetuned(network_data.load_store_data(store_dir), BACKBONE,
                                                     str(weights_file), params, tmp_path / "cache",
                                                     on_epoch=lambda *a: None)
    assert cache.blocks == 10 and history["phase"].tolist() == [1]


def test_tune_augmentation_mirrors_only_unless_course() -> None:
    flips = layers.build_augmentation(tuned_params().finetuned_augmentation(), seed=0)
    assert [layer.name for layer in flips.layers] == ["flip"]
    course = tuned_params(finetuned_augment="course").finetuned_augmentation()
    assert course == tuned_params().augment


def test_auto_tta_averages_over_the_training_flips() -> None:
    assert tuned_params(finetuned_tta="auto").finetuned_tta_flips() == "horizontal"
    assert tuned_params(finetuned_tta="auto", finetuned_vertical_flip=True).finetuned_tta_flips() == "flips"
    assert tuned_params(finetuned_tta="none", finetuned_vertical_flip=True).finetuned_tta_flips() == "none"
    assert [flips for flips in layers.TTA_FLIPS["flips"]] == [(True, False), (False, True), (True, True)]
