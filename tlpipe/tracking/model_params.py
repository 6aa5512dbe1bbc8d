"""What a model run records as params: the keys every model shares, then the SVM's or the network's own."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

NETWORK_INPUTS = {"frozen": "final", "concat": "concat", "finetuned": "final"}
"""The backbone output each network's head reads (the SVMs': :data:`tlpipe.core.names.SVM_MODELS`)."""


def common_model_params(name: str, params, data_hash: str, classes: list[str], image_size: int) -> dict[str, Any]:
    """Params every model run records under the same keys, so the runs compare side by side.

    Keys: ``model``, ``family`` (svm/network), ``model_kind`` (linear_svm/dense_head),
    ``input`` (final/concat/pixels), ``backbone``, ``weights``, ``mid_layer`` (the tap,
    where the input uses it), ``image_size``, ``resize_mode``, ``data_hash``,
    ``classes``, ``n_classes``; the family builders add ``seed`` and ``n_train``.
    """
    from tlpipe.core.names import SVM_MODELS, model_family
    from tlpipe.features.backbones.common import get_spec

    family = model_family(name)
    source = SVM_MODELS[name] if family == "svm" else NETWORK_INPUTS[name]
    uses_backbone = source != "pixels"
    return {
        "model": name, "family": family, "model_kind": "linear_svm" if family == "svm" else "dense_head",
        "input": source,
        "backbone": params.features.backbone if uses_backbone else "none",
        "weights": str(params.features.weights) if uses_backbone else "none",
        "mid_layer": get_spec(params.features.backbone).mid_layer if source == "concat" else "none",
        "image_size": int(image_size), "resize_mode": params.data.resize_mode,
        "data_hash": data_hash, "classes": ",".join(classes), "n_classes": len(classes),
    }


def svm_model_params(name: str, summary: Mapping, params, data_hash: str, classes: list[str],
                     image_size: int) -> dict[str, Any]:
    """Params of an SVM's model run: :func:`common_model_params` plus ``svm.*`` (C grid, chosen C, search).

    Family-specific keys carry a prefix (``svm.``/``net.``) so the shared keys sort
    first: MLflow's Compare page plots the first three differing params by name
    (here ``backbone``, ``family``, ``input``) in its parallel-coordinates plot.
    """
    grid = params.svm.c_grid
    extra = {
        "svm.C": summary["best_C"], "svm.C_grid": f"logspace({grid.start:g}, {grid.stop:g}, {grid.num})",
        "svm.cv_folds": params.svm.cv_folds, "svm.search": summary.get("search", ""),
        "svm.n_features": summary.get("n_features", ""), "seed": params.svm.seed,
        "n_train": summary.get("n_train", ""),
    }
    if name == "svm_pixels":
        extra["svm.pixel_size"] = params.svm.pixel_size
    return {**common_model_params(name, params, data_hash, classes, image_size), **extra}


def network_model_params(kind: str, summary: Mapping, params, data_hash: str, classes: list[str],
                         image_size: int) -> dict[str, Any]:
    """Params of a network's model run: :func:`common_model_params` plus ``net.*`` (optimizer, schedule, head,
    augmentation); see :func:`svm_model_params` for the prefix."""
    tune = params.finetune
    if kind == "finetuned":  # its own schedule (networks.fitting.train_finetuned): the shared keys say what it used
        augment = tune.finetuned_augmentation()
        schedule = {"net.learning_rate": tune.finetuned_head_learning_rate,
                    "net.epochs": tune.finetuned_head_epochs + tune.finetuned_epochs,
                    "net.head_units": tune.finetuned_units, "net.feature_cache": True,
                    "net.cache_copies": tune.finetuned_copies,
                    "net.unfreeze_layers": summary.get("tuned_blocks", tune.finetuned_blocks)}
    else:
        augment = tune.augment
        schedule = {"net.learning_rate": tune.learning_rate, "net.epochs": tune.epochs,
                    "net.head_units": getattr(tune, f"{kind}_units"), "net.feature_cache": tune.feature_cache,
                    "net.cache_copies": tune.cache_copies if tune.feature_cache else 0,
                    "net.unfreeze_layers": tune.unfreeze_layers}
    extra = {
        "net.optimizer": tune.optimizer, **schedule, "net.batch_size": tune.batch_size,
        "net.mode": summary.get("mode", ""),
        **{f"net.augment.{k}": v for k, v in augment.model_dump().items()},
        "seed": tune.seed, "n_train": summary.get("train_images", ""),
    }
    if kind == "finetuned":
        extra.update({f"net.{key}": value for key, value in tune.model_dump().items() if key.startswith("finetuned_")})
        return {**common_model_params(kind, params, data_hash, classes, image_size), **extra}
    if tune.unfreeze_layers:
        extra.update({"net.unfreeze_epochs": tune.unfreeze_epochs,
                      "net.unfreeze_learning_rate": tune.unfreeze_learning_rate})
    return {**common_model_params(kind, params, data_hash, classes, image_size), **extra}
