"""The suite's environment is hermetic: a user's tool variables never reach a test (tests/conftest.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO, UNSET_PREFIXES, hermetic_env

PROBE = '''
import os


def test_environment():
    leaked = {k: v for k, v in os.environ.items() if "bogus" in v}
    assert not leaked, leaked
    for key in ("PREFECT_HOME", "DVC_SITE_CACHE_DIR", "MPLCONFIGDIR", "TLPIPE_CACHE_DIR", "KERAS_HOME"):
        assert os.environ[key].startswith(os.environ["PROBE_TMP"]), key
'''


def test_a_users_tool_variables_never_reach_a_test(tmp_path: Path) -> None:
    """A child pytest with this suite's conftest, started from a shell full of the user's own settings."""
    probe = tmp_path / "test_probe.py"
    probe.write_text(PROBE)
    polluted = {"TLPIPE_DASK_SCHEDULER": "tcp://bogus:8786", "MLFLOW_TRACKING_URI": "http://bogus:5000",
                "PREFECT_API_URL": "http://bogus:4200/api", "PREFECT_PROFILE": "bogus",
                "DVC_SITE_CACHE_DIR": "/bogus/dvc", "PREFECT_HOME": "/bogus/prefect",
                "MPLCONFIGDIR": "/bogus/mpl", "KERAS_BACKEND": "bogus", "TLPIPE_ROOT": "/bogus/project"}
    import tempfile

    env = {**os.environ, **polluted, "PROBE_TMP": tempfile.gettempdir()}  # where the session folder must be
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "tests.conftest",
                             "--rootdir", str(tmp_path), "-c", os.devnull, str(probe)],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def test_the_suites_own_settings_are_the_only_tool_variables_here() -> None:
    """In this very process: every TLPIPE_/MLFLOW_/PREFECT_/DVC_/... variable is one the suite set."""
    own = set(hermetic_env(Path("unused")))
    strays = sorted(key for key in os.environ if key.startswith(UNSET_PREFIXES) and key not in own)
    assert not strays, strays
