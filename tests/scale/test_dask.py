"""Dask for the heavy data stages: ingest and features on a real ``distributed.LocalCluster`` write the same
bytes as the embedded local path, for the same source and params.

Shards are made small here so that several workers write several shards (and a duplicate straddles two of
them). Every output file is compared byte for byte, except what differs between two local runs too: the
timing fields of ``meta.json`` and the save date inside ``extractor.keras`` (its other members are compared).
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import zipfile
from pathlib import Path

import pytest

from tlpipe.core.params import DataParams, FeaturesParams
from tlpipe.core.sources import list_source
from tlpipe.data import ingest
from tlpipe.features import extraction as features
from tlpipe.ops import cluster

TIMING = {"seconds", "images_per_second"}


@pytest.fixture(scope="module")
def dask_client():
    """One LocalCluster of two worker processes for the module."""
    with cluster.dask_client("local:2") as (client, info):
        assert info.workers == 2 and info.local
        yield client


def tree_bytes(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` by relative path, with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def keras_members(path: Path) -> dict[str, bytes]:
    """The members of a ``.keras`` zip but ``metadata.json`` (it holds the save date), with what differs between
    any two saves masked in ``config.json``: ``shared_object_id`` (a Python object's address) and Keras's
    automatic name counters (``cast`` / ``cast_4``: they count the ops built earlier in the same process)."""
    with zipfile.ZipFile(path) as archive:
        members = {name: archive.read(name) for name in archive.namelist() if name != "metadata.json"}
    config = re.sub(rb'"shared_object_id": [0-9]+', b'"shared_object_id": 0', members["config.json"])
    members["config.json"] = re.sub(rb'"([a-z]+(?:_[a-z]+)*)(?:_[0-9]+)?"', rb'"\1"', config)
    return members


def with_duplicate(source: Path) -> Path:
    """Add an exact duplicate of the first image under a later path (its copy lands in another shard)."""
    shutil.copy(source / "bright" / "bright_00.png", source / "dark" / "zz_copy_of_bright_00.png")
    return source


@pytest.mark.slow
def test_ingest_and_features_on_dask_are_byte_identical(tmp_path, tiny_source, dask_client, monkeypatch):
    monkeypatch.setattr(ingest, "SHARD_FILES", 4)  # 26 files -> 7 shards over 2 workers
    monkeypatch.setattr(features, "BATCHES_PER_TASK", 1)  # one batch per task: several tasks per split
    source = with_duplicate(tiny_source)
    params = DataParams(source=str(source), image_size=224, max_per_class=None, workers=1)
    listing = list_source(params.source, params.classes, params.elpv_label, params.elpv_threshold)

    local_report = ingest.ingest(listing, params, tmp_path / "local" / "store")
    dask_report = ingest.ingest(listing, params, tmp_path / "dask" / "store", client=dask_client)
    assert dask_report == local_report  # reports/ingest and metrics/ingest.json are written from it
    assert "duplicate of bright/bright_00.png" in json.dumps(local_report["rejections"])
    local_store, dask_store = tree_bytes(tmp_path / "local" / "store"), tree_bytes(tmp_path / "dask" / "store")
    assert sorted(local_store) == ["classes.json", "manifest.csv", "test.npy", "train.npy", "val.npy"]
    assert dask_store == local_store
    assert not list((tmp_path / "dask").glob(".*"))  # no staging or shard debris

    fparams = FeaturesParams(backbone="efficientnet_lite0", batch_size=4)
    local_meta = features.extract_features(tmp_path / "local" / "store", tmp_path / "local" / "features", fparams)
    dask_meta = features.extract_features(tmp_path / "local" / "store", tmp_path / "dask" / "features", fparams,
                                          client=dask_client)
    assert {k: v for k, v in dask_meta.items() if k not in TIMING} == {
        k: v for k, v in local_meta.items() if k not in TIMING}
    assert local_meta["imagenet_top1"] is True  # the ImageNet head ran on the workers too
    local_files = tree_bytes(tmp_path / "local" / "features")
    dask_files = tree_bytes(tmp_path / "dask" / "features")
    assert sorted(dask_files) == sorted(local_files)
    special = {"meta.json", features.EXTRACTOR}
    assert {k: v for k, v in dask_files.items() if k not in special} == {
        k: v for k, v in local_files.items() if k not in special}  # every .npy and imagenet_top1.csv
    meta = {name: {k: v for k, v in json.loads(files["meta.json"]).items() if k not in TIMING}
            for name, files in (("local", local_files), ("dask", dask_files))}
    assert meta["dask"] == meta["local"]
    assert keras_members(tmp_path / "dask" / "features" / features.EXTRACTOR) == keras_members(
        tmp_path / "local" / "features" / features.EXTRACTOR)


def test_ingest_param_starts_a_local_cluster(tmp_path, tiny_source, caplog):
    params = DataParams(source=str(tiny_source), image_size=16, max_per_class=None, workers=1, dask="local:1")
    listing = list_source(params.source, params.classes, params.elpv_label, params.elpv_threshold)
    with caplog.at_level(logging.INFO, logger="tlpipe.cluster"):
        report = ingest.ingest(listing, params, tmp_path / "store")
    assert "ingest runs on Dask: a local cluster local:1 with 1 worker(s)" in caplog.text
    local = ingest.ingest(listing, params.model_copy(update={"dask": None}), tmp_path / "local")
    assert report == local and tree_bytes(tmp_path / "store") == tree_bytes(tmp_path / "local")


def test_scheduler_resolution_and_errors(monkeypatch):
    monkeypatch.delenv(cluster.SCHEDULER_ENV, raising=False)
    assert cluster.resolve_scheduler(None) is None  # the embedded local path
    monkeypatch.setenv(cluster.SCHEDULER_ENV, "tcp://10.0.0.5:8786")
    assert cluster.resolve_scheduler(None) == "tcp://10.0.0.5:8786"
    assert cluster.resolve_scheduler("local:3") == "local:3"  # the param wins
    monkeypatch.setenv(cluster.SCHEDULER_ENV, "my-laptop")
    with pytest.raises(cluster.ClusterError, match=f"{cluster.SCHEDULER_ENV}: 'my-laptop' is not a Dask cluster"):
        cluster.resolve_scheduler(None)
    monkeypatch.setattr(cluster, "CONNECT_TIMEOUT_S", 2)
    from tlpipe.ops.processes import free_port

    address = f"tcp://127.0.0.1:{free_port()}"
    with pytest.raises(cluster.ClusterError, match="is unreachable"), cluster.dask_client(address):
        pass
    assert [r.start for r in cluster.even_chunks(10, 3, align=2)] == [0, 4, 8]
