"""scripts/provision.sh installs the browser only when it is missing, and says so in one line when apt fails."""
from __future__ import annotations

import os
import subprocess

import pytest

from devkit.paths import REPO_ROOT

SCRIPT = REPO_ROOT / "scripts" / "provision.sh"


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="the apt-get path runs as root only")
def test_unreachable_debian_registry_gives_one_clear_line(tmp_path):
    # A PATH with every tool of this machine except chromium/chromedriver, and an apt-get that cannot reach
    # its registry.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for folder in ("/usr/local/bin", "/usr/bin", "/bin"):
        for tool in os.listdir(folder) if os.path.isdir(folder) else ():
            if tool not in ("chromium", "chromedriver", "apt-get") and not (bin_dir / tool).exists():
                (bin_dir / tool).symlink_to(os.path.join(folder, tool))
    apt = bin_dir / "apt-get"
    apt.write_text("#!/bin/sh\necho 'E: Failed to fetch http://deb.invalid/ Could not resolve host' >&2\nexit 100\n")
    apt.chmod(0o755)
    result = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PATH": str(bin_dir)})
    assert result.returncode == 1, result.stdout + result.stderr
    [error] = [line for line in result.stderr.splitlines() if line.startswith("provision: ERROR:")]
    assert "could not install chromium and chromium-driver" in error and "Debian package registry" in error
    assert "Traceback" not in result.stdout + result.stderr
