"""Typed configuration: ``params.yaml`` parsed once into a validated object.

Every section is a pydantic model that forbids unknown keys, so a typo in
``params.yaml`` fails with a message naming the offending key instead of being
silently ignored.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from tlpipe.core.errors import UserError


class ConfigError(UserError, ValueError):
    """Raised when ``params.yaml`` is missing, unreadable or invalid."""


#: A Dask cluster for a heavy stage (see tlpipe.ops.cluster): ``local:N`` (N >= 1) or a scheduler address.
DASK_PATTERN = re.compile(r"^(local:0*[1-9][0-9]*|(tcp|tls|inproc|ucx)://\S+)$")
DASK_HELP = "Dask cluster: local:N (N workers here) or tcp://host:port; null: $TLPIPE_DASK_SCHEDULER or local"


def check_dask_address(value: str | None) -> str | None:
    """Accept null, ``local:N`` (N >= 1) or a ``tcp://``/``tls://``/``inproc://``/``ucx://`` scheduler address.

    The one check of a cluster address, for the ``dask`` params and ``$TLPIPE_DASK_SCHEDULER``
    (:func:`tlpipe.ops.cluster.resolve_scheduler`).
    """
    if value is not None and not DASK_PATTERN.match(value):
        raise ValueError(f"'{value}' is not a Dask cluster: use local:N (N >= 1 workers on this machine), "
                         "a scheduler address such as tcp://host:8786, or null")
    return value


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


AUTO = "auto"
NATIVE = "native"
FIXRES = "fixres"
FIXRES_SCALE = 1.3
NATIVE_SIZES: dict[str, int] = {"efficientnet_lite0": 224, "efficientnet_lite1": 240, "efficientnet_lite2": 260,
                                "resnet50": 224}
"""Native input side per backbone, the one list (``tlpipe.features.backbones.get_spec(name).default_size`` reads it).
In ``params.yaml``, ``data.image_size: native`` (or no value) stores images at this size, so ingest
reruns when the backbone changes; :class:`Params` resolves it to an int when parsing."""


def scaled_size(native: int, scale: float) -> int:
    """``native`` times ``scale``, to a multiple of 4 (the side the select stage tries for a scale)."""
    return int(native * scale / 4 + 0.5) * 4


def fixres_size(native: int) -> int:
    """A higher test-time input side for a backbone trained at ``native``: 1.3x, to a multiple of 4.

    FixRes (Touvron et al., NeurIPS 2019): ImageNet training crops (random-resized crops) make objects
    look larger than a plain resize at the same side does at test time, so a pretrained network sees
    objects at their training scale when the test input is larger (Lite0 292, Lite1 312, Lite2 340).
    """
    return scaled_size(native, FIXRES_SCALE)


class DataParams(_Section):
    """Params of the ``ingest`` stage."""

    source: str = Field("elpv", description="'elpv' or a path to an image folder")
    classes: list[str] | None = Field(None, description="keep only these classes")
    elpv_label: Literal["defect", "type"] = "defect"
    elpv_threshold: float = Field(0.5, ge=0.0, le=1.0)
    max_per_class: int | None = Field(400, ge=1)
    test_fraction: float = Field(0.2, gt=0.0, lt=1.0)
    val_fraction: float = Field(0.1, gt=0.0, lt=1.0)
    seed: int = 42
    image_size: int | Literal["auto", "native", "fixres"] = Field(
        AUTO, description="auto (the select stage chooses), native, fixres or a side in pixels")
    resize_mode: Literal["stretch", "center_crop"] = "stretch"
    min_side: int = Field(32, ge=1)
    max_pixels: int = Field(89_478_485, ge=1)
    cv_folds: int = Field(5, ge=2, description="smallest class must support this many CV folds")
    workers: int = Field(0, ge=0, description="decode processes; 0 = all cores")
    dask: str | None = Field(None, description=DASK_HELP)
    _dask_address = field_validator("dask")(lambda cls, value: check_dask_address(value))

    @field_validator("image_size", mode="before")
    @classmethod
    def _image_size_word(cls, value: object) -> object:
        if isinstance(value, str) and value.strip().isdigit():
            return int(value)
        if isinstance(value, str) and value not in (AUTO, NATIVE, FIXRES):
            raise ValueError(f"'{value}' is not a size: use {AUTO} (chosen by the select stage), {NATIVE} (the "
                             f"backbone's input size), {FIXRES} (1.3x it, FixRes) or a side in pixels")
        return value

    @field_validator("image_size")
    @classmethod
    def _side_range(cls, value: int | str) -> int | str:
        if isinstance(value, int) and not 16 <= value <= 1024:
            raise ValueError(f"a side of {value} pixels is outside 16..1024")
        return value

    @field_validator("classes")
    @classmethod
    def _unique_classes(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and len(set(value)) != len(value):
            raise ValueError("classes must be unique")
        return value


class FeaturesParams(_Section):
    """Params of the ``features`` stage."""

    backbone: Literal["auto", "efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2", "resnet50"] = Field(
        AUTO, description="auto (the select stage chooses by CV on train) or a backbone")
    weights: str = Field("imagenet", description="'imagenet', a weights file path, or 'none'")
    batch_size: int = Field(32, ge=1)
    mixed_precision: Literal["auto", "off", "bfloat16", "float16"] = "auto"
    dask: str | None = Field(None, description=DASK_HELP)
    _dask_address = field_validator("dask")(lambda cls, value: check_dask_address(value))


class CGrid(_Section):
    """A ``numpy.logspace`` grid of C values."""

    start: float = -3.0
    stop: float = 3.0
    num: int = Field(13, ge=1)

    @model_validator(mode="after")
    def _ordered(self) -> CGrid:
        if self.stop < self.start:
            raise ValueError("c_grid.stop must be >= c_grid.start")
        return self

    def values(self) -> list[float]:
        """Return the grid as plain floats."""
        return [float(c) for c in np.logspace(self.start, self.stop, self.num)]


class SvmParams(_Section):
    """Params of the ``svm`` stage."""

    c_grid: CGrid = CGrid()
    cv_folds: int = Field(5, ge=2)
    n_jobs: int = -1
    pixel_size: int = Field(224, ge=4, description="side of the raw-pixel baseline images")
    seed: int = 42


class SelectParams(_Section):
    """Params of the ``select`` stage: the candidates and the budget of the race between them."""

    backbones: list[Literal["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2", "resnet50"]] = Field(
        ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"], min_length=1,
        description="backbones tried when features.backbone is auto")
    scales: list[float] = Field([1.0, 1.3, 1.5], min_length=1,
                                description="sides tried when data.image_size is auto: native side x scale")
    max_gflops: float = Field(1.5, gt=0.0, description="drop candidates costing more per image (GFLOPs)")
    max_train_gflops: float = Field(400.0, gt=0.0, description="drop candidates whose train images x GFLOPs "
                                    "per image exceed this (bounds the finetune stage's time)")
    budget: float = Field(3.0, gt=0.0, description="compute of the race, in features stages (Lite0, native)")
    eta: int = Field(3, ge=2, description="successive halving: keep the best 1/eta each round")
    c_grid: CGrid = CGrid()
    cv_folds: int = Field(5, ge=2)
    min_images: int = Field(40, ge=4, description="smallest subset a round may use")
    batch_size: int = Field(32, ge=1)
    n_jobs: int = -1
    seed: int = 42

    @field_validator("scales")
    @classmethod
    def _positive_scales(cls, value: list[float]) -> list[float]:
        if any(scale <= 0 for scale in value):
            raise ValueError("scales must be > 0")
        return value


class AugmentParams(_Section):
    """Augmentation of the course's ImageDataGenerator, as Keras 3 layers."""

    rotation_degrees: float = Field(10.0, ge=0.0, le=180.0)
    width_shift: float = Field(0.1, ge=0.0, lt=1.0)
    height_shift: float = Field(0.1, ge=0.0, lt=1.0)
    shear: float = Field(0.1, ge=0.0, lt=1.0)
    zoom: float = Field(0.1, ge=0.0, lt=1.0)
    horizontal_flip: bool = True
    noise_stddev: float = Field(8.0, ge=0.0, description="Gaussian noise, in 0..255 pixel units")


class FinetuneParams(_Section):
    """Params of the ``finetune`` stages."""

    optimizer: Literal["rmsprop", "adam", "sgd"] = "rmsprop"
    learning_rate: float = Field(1e-3, gt=0.0)
    batch_size: int = Field(32, ge=1)
    epochs: int = Field(20, ge=1)
    frozen_units: int = Field(32, ge=1)
    concat_units: int = Field(64, ge=1)
    augment: AugmentParams = AugmentParams()
    feature_cache: bool = Field(
        True, description="reuse backbone outputs of pre-drawn augmented copies across epochs"
    )
    cache_copies: int = Field(5, ge=1, description="augmented copies per image when feature_cache")
    unfreeze_layers: int = Field(0, ge=0, description="phase 2: unfreeze the top N backbone layers")
    unfreeze_epochs: int = Field(5, ge=0)
    unfreeze_learning_rate: float = Field(1e-5, gt=0.0)
    finetuned_units: int = Field(0, ge=0, description="finetuned model: hidden units of its head (0: linear head)")
    finetuned_blocks: int = Field(10, ge=1, description="finetuned model: backbone blocks trained in phase 2 "
                                  "(at most those above the mid-level tap)")
    finetuned_copies: int = Field(4, ge=1, description="finetuned model: augmented copies cached below those blocks")
    finetuned_augment: Literal["flips", "course"] = Field(
        "flips", description="finetuned model: mirror images only, or the course's augmentation (augment.*)")
    finetuned_head_epochs: int = Field(4, ge=1, description="finetuned model: phase 1 (head only) epochs")
    finetuned_epochs: int = Field(10, ge=0, description="finetuned model: phase 2 (head + top blocks) epochs")
    finetuned_head_learning_rate: float = Field(1e-3, gt=0.0)
    finetuned_learning_rate: float = Field(1e-4, gt=0.0, description="finetuned model: phase 2 learning rate")
    finetuned_dropout: float = Field(0.2, ge=0.0, lt=1.0)
    finetuned_mid: bool = Field(False, description="finetuned model: head reads final + mid-level features")
    finetuned_vertical_flip: bool = Field(False, description="finetuned model: also flip upside down when augmenting")
    finetuned_tta: Literal["auto", "none", "horizontal", "flips"] = Field(
        "auto", description="finetuned model: average predictions over mirrored copies (auto: the training flips)")
    seed: int = 42

    def finetuned_tta_flips(self) -> str:
        """The finetuned model's test-time flips: ``auto`` averages over the flips it was trained with
        (left-right; also upside down with ``finetuned_vertical_flip``)."""
        if self.finetuned_tta != "auto":
            return self.finetuned_tta
        return "flips" if self.finetuned_vertical_flip else "horizontal"

    def finetuned_augmentation(self) -> AugmentParams:
        """The finetuned model's augmentation: the course's (``augment.*``) or mirror images only.

        Measured on ELPV: the course's rotation, shift, shear, zoom and noise (made
        for photos) cost accuracy on aligned solar-cell images; mirrors are exact.
        """
        if self.finetuned_augment == "course":
            return self.augment
        return AugmentParams(rotation_degrees=0, width_shift=0, height_shift=0, shear=0, zoom=0,
                             horizontal_flip=True, noise_stddev=0)


class EvaluateParams(_Section):
    """Params of the ``evaluate`` stage."""

    grid_images: int = Field(16, ge=1)


REGISTRY_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
"""A task or registered model name: it appears in ``models:/NAME@ALIAS`` URIs and experiment names."""


class RegistryParams(_Section):
    """Which task the pipeline's runs and models belong to, and how the best model is registered.

    ``auto`` names the task after the data set (:func:`tlpipe.core.task.resolve_task`); the MLflow experiment
    is the task's name, and so is the registered model unless ``model_name`` names one.
    """

    task: str = Field(AUTO, description="auto: named after the data set (source and class set), or a name")
    model_name: str = Field(AUTO, description="auto: the task's name, or a registered model name")
    min_improvement: float = Field(0.0, ge=0.0)

    @field_validator("task", "model_name")
    @classmethod
    def _registry_name(cls, value: str) -> str:
        if value != AUTO and not REGISTRY_NAME.match(value):
            raise ValueError(f"'{value}' is not a name: use auto, or letters, digits, '.', '_' and '-' "
                             "(at most 100, starting with a letter or digit)")
        return value


class ScheduleParams(_Section):
    """Prefect deployment schedule."""

    cron: str = "0 3 * * *"
    timezone: str = "UTC"
    deployment_name: str = "tlpipe-retrain"


class Params(_Section):
    """The whole ``params.yaml``."""

    data: DataParams = DataParams()
    features: FeaturesParams = FeaturesParams()
    select: SelectParams = SelectParams()
    svm: SvmParams = SvmParams()
    finetune: FinetuneParams = FinetuneParams()
    evaluate: EvaluateParams = EvaluateParams()
    registry: RegistryParams = RegistryParams()
    schedule: ScheduleParams = ScheduleParams()

    @model_validator(mode="before")
    @classmethod
    def _native_image_size(cls, raw: object) -> object:
        """With a pinned backbone, ``data.image_size: native`` stores at its native input size and
        ``fixres`` at :func:`fixres_size` of it; with ``features.backbone: auto`` the word stays
        until :func:`tlpipe.core.task.resolve_choice` applies the select stage's choice."""
        if not isinstance(raw, dict) or not isinstance(raw.get("data", {}), dict):
            return raw
        data = dict(raw.get("data") or {})
        features = raw.get("features") if isinstance(raw.get("features"), dict) else {}
        backbone = features.get("backbone", FeaturesParams().backbone)
        size = data.get("image_size", AUTO)
        if size in (NATIVE, FIXRES) and backbone in NATIVE_SIZES:
            native = NATIVE_SIZES[backbone]
            data["image_size"] = native if size == NATIVE else fixres_size(native)
            return {**raw, "data": data}
        return raw


def _format_errors(error: ValidationError, path: Path) -> str:
    lines = [f"invalid {path}:"]
    for item in error.errors():
        key = ".".join(str(part) for part in item["loc"])
        message = "unknown key" if item["type"] == "extra_forbidden" else item["msg"]
        lines.append(f"  {key}: {message}")
    return "\n".join(lines)


def parse_params(raw: dict, path: Path = Path("params.yaml")) -> Params:
    """Validate a raw mapping into :class:`Params`.

    Args:
        raw: The mapping read from YAML.
        path: Where it came from, for error messages.

    Raises:
        ConfigError: Naming every bad or unknown key.
    """
    try:
        return Params.model_validate(raw or {})
    except ValidationError as error:
        raise ConfigError(_format_errors(error, path)) from None


def load_params(path: Path | str = "params.yaml") -> Params:
    """Read and validate ``params.yaml``.

    Args:
        path: The YAML file.

    Raises:
        ConfigError: When the file is missing, not YAML, or invalid.
    """
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"params file not found: {path}") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"{path} is not valid YAML: {error}") from None
    if raw is not None and not isinstance(raw, dict):
        raise ConfigError(f"{path} must hold a mapping at top level")
    return parse_params(raw, path)


# ---------------------------------------------------------------- the task


