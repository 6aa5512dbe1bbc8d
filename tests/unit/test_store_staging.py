"""Staging debris of killed writers is removed at the next write; live writers' files are kept."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

from tlpipe.data import store


def dead_pid() -> int:
    """The pid of a process that has exited and been reaped."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_staging_dir_removes_debris_of_dead_writers_only(tmp_path: Path) -> None:
    target = tmp_path / "models" / "finetune"
    target.parent.mkdir()
    dead = dead_pid()
    stale_tmp = target.parent / f".finetune.tmp-{dead}"
    stale_old = target.parent / f".finetune.old-{dead}"
    (stale_tmp / "cache").mkdir(parents=True)
    (stale_tmp / "cache" / "train.npy").write_bytes(b"x" * 100)
    stale_old.mkdir()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        time.sleep(0.1)
        live_tmp = target.parent / f".finetune.tmp-{live.pid}"
        live_tmp.mkdir()
        os.utime(live_tmp, (time.time() + 5, time.time() + 5))  # written after the live process started
        keep = [target.parent / f".finetune2.tmp-{dead}", target.parent / ".finetune.tmp-abc",
                target.parent / f"finetune.tmp-{dead}"]  # other outputs' or foreign names
        for path in keep:
            path.mkdir()

        staging = store.staging_dir(target)

        assert staging == target.parent / f".finetune.tmp-{os.getpid()}" and staging.is_dir()
        assert not stale_tmp.exists() and not stale_old.exists()
        assert live_tmp.is_dir(), "a live writer's staging folder was removed"
        assert all(path.is_dir() for path in keep)
    finally:
        live.kill()
        live.wait()


def test_staging_of_a_reused_pid_is_stale(tmp_path: Path) -> None:
    """A live process that started after the staging folder was last written cannot own it."""
    target = tmp_path / "store"
    newer = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        stale = tmp_path / f".store.tmp-{newer.pid}"
        stale.mkdir()
        os.utime(stale, (time.time() - 3600, time.time() - 3600))  # an hour before that process started
        store.staging_dir(target)
        assert not stale.exists()
    finally:
        newer.kill()
        newer.wait()


def test_atomic_file_writes_remove_stale_temp_files(tmp_path: Path) -> None:
    dead = dead_pid()
    stale_json = tmp_path / f".evaluate.json.tmp-{dead}"
    stale_csv = tmp_path / f".table.csv.tmp-{dead}"
    stale_json.write_text("{")
    stale_csv.write_text("a,")
    store.write_json(tmp_path / "evaluate.json", {"a": 1})
    store.write_csv(tmp_path / "table.csv", pd.DataFrame({"a": [1]}))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["evaluate.json", "table.csv"]


def test_remove_stale_siblings_reports_what_it_removed(tmp_path: Path) -> None:
    dead = dead_pid()
    (tmp_path / f".store.tmp-{dead}").mkdir()
    (tmp_path / f".store.old-{dead}").write_text("x")
    removed = store.remove_stale_siblings(tmp_path / "store")
    assert sorted(p.name for p in removed) == sorted([f".store.tmp-{dead}", f".store.old-{dead}"])
    assert store.remove_stale_siblings(tmp_path / "missing" / "store") == []


WRITE_LIMITED_INGEST = """
import resource, signal, sys
from pathlib import Path
from tlpipe.core.params import DataParams
from tlpipe.data.ingest import ingest
from tlpipe.core.sources import list_folder

signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead of killing us
limit = int(sys.argv[3])
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
params = DataParams(source=sys.argv[1], image_size=32, max_per_class=None, workers=1)
try:
    ingest(list_folder(Path(sys.argv[1])), params, Path(sys.argv[2]))
except OSError as error:
    print(f"write failed: {error}")
    sys.exit(3)
"""


def test_a_write_failure_while_building_keeps_the_published_store(tmp_path: Path) -> None:
    """The disk fills up (simulated: a per-process file size limit) while ingest builds the next store: the
    error names the cause, the published store is untouched and no staging folder is left."""
    import numpy as np

    from tests.conftest import make_image, make_source
    from tlpipe.core.params import DataParams
    from tlpipe.core.sources import list_folder
    from tlpipe.data.ingest import ingest

    source = make_source(tmp_path / "source", per_class=10)
    store_dir = tmp_path / "data" / "store"
    ingest(list_folder(source), DataParams(source=str(source), image_size=32, max_per_class=None, workers=1),
           store_dir)
    before = {p.name: p.read_bytes() for p in store_dir.iterdir()}
    rng = np.random.default_rng(5)
    for i in range(40):  # the next store is larger than the limit below
        make_image(source / ("bright" if i % 2 else "dark") / f"more_{i:02d}.png", rng, bright=bool(i % 2))
    limit = max(len(data) for data in before.values()) + 1024

    result = subprocess.run([sys.executable, "-c", WRITE_LIMITED_INGEST, str(source), str(store_dir), str(limit)],
                            capture_output=True, text=True, timeout=300,
                            cwd=Path(__file__).resolve().parents[2])

    assert result.returncode == 3, result.stdout + result.stderr[-3000:]
    assert "File too large" in result.stdout
    assert {p.name: p.read_bytes() for p in store_dir.iterdir()} == before
    assert sorted(p.name for p in store_dir.parent.iterdir()) == ["store"]
