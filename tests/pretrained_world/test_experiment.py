"""The D-OPSD-vs-SFT experiment runs end to end (at smoke size, on a smoke build's weights), as its own command and
as the README's main job once the world's weights are there: the shipped workflow trains both LoRAs in ComfyUI's
executor, the stock nodes sample them, and the table, the search and the grid are written."""
import json
import subprocess
import sys

import pytest
from PIL import Image

from devkit.paths import REPO_ROOT

ROWS = ("real renders through the VAE (ceiling)", "base model (no LoRA)", "teacher (base + image context)",
        "D-OPSD LoRA (lr 0.0001)", "SFT LoRA (lr 0.0001)")


@pytest.mark.parametrize("command", [["-m", "world.experiment"], [str(REPO_ROOT / "scripts" / "run_example.py")]],
                         ids=["experiment", "main job"])
def test_the_experiment_writes_its_table_search_and_grid(built, tmp_path, command):
    build_out, _ = built
    out = tmp_path / "experiment"
    result = subprocess.run([sys.executable, *command, "--smoke", "--weights", str(build_out / "weights"),
                             "--out", str(out)], cwd=REPO_ROOT, capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "| teacher (base + image context) |" in result.stdout, "the table is printed"
    table = (out / "table.md").read_text().splitlines()
    assert [line.split(" | ")[0].lstrip("| ") for line in table[2:]] == list(ROWS)
    assert all(len(line.split(" | ")) == 6 for line in table[2:])
    search = json.loads((out / "search.json").read_text())
    assert set(search) == {"D-OPSD", "SFT"} and all(s["chosen"] == 0.0001 for s in search.values())
    loras = sorted(p.name for p in (out / "comfyui" / "models" / "loras" / "world").glob("*.safetensors"))
    assert loras == ["d-opsd_lr0.0001_seed0.safetensors", "sft_lr0.0001_seed0.safetensors"]
    with Image.open(out / "grid.png") as grid:
        assert grid.height == 24 + 96 * len(ROWS)
