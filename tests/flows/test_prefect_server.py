"""The project's own Prefect server (real ``prefect server start``): started once, reused, one line per user error.

No test harness here: this is what a user's plain ``dvc repro`` does (``TLPIPE_PREFECT_SERVER=auto``,
``PREFECT_API_URL`` unset). Every server this test starts is stopped at the end.
"""

from __future__ import annotations

import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.conftest import make_project
from tlpipe.ops import prefect_server

ENSURE = "import sys; from tlpipe.ops.prefect_server import ensure_server; print(ensure_server(sys.argv[1]))"


def server_processes(home: Path) -> list[int]:
    """Pids of `prefect server start` processes whose PREFECT_HOME is ``home``."""
    import psutil

    found = []
    for process in psutil.process_iter(["pid", "cmdline"]):
        try:
            if "server" in (process.info["cmdline"] or []) and process.environ().get("PREFECT_HOME") == str(home):
                found.append(process.info["pid"])
        except psutil.Error:
            continue
    return found


@pytest.mark.slow
def test_stages_start_one_project_server_and_report_user_errors_in_one_line(tmp_path, tiny_source, project_env):
    project = make_project(tmp_path / "srvproj", tiny_source)
    env = {key: value for key, value in project_env.items() if key != "PREFECT_API_URL"}
    env.update({"TLPIPE_PREFECT_SERVER": "auto", "TLPIPE_PREFECT_PORT": "0"})  # 0: any free port
    home = project / ".prefect"
    try:
        # two processes asking at once start one server (the start lock) and get the same URL
        ensure = [sys.executable, "-c", ENSURE, str(project)]
        with ThreadPoolExecutor(2) as pool:
            done = list(pool.map(lambda _: subprocess.run(ensure, env=env, capture_output=True, text=True,
                                                          timeout=400), range(2)))
        assert all(d.returncode == 0 for d in done), [d.stderr[-2000:] for d in done]
        urls = {d.stdout.strip() for d in done}
        assert len(urls) == 1 and prefect_server.is_healthy(urls.pop())
        assert len(server_processes(home)) == 1
        info = json.loads((home / "server.json").read_text())
        # its UI calls its own API (on a free port, not Prefect's default 4200, where another server may be)
        import urllib.request

        with urllib.request.urlopen(info["url"].removesuffix("/api") + "/ui-settings", timeout=30) as response:
            assert json.loads(response.read())["api_url"] == info["url"]

        # a params typo under plain `dvc repro`: the stage prints one line, reports to the same server
        params = project / "params.yaml"
        params.write_text(params.read_text().replace("  image_size: 32", "  image_sise: 32"))
        repro = subprocess.run([sys.executable, "-m", "dvc", "repro"], cwd=project, env=env, capture_output=True,
                               text=True, timeout=600)
        assert repro.returncode != 0
        output = repro.stdout + repro.stderr
        assert "Traceback" not in output, output
        errors = [line for line in output.splitlines() if "error" in line.lower()]
        assert errors[0] == f"tlpipe select: error: invalid {params}: data.image_sise: unknown key", output
        assert errors[1].startswith("ERROR: failed to reproduce 'select'") and len(errors) == 2, output
        assert server_processes(home) == [info["pid"]]  # reused, not a second server

        from prefect.client.orchestration import get_client
        from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterTags
        from prefect.settings import PREFECT_API_URL, temporary_settings

        with temporary_settings({PREFECT_API_URL: info["url"]}), get_client(sync_client=True) as client:
            runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(
                tags=FlowRunFilterTags(all_=["tlpipe", "project:srvproj"])))
        assert [run.state.type.value for run in runs] == ["FAILED"]  # the run is kept by the project's server

        # `tlpipe prefect-server stop` stops it; status then says so
        tlpipe = [sys.executable, "-m", "flows.cli", "prefect-server"]
        stopped = subprocess.run([*tlpipe, "stop", "--root", str(project)], env=env, capture_output=True,
                                 text=True, timeout=120)
        assert stopped.returncode == 0 and "stopped" in stopped.stdout, stopped.stderr
        assert server_processes(home) == []
        status = subprocess.run([*tlpipe, "status", "--root", str(project)], env=env, capture_output=True,
                                text=True, timeout=120)
        assert status.returncode == 1 and "not running" in status.stderr
    finally:
        prefect_server.stop_server(project)
        for pid in server_processes(home):
            prefect_server.stop_process_group(pid)
