"""DVC sees every input (issue 11, item 1): real DVC on a temp copy of the project and a tiny folder source.

Ingest depends on ``${data.source}``: adding, removing or editing a file of a folder source makes
``dvc status`` name ``ingest`` and ``dvc repro`` rerun it, and then DVC reruns only the stages whose
inputs the new store changed; an unchanged source reruns nothing. With ``data.source: elpv`` the
dependency is the committed file ``./elpv`` (the pinned package version), so DVC never looks for a
folder called "elpv".
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import make_image, make_project

RAN = re.compile(r"Running stage '([^']+)'")


def dvc(project: Path, env: dict, *args: str, timeout: int = 900) -> str:
    """Run ``dvc <args>`` in ``project``; fail the test with its output when it fails."""
    result = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=project, env=env, capture_output=True,
                            text=True, timeout=timeout)
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"dvc {' '.join(args)} exited {result.returncode}:\n{output[-6000:]}"
    return output


def ran(output: str) -> list[str]:
    """The stages a ``dvc repro`` output says it ran (not those restored from DVC's run cache)."""
    return RAN.findall(output)


def status(project: Path, env: dict, *targets: str) -> dict[str, dict[str, str]]:
    """``dvc status --json --with-deps <targets>`` (the targets and the stages before them), as
    stage -> {changed path or reason: state}."""
    lines = [line for line in dvc(project, env, "status", "--json", "--with-deps", *targets).splitlines()
             if line.strip()]
    stale: dict[str, dict[str, str]] = {}
    for stage, changes in json.loads(lines[-1]).items():
        for change in changes:
            for kind, paths in (change.items() if isinstance(change, dict) else [(change, {})]):
                stale.setdefault(stage, {}).update(paths if isinstance(paths, dict) else {kind: kind})
    return stale


def kept(project: Path) -> int:
    """How many images the last ingest kept (its data report)."""
    return json.loads((project / "reports" / "ingest" / "data_report.json").read_text())["images_kept"]


@pytest.mark.slow
def test_folder_source_edits_rerun_ingest_and_then_only_what_the_store_changes(tmp_path, tiny_source,
                                                                               prefect_server, project_env):
    project = make_project(tmp_path / "project", tiny_source)
    env = {**project_env, "PREFECT_API_URL": prefect_server}
    source = str(tiny_source)

    # select depends on the source too (it splits it as ingest will); with the backbone and side pinned by
    # the tiny params it writes the same choice each time
    assert ran(dvc(project, env, "repro", "features")) == ["select", "ingest", "features"]
    assert status(project, env, "features") == {}
    assert ran(dvc(project, env, "repro", "features")) == []  # unchanged source: nothing reruns
    images = kept(project)

    # a file ingest rejects changes: ingest reruns (its input changed); the store is identical, so DVC
    # leaves features alone
    (tiny_source / "dark" / "broken.jpg").write_bytes(b"still not a jpeg, other bytes")
    assert status(project, env, "features") == {"select": {source: "modified"}, "ingest": {source: "modified"}}
    assert ran(dvc(project, env, "repro", "features")) == ["select", "ingest"]
    assert kept(project) == images
    assert status(project, env, "features") == {}

    # edit, add, remove an image. DVC names select and ingest after the edit (same names, other bytes: the
    # subtle one), and still after the others; one rerun then keeps what the three changes leave (one image
    # more, one less, one with a new digest), and DVC names features as stale because its input (the store)
    # changed -- asked of DVC rather than run, to keep the test short
    rng = np.random.default_rng(11)
    manifest = project / "data" / "store" / "manifest.csv"
    digest_of_edited = digests(manifest)["bright/bright_01.jpg"]
    changes = {
        "edit": lambda: make_image(tiny_source / "bright" / "bright_01.jpg", rng, bright=True),
        "add": lambda: make_image(tiny_source / "bright" / "bright_new.jpg", rng, bright=True),
        "remove": lambda: (tiny_source / "dark" / "dark_04.jpg").unlink(),
    }
    for name, change in changes.items():
        change()
        assert status(project, env, "ingest") == {"select": {source: "modified"}, "ingest": {source: "modified"}}, name
    assert ran(dvc(project, env, "repro", "ingest")) == ["select", "ingest"]
    assert kept(project) == images  # +1 -1
    found = digests(manifest)
    assert "bright/bright_new.jpg" in found and "dark/dark_04.jpg" not in found
    assert found["bright/bright_01.jpg"] != digest_of_edited
    assert status(project, env, "features") == {"features": {"data/store": "modified"}}
    assert ran(dvc(project, env, "repro", "ingest")) == []  # unchanged again: nothing reruns


def digests(manifest: Path) -> dict[str, str]:
    """``{relpath: sha256}`` of a store's manifest."""
    import pandas as pd

    frame = pd.read_csv(manifest)
    return dict(zip(frame["relpath"], frame["sha256"], strict=True))


def test_elpv_source_depends_on_the_pinned_package_file(tmp_path, tiny_source, project_env):
    """``data.source: elpv``: select's and ingest's dependency is ./elpv (valid for DVC); editing it reruns them."""
    project = make_project(tmp_path / "project", tiny_source, overrides={"data": {"source": "elpv"}})
    env = project_env
    found = status(project, env, "ingest")
    assert found["select"]["elpv"] == found["ingest"]["elpv"] == "modified"  # found (never run yet), not "deleted"
    dry = dvc(project, env, "repro", "--dry", "select")  # ingest's other input (data/selection.json) is select's
    assert ran(dry) == ["select"] and "bin/python -m flows.selection" in dry
    (project / "elpv").unlink()
    assert status(project, env, "ingest")["ingest"]["elpv"] == "deleted"
    result = subprocess.run([sys.executable, "-m", "dvc", "repro", "--dry", "select"], cwd=project, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode != 0 and "elpv" in result.stderr  # the file is what DVC checks
