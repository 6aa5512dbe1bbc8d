"""Tests for tlpipe.core.params: params.yaml parsed into validated, frozen models."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pydantic
import pytest
import yaml

from tlpipe.core.params import NATIVE_SIZES, CGrid, ConfigError, DataParams, Params, load_params, parse_params
from tlpipe.core.task import load_stage_params, needs_selection, resolve_choice, stage_param_values

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def params_yaml(tmp_path_factory) -> Path:
    """The params.yaml of the checked-out commit (``git show HEAD:params.yaml``), not the working tree's.

    ``dvc exp run -S ...`` and hand edits change the working tree's params.yaml: DVC's normal workflow must not
    make the suite fail. Outside a git checkout (an unpacked sdist) the file itself is the committed one.
    """
    import subprocess

    shown = subprocess.run(["git", "-C", str(REPO_ROOT), "show", "HEAD:params.yaml"], capture_output=True,
                           text=True)
    path = tmp_path_factory.mktemp("committed") / "params.yaml"
    path.write_text(shown.stdout if shown.returncode == 0 else (REPO_ROOT / "params.yaml").read_text())
    return path


def raw_params(path: Path) -> dict:
    """A params.yaml as a plain mapping."""
    return yaml.safe_load(path.read_text())


def write_yaml(path: Path, payload: object) -> Path:
    path.write_text(yaml.safe_dump(payload))
    return path


def assert_subset_equal(raw: dict, parsed: dict, prefix: str = "") -> None:
    """Every key of ``raw`` is in ``parsed`` with an equal value (recursively)."""
    for key, value in raw.items():
        where = f"{prefix}{key}"
        assert key in parsed, where
        if isinstance(value, dict):
            assert_subset_equal(value, parsed[key], f"{where}.")
        else:
            assert parsed[key] == value, where


# ---------------------------------------------------------------- loading


def test_repo_params_load_and_match_the_yaml(params_yaml: Path) -> None:
    params = load_params(params_yaml)
    assert isinstance(params, Params)
    raw = raw_params(params_yaml)
    assert_subset_equal(raw, params.model_dump())
    assert params.data.source == "elpv"
    assert (params.features.backbone, params.data.image_size) == ("auto", "auto")  # the select stage chooses


def test_params_yaml_equals_the_model_defaults(params_yaml: Path) -> None:
    # params.yaml documents the defaults: parsing an empty mapping gives the same object.
    assert load_params(params_yaml) == parse_params({})


@pytest.mark.parametrize(("backbone", "size"), [("efficientnet_lite0", 224), ("efficientnet_lite1", 240),
                                               ("efficientnet_lite2", 260), ("resnet50", 224)])
def test_native_image_size_is_the_backbones_input_size(backbone: str, size: int) -> None:
    from tlpipe.features.backbones import get_spec

    assert get_spec(backbone).default_size == size
    assert parse_params({"features": {"backbone": backbone}}).data.image_size == "auto"  # select chooses the side
    native = {"data": {"image_size": "native"}, "features": {"backbone": backbone}}
    assert parse_params(native).data.image_size == size
    fixed = {"data": {"image_size": 64}, "features": {"backbone": backbone}}
    assert parse_params(fixed).data.image_size == 64


@pytest.mark.parametrize(("backbone", "size"), [("efficientnet_lite0", 292), ("efficientnet_lite1", 312),
                                               ("efficientnet_lite2", 340), ("resnet50", 292)])
def test_fixres_image_size_is_1_3x_native_to_a_multiple_of_4(backbone: str, size: int) -> None:
    params = parse_params({"data": {"image_size": "fixres"}, "features": {"backbone": backbone}})
    assert params.data.image_size == size
    assert size % 4 == 0 and abs(size - 1.3 * NATIVE_SIZES[backbone]) <= 2


def test_image_size_word_other_than_native_or_fixres_is_rejected_with_the_choices(tmp_path) -> None:
    path = write_yaml(tmp_path / "params.yaml", {"data": {"image_size": "large"}})
    with pytest.raises(ConfigError, match=r"data.image_size: .*'large' is not a size: use auto .* native .* fixres"):
        load_params(path)


def test_load_params_accepts_str_path(params_yaml: Path) -> None:
    assert load_params(str(params_yaml)) == load_params(params_yaml)


def test_empty_yaml_file_gives_defaults(tmp_path: Path) -> None:
    path = tmp_path / "params.yaml"
    path.write_text("")
    assert load_params(path) == Params()


def test_partial_file_fills_defaults(tmp_path: Path) -> None:
    path = write_yaml(tmp_path / "params.yaml", {"data": {"image_size": 64}})
    params = load_params(path)
    assert params.data.image_size == 64
    assert params.data.seed == DataParams().seed
    assert params.svm == Params().svm


def test_c_grid_values_equal_logspace(params_yaml: Path) -> None:
    values = load_params(params_yaml).svm.c_grid.values()
    assert values == [float(c) for c in np.logspace(-3, 3, 13)]
    np.testing.assert_array_equal(np.array(values), np.logspace(-3, 3, 13))
    assert all(type(v) is float for v in values)


def test_params_are_frozen(params_yaml: Path) -> None:
    params = load_params(params_yaml)
    with pytest.raises(pydantic.ValidationError):
        params.data.seed = 1  # type: ignore[misc]


# ---------------------------------------------------------------- unknown keys


@pytest.mark.parametrize(
    "path",
    [
        ("dataa",),
        ("data", "sourcee"),
        ("svm", "c_grid", "stepp"),
        ("finetune", "augment", "rotaton_degrees"),
    ],
    ids=lambda p: ".".join(p),
)
def test_unknown_key_names_its_path(tmp_path: Path, params_yaml: Path, path: tuple[str, ...]) -> None:
    raw = raw_params(params_yaml)
    node = raw
    for part in path[:-1]:
        node = node[part]
    node[path[-1]] = 1
    file = write_yaml(tmp_path / "params.yaml", raw)
    with pytest.raises(ConfigError) as info:
        load_params(file)
    message = str(info.value)
    assert f"{'.'.join(path)}: unknown key" in message
    assert str(file) in message


def test_parse_params_unknown_key_without_file() -> None:
    with pytest.raises(ConfigError, match=r"data\.sourcee: unknown key"):
        parse_params({"data": {"sourcee": "elpv"}})


def test_every_bad_key_is_named() -> None:
    raw = {"data": {"sourcee": "x", "test_fraction": 1.5}, "features": {"backbone": "vgg"}}
    with pytest.raises(ConfigError) as info:
        parse_params(raw)
    message = str(info.value)
    for key in ("data.sourcee", "data.test_fraction", "features.backbone"):
        assert key in message


# ---------------------------------------------------------------- bad values


@pytest.mark.parametrize(
    ("section", "key", "value"),
    [
        ("data", "test_fraction", 1.5),
        ("data", "val_fraction", 0.0),
        ("data", "image_size", 8),
        ("data", "resize_mode", "squash"),
        ("data", "elpv_label", "colour"),
        ("data", "max_per_class", 0),
        ("data", "cv_folds", 1),
        ("data", "workers", -1),
        ("features", "backbone", "vgg"),
        ("features", "mixed_precision", "float8"),
        ("finetune", "optimizer", "lbfgs"),
        ("finetune", "learning_rate", 0.0),
    ],
)
def test_bad_value_names_its_key(tmp_path: Path, params_yaml: Path, section: str, key: str,
                                 value: object) -> None:
    raw = raw_params(params_yaml)
    raw[section][key] = value
    file = write_yaml(tmp_path / "params.yaml", raw)
    with pytest.raises(ConfigError) as info:
        load_params(file)
    assert f"{section}.{key}:" in str(info.value)


def test_null_max_per_class_means_no_cap(params_yaml: Path) -> None:
    raw = copy.deepcopy(raw_params(params_yaml))
    raw["data"]["max_per_class"] = None
    assert parse_params(raw).data.max_per_class is None


def test_duplicate_classes_rejected() -> None:
    with pytest.raises(ConfigError, match=r"data\.classes"):
        parse_params({"data": {"classes": ["a", "b", "a"]}})


def test_c_grid_stop_below_start_rejected() -> None:
    with pytest.raises(ConfigError, match=r"svm\.c_grid"):
        parse_params({"svm": {"c_grid": {"start": 2, "stop": -2, "num": 3}}})
    assert CGrid(start=0, stop=0, num=1).values() == [1.0]


def test_config_error_is_a_value_error() -> None:
    assert issubclass(ConfigError, ValueError)


# ---------------------------------------------------------------- bad files


def test_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match="not found") as info:
        load_params(missing)
    assert str(missing) in str(info.value)


@pytest.mark.parametrize("text", ["- a\n- b\n", "just a string\n", "42\n"])
def test_non_mapping_yaml(tmp_path: Path, text: str) -> None:
    path = tmp_path / "params.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match="mapping at top level"):
        load_params(path)


def test_invalid_yaml(tmp_path: Path) -> None:
    path = tmp_path / "params.yaml"
    path.write_text("data: {source: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_params(path)


def test_section_not_a_mapping(tmp_path: Path) -> None:
    path = write_yaml(tmp_path / "params.yaml", {"data": [1, 2]})
    with pytest.raises(ConfigError, match=r"\bdata\b"):
        load_params(path)



# ---------------------------------------------------------------- the select stage's choice


def test_resolve_choice_applies_the_selection_where_params_say_auto() -> None:
    chosen = {"backbone": "efficientnet_lite2", "image_size": 340}
    params = resolve_choice(parse_params({}), chosen)
    assert (params.features.backbone, params.data.image_size) == ("efficientnet_lite2", 340)
    fixres = resolve_choice(parse_params({"data": {"image_size": "fixres"}}), chosen)
    assert fixres.data.image_size == 340  # fixres of the chosen backbone (260 x 1.3)
    native = resolve_choice(parse_params({"data": {"image_size": "native"}}), chosen)
    assert native.data.image_size == 260


def test_pinned_values_win_and_need_no_selection() -> None:
    pinned = parse_params({"features": {"backbone": "efficientnet_lite1"}, "data": {"image_size": 300}})
    assert not needs_selection(pinned)
    assert resolve_choice(pinned, None) is pinned
    size_only = parse_params({"data": {"image_size": 300}})
    assert resolve_choice(size_only, {"backbone": "efficientnet_lite0", "image_size": 300}).data.image_size == 300


def test_auto_without_a_selection_says_to_run_the_select_stage(tmp_path) -> None:
    path = write_yaml(tmp_path / "params.yaml", {})
    with pytest.raises(ConfigError, match=r"select stage has not run.*dvc repro select"):
        load_stage_params(path, tmp_path / "missing.json")


# ---------------------------------------------------------------- each stage's params: dvc.yaml's list

def flatten_keys(values: dict, prefix: str = "") -> set[str]:
    """Dotted keys of the leaves and of the whole sections named in a nested mapping."""
    keys = set()
    for key, value in values.items():
        keys.add(prefix + key)
        if isinstance(value, dict):
            keys |= flatten_keys(value, f"{prefix}{key}.")
    return keys


@pytest.mark.parametrize("stage", ["select", "ingest", "features", "svm", "finetune", "evaluate"])
def test_a_stage_logs_exactly_the_params_dvc_yaml_lists_for_it(stage: str, params_yaml: Path) -> None:
    """Issue 20, item 11: dvc.yaml is the one list; the MLflow stage run logs each listed key, and no other
    section (the select stage's choice aside, for the stages that depend on it)."""
    spec = yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())["stages"][stage]
    listed = [key for key in spec["params"] if isinstance(key, str)]
    params = resolve_choice(load_params(params_yaml), {"backbone": "efficientnet_lite0", "image_size": 224}) \
        if stage != "select" else load_params(params_yaml)
    values = stage_param_values(params, REPO_ROOT, stage)
    keys = flatten_keys(values)
    assert set(listed) <= keys, set(listed) - keys
    extra = {key.split(".")[0] for key in keys} - {key.split(".")[0] for key in listed}
    depends_on_choice = "data/selection.json" in spec["deps"]
    assert extra == ({"selection"} if depends_on_choice else set()), extra
    for key in listed:  # the values are the params' own
        node = params.model_dump()
        for part in key.split("."):
            node = node[part]
        value = values
        for part in key.split("."):
            value = value[part]
        assert value == node, key
    if depends_on_choice:
        assert values["selection"] == {"backbone": "efficientnet_lite0", "image_size": 224}


def test_stage_param_values_names_a_missing_stage(tmp_path: Path) -> None:
    (tmp_path / "dvc.yaml").write_text("stages:\n  ingest:\n    cmd: true\n")
    with pytest.raises(ConfigError, match="no readable stage 'svm'"):
        stage_param_values(parse_params({}), tmp_path, "svm")
