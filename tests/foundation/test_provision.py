"""scripts/provision.sh: a re-run is a no-op, and an unreachable registry gives a clear message, not a traceback.

Run for the ComfyUI release under test (DOPSD_COMFY_VERSION, which scripts/test.sh sets): its own venv and log."""
from __future__ import annotations

import os
import subprocess

from devkit.paths import REPO_ROOT, comfy_version

SCRIPT = REPO_ROOT / "scripts" / "provision.sh"
# The venv variable and default venv of each release (scripts/comfy_versions.sh).
VENV_OF = {"0.3.75": ("DOPSD_VENV", REPO_ROOT / ".venv"), "0.33": ("DOPSD_VENV_COMFY033", REPO_ROOT / ".venv-comfy033")}


def run_provision(*args, **env) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), "--comfy", comfy_version(), *args], capture_output=True, text=True,
                          timeout=300, env={**os.environ, **env})


def test_second_run_is_a_no_op():
    variable, default = VENV_OF[comfy_version()]
    log = REPO_ROOT / f"{os.environ.get(variable, default)}-provision.log"
    log_state = log.stat().st_mtime_ns if log.exists() else None
    result = run_provision()
    assert result.returncode == 0, result.stderr
    assert "environment is up to date" in result.stdout
    assert (log.stat().st_mtime_ns if log.exists() else None) == log_state, "pip ran again"


def test_unreachable_registry_fails_with_a_clear_message(tmp_path):
    # No pip config (so no local wheel store either) and an index on a closed loopback port.
    variable, _ = VENV_OF[comfy_version()]
    result = run_provision(**{variable: str(tmp_path / "venv")}, PIP_CONFIG_FILE=os.devnull,
                           PIP_INDEX_URL="http://127.0.0.1:9/simple", PIP_RETRIES="0")
    assert result.returncode == 1
    assert "provision: ERROR: could not install the pinned packages" in result.stderr
    assert "Is the package registry (PyPI) reachable" in result.stderr
    assert "Traceback" not in result.stdout + result.stderr


def test_unknown_version_is_refused_with_the_tested_ones():
    result = subprocess.run(["bash", str(SCRIPT), "--comfy", "0.2"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert "0.3.75 0.33" in result.stderr and "Traceback" not in result.stderr
