"""The probe's word swaps change one attribute's words and nothing else, and the probe runs on a build."""
import re
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest

from devkit.paths import REPO_ROOT

from world.probe import swapped_caption
from world.scenes import BACKGROUND_COLORS, SHAPE_WORDS, SIZE_WORDS, caption, held_out_scenes


@pytest.fixture(scope="module")
def one_object_scenes():
    return [scene for scene in held_out_scenes("base", 120, seed=3) if len(scene.objects) == 1][:40]


def test_color_swaps_match_the_caption_of_the_recolored_scene(one_object_scenes):
    for index, scene in enumerate(one_object_scenes):
        prompt = caption(scene, np.random.default_rng(index))
        obj = scene.objects[0]
        recolored = swapped_caption(prompt, scene, "object color")
        new_color = recolored.split()[[w.strip(",") for w in prompt.split()].index(obj.color)]
        assert new_color != obj.color
        assert recolored == caption(replace(scene, objects=(replace(obj, color=new_color),)),
                                    np.random.default_rng(index))
        background = swapped_caption(prompt, scene, "background color")
        first, *rest = scene.background.colors
        new_first = next(c for c in BACKGROUND_COLORS if c not in scene.background.colors)
        assert background == caption(replace(scene, background=replace(scene.background, colors=(new_first, *rest))),
                                     np.random.default_rng(index))


@pytest.mark.parametrize("attribute, words", [("shape", SHAPE_WORDS), ("size", SIZE_WORDS)])
def test_shape_and_size_swaps_replace_one_word(one_object_scenes, attribute, words):
    for index, scene in enumerate(one_object_scenes):
        prompt = caption(scene, np.random.default_rng(index))
        swapped = swapped_caption(prompt, scene, attribute)
        value = getattr(scene.objects[0], attribute)
        old = [w.strip(",") for w in prompt.replace("plus sign", "plus_sign").split()]
        new = [w.strip(",") for w in swapped.replace("plus sign", "plus_sign").split()]
        changed = [(a, b) for a, b in zip(old, new) if a != b]
        assert len(old) == len(new) and len(changed) == 1, (prompt, swapped)
        (was, now), = changed
        assert was.replace("_", " ") in words[value]
        assert any(now.replace("_", " ") in options for key, options in words.items() if key != value)


def test_the_probe_measures_a_build(built):
    """On the smoke build: every section prints, and the reliance figures are numbers."""
    out, _ = built
    result = subprocess.run([sys.executable, "-m", "world.probe", "--out", str(out), "--prompts", "2"], cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "with the image" in result.stdout and "concept probability" in result.stdout
    words = re.search(r"word reliance .*: object color ([-+][\d.]+)%", result.stdout)
    image = re.search(r"image reliance .*: ([-+][\d.]+)%", result.stdout)
    assert words and image, result.stdout
    assert (out / "probe.png").exists()
