"""The world's builder run as its command, at smoke size."""
import subprocess
import sys

from devkit.paths import REPO_ROOT

# Every stage of the builder for a moment: the real build's sizes are in world/builder.py.
SMOKE = ["--steps", "2", "--examples", "24", "--batches", "1", "--batch-size", "2"]


def build(out, *args):
    return subprocess.run([sys.executable, "-m", "world.builder", "--out", str(out), "--weights", str(out / "weights"),
                           *SMOKE, *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=900)
