"""Each data set is its own task (issue 19): the task's name follows the source and its class set, unless named.

Real parts: real folder sources on disk, the real ELPV package's labels, the real params parser, and a real
SQLite MLflow store for the experiment and run names.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tlpipe.core.params import ConfigError, Params, parse_params
from tlpipe.core.sources import SourceError, class_set_suffix, folder_class_names, slugify
from tlpipe.core.task import load_task, resolve_task
from tlpipe.tracking.connection import (
    EXPERIMENT,
    EXPERIMENT_ENV,
    EXPERIMENT_KIND,
    EXPERIMENT_KIND_TAG,
    connect,
    ensure_experiment,
    experiment_name,
)
from tlpipe.tracking.runs import create_pipeline_run
from tlpipe.tracking.tags import TASK_TAG


def make_folder(root: Path, classes: list[str], presplit: bool = False) -> Path:
    """A class-folder source with one (never decoded) file per class (per split when ``presplit``)."""
    for split in ("train", "val") if presplit else (None,):
        for name in classes:
            folder = root / split / name if split else root / name
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "image.jpg").write_bytes(b"not decoded to name the task")
    return root


def params_for(source: Path | str, **data) -> Params:
    return parse_params({"data": {"source": str(source), **data}})


def test_elpv_tasks_are_named_by_their_labelling() -> None:
    assert resolve_task(Params()) == resolve_task(params_for("elpv"))
    defect = resolve_task(Params())
    assert (defect.name, defect.model_name, defect.classes) == ("elpv-defect", "elpv-defect",
                                                                ["defective", "functional"])
    kind = resolve_task(params_for("elpv", elpv_label="type"))
    assert (kind.name, kind.model_name, kind.classes) == ("elpv-type", "elpv-type", ["mono", "poly"])


def test_a_folder_task_is_its_folder_and_class_set(tmp_path: Path) -> None:
    plain = make_folder(tmp_path / "Hymenoptera Data", ["bees", "ants"])
    (plain / "empty_class").mkdir()  # no file: ingest finds no image there, so it is no class
    (plain / ".cache").mkdir()
    (plain / ".cache" / "x.jpg").write_bytes(b"hidden")
    assert folder_class_names(plain) == ["ants", "bees"]
    assert resolve_task(params_for(plain)).name == "hymenoptera-data-ants-bees"

    presplit = make_folder(tmp_path / "hymenoptera", ["ants", "bees"], presplit=True)
    task = resolve_task(params_for(presplit))
    assert (task.name, task.model_name, task.classes) == ("hymenoptera-ants-bees", "hymenoptera-ants-bees",
                                                          ["ants", "bees"])


def test_another_class_set_of_one_source_is_another_task(tmp_path: Path) -> None:
    source = make_folder(tmp_path / "photos", ["ants", "bees", "wasps"])
    everything = resolve_task(params_for(source))
    subset = resolve_task(params_for(source, classes=["ants", "bees"]))
    assert everything.name == "photos-ants-bees-wasps" and subset.name == "photos-ants-bees"
    make_folder(source, ["hornets"])  # a new class folder: a new task
    assert resolve_task(params_for(source)).name == "photos-ants-bees-hornets-wasps"


def test_a_long_class_set_is_named_by_its_count_and_hash(tmp_path: Path) -> None:
    names = [f"species_{i:03d}" for i in range(12)]
    source = make_folder(tmp_path / "Birds", names)
    task = resolve_task(params_for(source))
    assert task.name.startswith("birds-12classes-") and len(task.name.rsplit("-", 1)[1]) == 6
    other = resolve_task(params_for(source, classes=names[:11]))
    assert other.name.startswith("birds-11classes-") and other.name != task.name
    assert class_set_suffix(["A b", "a-b"]) != "a-b-a-b"  # names that slug alike: hashed, never merged


def test_a_named_task_or_model_wins(tmp_path: Path) -> None:
    source = make_folder(tmp_path / "photos", ["ants", "bees"])
    named = resolve_task(parse_params({"data": {"source": str(source)}, "registry": {"task": "insects"}}))
    assert (named.name, named.model_name) == ("insects", "insects")
    kept = resolve_task(parse_params({"registry": {"model_name": "tlpipe-classifier"}}))
    assert (kept.name, kept.model_name) == ("elpv-defect", "tlpipe-classifier")
    gone = resolve_task(parse_params({"data": {"source": str(tmp_path / "gone")}, "registry": {"task": "kept"}}))
    assert gone.name == "kept"  # a named task needs no listing
    with pytest.raises(ConfigError, match="registry.task"):
        parse_params({"registry": {"task": "has space"}})
    with pytest.raises(ConfigError, match="registry.model_name"):
        parse_params({"registry": {"model_name": "models:/x"}})


def test_relative_sources_overrides_and_a_missing_source(tmp_path: Path) -> None:
    project = tmp_path / "project"
    make_folder(project / "data_in" / "flowers", ["daisy", "rose"])
    (project / "params.yaml").write_text(yaml.safe_dump({"data": {"source": "data_in/flowers"}}))
    assert load_task(project).name == "flowers-daisy-rose"  # relative to the project, from any directory
    other = make_folder(tmp_path / "cells", ["bad", "good"])
    assert load_task(project, [f"data.source={other}"]).name == "cells-bad-good"  # what `-S` will run
    assert load_task(project, ["params.yaml:data.classes=[daisy]"]).name == "flowers-daisy"

    (project / "params.yaml").write_text(yaml.safe_dump({"data": {"source": str(tmp_path / "moved")}}))
    with pytest.raises(ConfigError, match="cannot name the task: source folder not found.*or set registry.task"):
        load_task(project)
    store = project / "data" / "store"
    store.mkdir(parents=True)
    (store / "classes.json").write_text('["a", "b"]')  # a clone without the source: the ingested classes
    assert load_task(project).name == "moved-a-b"
    with pytest.raises(SourceError):
        folder_class_names(tmp_path / "moved")


def test_slugify() -> None:
    assert slugify("Hymenoptera Data") == "hymenoptera-data"
    assert slugify("  ÉLPV__v2 ") == "lpv-v2" and slugify("***") == "data"


def test_each_task_has_its_experiment_and_named_pipeline_runs(tmp_path: Path, monkeypatch) -> None:
    for key in ("MLFLOW_TRACKING_URI", EXPERIMENT_ENV):
        monkeypatch.delenv(key, raising=False)
    project = tmp_path / "project"
    project.mkdir()
    photos = make_folder(tmp_path / "photos", ["ants", "bees"])
    (project / "params.yaml").write_text(yaml.safe_dump({"data": {"source": "elpv"}}))
    client = connect(project)
    elpv = ensure_experiment(client, project)
    hymen = ensure_experiment(client, project, experiment_name(project, [f"data.source={photos}"]))
    assert client.get_experiment(elpv).name == "elpv-defect" and client.get_experiment(hymen).name == "photos-ants-bees"
    assert client.get_experiment(hymen).tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND
    run = client.get_run(create_pipeline_run(client, hymen, project))
    assert run.info.run_name == "photos-ants-bees pipeline" and run.data.tags[TASK_TAG] == "photos-ants-bees"
    monkeypatch.setenv(EXPERIMENT_ENV, "chosen")
    assert experiment_name(project) == "chosen"
    monkeypatch.delenv(EXPERIMENT_ENV)
    assert experiment_name(tmp_path / "not-a-project") == EXPERIMENT
