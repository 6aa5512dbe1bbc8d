"""Core of the ``features`` stage: stream the uint8 store through a pretrained backbone.

The extractor is one Keras model that takes uint8 images, casts them inside the
model and returns the backbone's pooled final and mid-level features (plus the
ImageNet probabilities when the backbone has a classifier). Batches are read
from the store in order, never shuffled, one batch in memory at a time, and the
outputs are streamed to ``.npy`` files aligned row for row with the manifest.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from tlpipe.core.params import FeaturesParams
from tlpipe.data import store
from tlpipe.ops.pause import pause_point

KINDS = ("final", "mid")
EXTRACTOR = "extractor.keras"  # the exact extractor used, so served SVMs see the same features


@dataclass(frozen=True)
class SplitTiming:
    """How long one split took."""

    split: str
    images: int
    seconds: float


def visible_accelerator() -> str | None:
    """Return 'gpu' when the active Keras backend sees a GPU, else None.

    Under TensorFlow this also turns on memory growth so TF does not grab the
    whole card.
    """
    import keras

    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        gpus = tf.config.list_physical_devices("GPU")
        for gpu in gpus:
            try:
                tf.config.experimental.set_memory_growth(gpu, True)
            except RuntimeError:  # already initialised
                pass
        return "gpu" if gpus else None
    if backend == "jax":
        import jax

        return "gpu" if any(d.platform == "gpu" for d in jax.devices()) else None
    if backend == "torch":
        import torch

        return "gpu" if torch.cuda.is_available() else None
    return None


def choose_precision(setting: str, accelerator: str | None) -> str:
    """Map the ``mixed_precision`` param to a Keras dtype policy name."""
    if setting == "auto":
        return "mixed_bfloat16" if accelerator == "gpu" else "float32"
    return {"off": "float32", "bfloat16": "mixed_bfloat16", "float16": "mixed_float16"}[setting]


def build_extractor(backbone: str, weights: str | None, image_size: int, include_top: bool):
    """A Keras model: uint8 (image_size, image_size, 3) -> {"final", "mid"[, "probs"]}, float32."""
    import keras

    from tlpipe.features.backbones import build_backbone

    inputs = keras.Input((image_size, image_size, 3), dtype="uint8", name="image")
    pixels = keras.ops.cast(inputs, "float32")
    net = build_backbone(backbone, weights, image_size, include_top=include_top)
    outputs = net(pixels, training=False)
    outputs = {k: keras.ops.cast(v, "float32") for k, v in outputs.items()}
    return keras.Model(inputs, outputs, name=f"{backbone}_extractor")


def normalise_weights(weights: str) -> str | None:
    """The ``features.weights`` param as the backbone builder takes it."""
    return None if weights.lower() == "none" else weights


def extract_split(
    model, images_path: Path, out_dir: Path, split: str, batch_size: int,
    progress: Callable[[Iterable, int], Iterable] = lambda it, total: it,
) -> tuple[SplitTiming, np.ndarray | None]:
    """Run one split through ``model`` and stream ``<split>_final.npy``/``<split>_mid.npy``.

    Returns:
        The timing and, when the model has an ImageNet head, the top-1 class
        index and probability per image as an (N, 2) array.
    """
    rows = store.npy_rows(images_path)
    dims = {k: int(model.output[k].shape[-1]) for k in KINDS}
    writers = {k: store.NpyWriter(out_dir / f"{split}_{k}.npy", rows, (dims[k],), "float32") for k in KINDS}
    top1 = [] if "probs" in model.output else None
    start = time.perf_counter()
    batches = store.iter_npy_batches(images_path, batch_size)
    for batch in progress(batches, (rows + batch_size - 1) // batch_size):
        outputs = model.predict_on_batch(batch)
        for kind in KINDS:
            writers[kind].write(np.asarray(outputs[kind], dtype=np.float32))
        if top1 is not None:
            probs = np.asarray(outputs["probs"])
            top1.append(np.stack([probs.argmax(1), probs.max(1)], axis=1))
    seconds = time.perf_counter() - start
    for writer in writers.values():
        writer.close()
    top = np.concatenate(top1) if top1 else (np.zeros((0, 2)) if top1 is not None else None)
    return SplitTiming(split, rows, seconds), top


def imagenet_table(manifest: pd.DataFrame, split: str, top1: np.ndarray) -> pd.DataFrame:
    """What the original ImageNet network thinks each image of ``split`` is."""
    from tlpipe.features.imagenet import load_class_names

    names = load_class_names()
    rows = manifest[manifest["split"] == split].sort_values("index")
    return pd.DataFrame({
        "index": rows["index"].to_numpy(),
        "relpath": rows["relpath"].to_numpy(),
        "class_name": rows["class_name"].to_numpy(),
        "imagenet_top1": [names[int(i)] for i in top1[:, 0]],
        "imagenet_probability": np.round(top1[:, 1].astype(float), 4),
    })


BATCHES_PER_TASK = 4  # inference batches per Dask task


def worker_extractor(path: str):
    """The extractor saved at ``path``, loaded once per Dask worker process (the latest one is kept)."""
    key = f"{path}:{os.stat(path).st_mtime_ns}"
    if key not in _WORKER_MODELS:
        _WORKER_MODELS.clear()
        import keras

        import tlpipe.features.backbones  # noqa: F401  (registers the custom layers load_model needs)

        visible_accelerator()
        _WORKER_MODELS[key] = keras.saving.load_model(path, compile=False)
    return _WORKER_MODELS[key]


_WORKER_MODELS: dict[str, object] = {}


def extract_rows(extractor_path: str, images_path: str, start: int, stop: int, batch_size: int,
                 outputs: dict[str, str], with_top1: bool) -> np.ndarray | None:
    """Dask task: rows ``start:stop`` of one split through the saved extractor, written in place.

    ``start`` is a multiple of ``batch_size``, so every batch holds the same images as on the local path.

    Returns:
        The (n, 2) top-1 ImageNet class and probability per row when ``with_top1``, else None.
    """
    model = worker_extractor(extractor_path)
    top1 = []
    rows = range(start, stop)
    batches = store.iter_npy_batches(Path(images_path), batch_size, rows)
    for offset, batch in zip(range(start, stop, batch_size), batches):
        result = model.predict_on_batch(batch)
        for kind in KINDS:
            store.write_rows_at(Path(outputs[kind]), offset, np.asarray(result[kind], dtype=np.float32))
        if with_top1:
            probs = np.asarray(result["probs"])
            top1.append(np.stack([probs.argmax(1), probs.max(1)], axis=1))
    return (np.concatenate(top1) if top1 else np.zeros((0, 2))) if with_top1 else None


def extract_on_dask(
    client, extractor_path: Path, model, store_dir: Path, out_dir: Path, batch_size: int,
    progress: Callable[[Iterable, int], Iterable] = lambda it, total: it,
) -> dict[str, tuple[SplitTiming, np.ndarray | None]]:
    """Every split through the saved extractor on a Dask cluster; workers write row blocks in place.

    The output files are allocated first (:func:`tlpipe.data.store.create_npy`), then each task fills
    ``BATCHES_PER_TASK`` batches of one split, so the files are byte-identical to :func:`extract_split`'s.
    A split's seconds are the wall time of the whole run shared out by its number of images.
    """
    from distributed import as_completed

    from tlpipe.ops.cluster import even_chunks

    dims = {k: int(model.output[k].shape[-1]) for k in KINDS}
    with_top1 = "probs" in model.output
    counts, submitted = {}, []
    start = time.perf_counter()
    for split in store.SPLITS:
        images = store.split_path(store_dir, split)
        counts[split] = store.npy_rows(images)
        outputs = {k: str(out_dir / f"{split}_{k}.npy") for k in KINDS}
        for kind in KINDS:
            store.create_npy(Path(outputs[kind]), counts[split], (dims[kind],), "float32")
        for chunk in even_chunks(counts[split], batch_size * BATCHES_PER_TASK, align=batch_size):
            future = client.submit(extract_rows, str(extractor_path), str(images), chunk.start, chunk.stop,
                                   batch_size, outputs, with_top1, pure=False)
            submitted.append((split, future))
    index = {future.key: i for i, (_, future) in enumerate(submitted)}
    results: list[np.ndarray | None] = [None] * len(submitted)
    for future in progress(as_completed([f for _, f in submitted]), len(submitted)):
        results[index[future.key]] = future.result()
        future.release()
    seconds = time.perf_counter() - start
    total = sum(counts.values()) or 1
    done = {}
    for split in store.SPLITS:
        parts = [r for (s, _), r in zip(submitted, results) if s == split]
        top1 = (np.concatenate(parts) if parts else np.zeros((0, 2))) if with_top1 else None
        done[split] = (SplitTiming(split, counts[split], seconds * counts[split] / total), top1)
    return done


def extract_features(
    store_dir: Path, out_dir: Path, params: FeaturesParams,
    progress: Callable[[Iterable, int], Iterable] = lambda it, total: it,
    client=None,
) -> dict:
    """Extract pooled final and mid-level features for every split of a store.

    Writes into a staging folder published atomically at ``out_dir``:
    ``<split>_final.npy``, ``<split>_mid.npy``, ``meta.json``, the extractor
    model (``extractor.keras``) and, with an ImageNet head, ``imagenet_top1.csv``
    for the test split.

    With ``params.dask`` (or ``$TLPIPE_DASK_SCHEDULER``), or a ``distributed.Client`` as
    ``client``, the extractor is saved first and the splits run on that Dask cluster
    (:func:`extract_on_dask`); the feature files are byte-identical to the local path's.

    Returns:
        The metadata: backbone, dims, per-split counts, images/s, precision.
    """
    if client is None:
        from tlpipe.ops.cluster import stage_cluster

        with stage_cluster("features", params.dask) as dask:
            if dask is not None:
                return extract_features(store_dir, out_dir, params, progress, client=dask)
    import keras

    from tlpipe.features.backbones import check_weights, get_spec

    store_dir, out_dir = Path(store_dir), Path(out_dir)
    image_size = store.image_size(store_dir)
    spec = get_spec(params.backbone)
    weights = normalise_weights(params.weights)
    include_top = spec.has_classifier and image_size == spec.default_size
    check_weights(params.backbone, weights, include_top=include_top)
    accelerator = visible_accelerator()
    precision = choose_precision(params.mixed_precision, accelerator)
    keras.config.set_dtype_policy(precision)
    model = build_extractor(params.backbone, weights, image_size, include_top)
    staging = store.staging_dir(out_dir)
    try:
        pause_point("features.extracting")  # a fault test kills the stage here (tests/e2e/test_faults.py)
        timings, tables = [], []
        manifest = store.load_manifest(store_dir)
        if client is not None:
            model.save(staging / EXTRACTOR)  # the workers load exactly this model
            on_dask = extract_on_dask(client, staging / EXTRACTOR, model, store_dir, staging, params.batch_size,
                                      progress)
        for split in store.SPLITS:
            timing, top1 = on_dask[split] if client is not None else extract_split(
                model, store.split_path(store_dir, split), staging, split, params.batch_size, progress)
            timings.append(timing)
            if top1 is not None and split == "test":
                tables.append(imagenet_table(manifest, split, top1))
        if tables:
            store.write_csv(staging / "imagenet_top1.csv", tables[0])
        images = sum(t.images for t in timings)
        seconds = sum(t.seconds for t in timings)
        meta = {
            "backbone": params.backbone, "weights": params.weights, "image_size": int(image_size),
            "final_dim": int(model.output["final"].shape[-1]), "mid_dim": int(model.output["mid"].shape[-1]),
            "mid_layer": spec.mid_layer, "counts": {t.split: t.images for t in timings},
            "images_per_second": round(images / seconds, 2) if seconds else 0.0,
            "seconds": round(seconds, 3), "precision": precision, "device": accelerator or "cpu",
            "keras_backend": keras.backend.backend(), "batch_size": params.batch_size,
            "imagenet_top1": bool(tables),
        }
        store.write_json(staging / "meta.json", meta)
        if client is None:
            model.save(staging / EXTRACTOR)
        store.publish_dir(staging, out_dir)
    except BaseException:
        import shutil

        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        keras.config.set_dtype_policy("float32")
    return meta


def load_features(features_dir: Path, split: str, kind: str = "final") -> np.ndarray:
    """Load one split's features: kind 'final', 'mid' or 'concat' (final then mid)."""
    features_dir = Path(features_dir)
    if kind == "concat":
        return np.concatenate([load_features(features_dir, split, "final"),
                               load_features(features_dir, split, "mid")], axis=1)
    return np.load(features_dir / f"{split}_{kind}.npy")


def tf_log_level() -> None:
    """Quiet TensorFlow's C++ start-up chatter unless the user asked for it."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
