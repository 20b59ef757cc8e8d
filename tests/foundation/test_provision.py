"""scripts/provision.sh: a re-run is a no-op, and an unreachable registry gives a clear message, not a traceback."""
from __future__ import annotations

import os
import subprocess

from tests.harness.paths import REPO_ROOT

SCRIPT = REPO_ROOT / "scripts" / "provision.sh"


def run_provision(**env) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **env})


def test_second_run_is_a_no_op():
    log = REPO_ROOT / ".venv-provision.log"
    log_state = log.stat().st_mtime_ns if log.exists() else None
    result = run_provision()
    assert result.returncode == 0, result.stderr
    assert "environment is up to date" in result.stdout
    assert (log.stat().st_mtime_ns if log.exists() else None) == log_state, "pip ran again"


def test_unreachable_registry_fails_with_a_clear_message(tmp_path):
    # No pip config (so no local wheel store either) and an index on a closed loopback port.
    result = run_provision(DOPSD_VENV=str(tmp_path / "venv"), PIP_CONFIG_FILE=os.devnull,
                           PIP_INDEX_URL="http://127.0.0.1:9/simple", PIP_RETRIES="0")
    assert result.returncode == 1
    assert "provision: ERROR: could not install the pinned packages" in result.stderr
    assert "Is the package registry (PyPI) reachable" in result.stderr
    assert "Traceback" not in result.stdout + result.stderr
