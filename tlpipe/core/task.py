"""The task a project works on (data set and class set: its experiment, registered model and run names) and the
params a stage runs with (the select stage's choice applied, ``-S`` overrides)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

from tlpipe.core.params import (
    AUTO,
    FIXRES,
    NATIVE,
    NATIVE_SIZES,
    ConfigError,
    Params,
    fixres_size,
    load_params,
    parse_params,
)


def side_for(size: int | str, backbone: str) -> int:
    """A pinned ``data.image_size`` as a side for ``backbone``: an int as it is, ``native`` or ``fixres``.

    Raises:
        ConfigError: For ``auto``, which only the select stage turns into a side.
    """
    if isinstance(size, int):
        return size
    if size in (NATIVE, FIXRES):
        return NATIVE_SIZES[backbone] if size == NATIVE else fixres_size(NATIVE_SIZES[backbone])
    raise ConfigError(f"data.image_size {size!r} is chosen by the select stage, not a side")


def needs_selection(params: Params) -> bool:
    """Whether the backbone or the input side is left to the select stage (or a word for a chosen backbone)."""
    return params.features.backbone == AUTO or not isinstance(params.data.image_size, int)


def resolve_choice(params: Params, selection: dict | None) -> Params:
    """The params with the select stage's choice applied: a concrete backbone and an int side.

    A value pinned in ``params.yaml`` wins over the selection (the select stage writes the
    pinned value itself, so they agree); ``native``/``fixres`` are resolved for the backbone.

    Raises:
        ConfigError: When a value is ``auto`` and there is no selection.
    """
    if not needs_selection(params):
        return params
    if params.features.backbone == AUTO or params.data.image_size == AUTO:  # noqa: SIM102 (one message each)
        if not selection:
            raise ConfigError("features.backbone or data.image_size is 'auto' and the select stage has not run: "
                              "run `tlpipe repro` (or `dvc repro select`), or pin both in params.yaml")
    backbone = params.features.backbone if params.features.backbone != AUTO else str(selection["backbone"])
    size = params.data.image_size
    if size == AUTO:
        size = int(selection["image_size"])
    else:
        size = side_for(size, backbone)
    return params.model_copy(update={
        "features": params.features.model_copy(update={"backbone": backbone}),
        "data": params.data.model_copy(update={"image_size": int(size)}),
    })


def read_selection(path: Path | str) -> dict | None:
    """The select stage's choice (``data/selection.json``), or None when it has not run."""
    import json

    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as error:
        raise ConfigError(f"{path} is unreadable ({error}): run `dvc repro select` again") from None


def load_stage_params(params_path: Path | str, selection_path: Path | str) -> Params:
    """``params.yaml`` parsed, with the select stage's choice applied (what every stage after it reads)."""
    params = load_params(params_path)
    return resolve_choice(params, read_selection(selection_path) if needs_selection(params) else None)


def check_run_inputs(root: Path | str, overrides: list[str] | None = None) -> Params:
    """Check ``params.yaml`` (with ``dvc exp run -S`` overrides) and the source before DVC runs any stage.

    DVC removes a stage's outputs before it starts the stage, so a stage that rejects a typo, a bad value
    or a missing source leaves the workspace without them (until ``dvc checkout``). ``tlpipe repro`` and the
    scheduled retrain call this first, and DVC is not started when it fails.

    Raises:
        ConfigError: Naming every bad or unknown key.
        SourceError: When a folder source is missing or holds fewer than two class folders with files.
    """
    from tlpipe.core.sources import SourceError, folder_class_names, source_folder

    path = Path(root) / "params.yaml"
    params = load_params(path)  # the file itself first: its own errors name it
    if overrides:
        raw = apply_overrides(yaml.safe_load(path.read_text()) or {}, overrides)
        params = parse_params(raw, Path(f"{path} with -S {' '.join(overrides)}"))
    if params.data.source != "elpv":
        folder = source_folder(params.data.source, Path(root))
        classes = folder_class_names(folder, params.data.classes)  # raises when the folder is missing
        if len(classes) < 2:
            raise SourceError(f"source folder {folder} has {len(classes)} class folder(s) with files "
                              f"({', '.join(classes) or 'none'}): one sub-folder per class, at least two, is "
                              "needed (data.source in params.yaml)")
    return params


def read_stage_spec(root: Path | str, stage: str) -> dict:
    """The ``stages.<stage>`` entry of the project's ``dvc.yaml``."""
    path = Path(root) / "dvc.yaml"
    try:
        return yaml.safe_load(path.read_text())["stages"][stage]
    except (OSError, KeyError, TypeError, yaml.YAMLError) as error:
        raise ConfigError(f"{path}: no readable stage '{stage}' ({type(error).__name__}: {error})") from None


def stage_param_values(params: Params, root: Path | str, stage: str) -> dict:
    """The values of exactly the params ``dvc.yaml`` lists for ``stage``, nested as in ``params.yaml``: what
    the stage's MLflow run logs. ``dvc.yaml`` is the one list; a stage that depends on the select stage's
    choice (``data/selection.json``) also gets it, as ``selection.backbone`` and ``selection.image_size``.

    Args:
        params: The stage's params (:func:`load_stage_params`: the choice applied).
        root: The project root (its ``dvc.yaml``).
        stage: The stage's name in ``dvc.yaml``.
    """
    spec = read_stage_spec(root, stage)
    dumped = params.model_dump()
    values: dict = {}
    for key in spec.get("params", []):
        if not isinstance(key, str):  # {other_file.yaml: [...]}: not params.yaml
            continue
        node, target, parts = dumped, values, key.split(".")
        for part in parts:
            node = node[part]
        for part in parts[:-1]:
            target = target.setdefault(part, {})
        target[parts[-1]] = node
    if "data/selection.json" in map(str, spec.get("deps", [])):
        values["selection"] = {"backbone": params.features.backbone, "image_size": params.data.image_size}
    return values


@dataclass(frozen=True)
class Task:
    """What the pipeline's MLflow runs and registered models are filed under.

    ``name`` is the MLflow experiment; ``model_name`` the registered model whose
    ``@champion`` answers ``tlpipe predict``; ``classes`` the source's class set
    (None when ``registry.task`` names the task: the source is then not listed).
    """

    name: str
    model_name: str
    classes: list[str] | None = None


def resolve_task(params: Params, root: Path | str | None = None) -> Task:
    """The task of ``params``: each data set (source and class set) is its own task, unless named.

    ``registry.task: auto`` derives the name from the source (:func:`tlpipe.core.sources.name_source_task`:
    ``elpv-defect``, ``elpv-type``, ``hymenoptera-ants-bees``); a folder source that is gone
    (e.g. a clone on another machine) is named from the project store's classes instead.
    ``registry.model_name: auto`` is the task's name.

    Args:
        params: The parsed params.
        root: The project (a relative folder source is taken from it; default: the working directory).

    Raises:
        ConfigError: When the source can be neither listed nor replaced by the store's classes.
    """
    from tlpipe.core.sources import ELPV, SourceError, folder_task, name_source_task, source_folder

    registry, data = params.registry, params.data
    if registry.task != AUTO:
        return Task(registry.task, registry.task if registry.model_name == AUTO else registry.model_name)
    try:
        found = name_source_task(data.source, data.classes, data.elpv_label, data.elpv_threshold,
                                 Path(root) if root is not None else None)
    except SourceError as error:
        stored = Path(root or ".") / "data" / "store" / "classes.json"
        if data.source == ELPV or not stored.is_file():
            raise ConfigError(f"cannot name the task: {error}; fix data.source or set registry.task in "
                              "params.yaml") from None
        import json

        found = folder_task(source_folder(data.source, Path(root or ".")), json.loads(stored.read_text()))
    return Task(found.name, found.name if registry.model_name == AUTO else registry.model_name, found.classes)


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """``params.yaml``'s mapping with ``dvc exp run -S key=value`` overrides applied (values read as YAML).

    ``params.yaml:key=value`` and Hydra's ``+key=value`` mean the same; ``~key`` removes a key;
    overrides of other files are left to DVC.
    """
    import copy

    result = copy.deepcopy(raw or {})
    for item in overrides:
        key, _, value = item.partition("=")
        file, colon, path = key.rpartition(":")
        if colon and file != "params.yaml":
            continue
        remove = path.startswith("~")
        parts = path.lstrip("+~").split(".")
        node = result
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        if remove:
            node.pop(parts[-1], None)
        else:
            node[parts[-1]] = yaml.safe_load(value) if value.strip() else None
    return result


def load_task(root: Path | str, overrides: list[str] | None = None) -> Task:
    """The task of the project at ``root`` (its ``params.yaml``, with ``-S`` overrides applied)."""
    path = Path(root) / "params.yaml"
    if not overrides:
        return resolve_task(load_params(path), root)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"params file not found: {path}") from None
    return resolve_task(parse_params(apply_overrides(raw, overrides), path), root)
