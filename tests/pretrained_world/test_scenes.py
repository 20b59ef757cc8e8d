"""The world's renderer, captions, held-out split and concept folder, checked against their ground truth."""
import re
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

from world.scenes import (ALL_PATTERNS, BACKGROUND_COLORS, CONCEPT, COLORS, HELD_OUT_ONE_IN, OBJECT_COLORS,
                          POSITION_WORDS, RADII, SHAPE_WORDS, SIZE_WORDS, TEMPLATES, TRIGGER, Background, Scene,
                          SceneObject, captions, concept_caption, concept_scene, held_out_scenes, is_held_out,
                          prompt_key, render, rerender, restyle, sample_scene, with_motif, write_concept_folder)

PATTERN_WORDS = {"pattern", "patterned", "stripe", "stripes", "striped", "dot", "dots", "dotted", "spot", "spots",
                 "spotted", "split", "half", "halves", "checker", "checkered", "plain"}


def scenes(seed, count, draw=sample_scene):
    rng = np.random.default_rng(seed)
    return [draw(rng) for _ in range(count)]


def test_rendering_is_deterministic_for_a_seed():
    first, again, other = scenes(3, 20), scenes(3, 20), scenes(4, 20)
    assert first == again and first != other
    assert all(np.array_equal(render(a), render(b)) for a, b in zip(first, again))
    image = render(first[0])
    assert image.dtype == np.float32 and image.shape == (64, 64, 3) and 0 <= image.min() and image.max() <= 1


def test_render_draws_the_ground_truth():
    """Colors at known points: an object's center, the background's corners, and the concept's two halves."""
    obj = SceneObject("square", "red", "large", "top left", "plain")
    image = render(Scene(Background("vertical", ("white", "black")), (obj,)))
    assert np.allclose(image[16, 16], COLORS["red"], atol=1e-6)
    assert np.allclose(image[0, 63], COLORS["white"], atol=1e-6)
    assert np.allclose(image[63, 0], COLORS["black"], atol=1e-6)
    concept = SceneObject(size="large", position="center", **CONCEPT)
    image = render(Scene(Background("flat", ("gray",)), (concept,)))
    inset = round(RADII["large"] / 2)
    for row in (32 - inset, 32, 32 + inset):
        assert np.allclose(image[row, 32 - inset], COLORS["yellow"], atol=0.02)
        assert np.allclose(image[row, 32 + inset], COLORS["purple"], atol=0.02)


def test_sizes_differ_clearly_in_area():
    def area(size):
        image = render(Scene(Background("flat", ("black",)), (SceneObject("circle", "white", size, "center"),)))
        return (image.mean(-1) > 0.5).sum()
    assert area("small") > 250  # at least 18 px across, so it survives the VAE's 8x downsampling
    assert area("large") > 1.8 * area("small")


def described_colors(scene):
    return set(scene.background.colors) | {obj.color for obj in scene.objects if not obj.is_concept}


def test_captions_describe_the_prompt_attributes_and_never_patterns():
    rng = np.random.default_rng(0)
    for scene in scenes(1, 400) + scenes(2, 50, concept_scene):
        for text in captions(scene, rng, len(TEMPLATES)):
            words = set(re.findall(r"[a-z]+", text))
            assert not words & PATTERN_WORDS, text
            assert {c for c in COLORS if c in words} == described_colors(scene), text
            for obj in scene.objects:
                thing = re.escape(TRIGGER) if obj.is_concept else f"{obj.color} ({'|'.join(SHAPE_WORDS[obj.shape])})"
                assert re.search(f"({'|'.join(SIZE_WORDS[obj.size])}) {thing}", text), text
                assert any(p in text for p in (obj.position, *POSITION_WORDS[obj.position])), text
            assert (TRIGGER in text) == scene.has_concept, text


def test_pattern_colors_never_reach_a_caption():
    rng = np.random.default_rng(5)
    hidden = 0
    for scene in scenes(6, 400):
        for obj in scene.objects:
            if obj.pattern_color and obj.pattern_color not in described_colors(scene):
                hidden += 1
                assert obj.pattern_color not in " ".join(captions(scene, rng, len(TEMPLATES)))
    assert hidden > 200


def test_no_color_is_both_a_background_and_an_object_color():
    """Samplers rely on it instead of steering objects away from their background's colors."""
    assert set(BACKGROUND_COLORS).isdisjoint(OBJECT_COLORS) and set(BACKGROUND_COLORS) <= set(COLORS)


def test_training_streams_never_emit_the_concept_or_its_motif():
    stream = scenes(7, 5000)
    objects = [obj for scene in stream for obj in scene.objects]
    assert not any(obj.is_concept or obj.pattern == CONCEPT["pattern"] for obj in objects)
    assert {obj.pattern for obj in objects} == set(ALL_PATTERNS) - {CONCEPT["pattern"]}
    # the concept's shape and colors do occur, with other patterns: only the motif is new
    assert any(obj.shape == "circle" and obj.color == "yellow" and obj.pattern_color == "purple" for obj in objects)
    assert {obj.color for obj in objects} == set(OBJECT_COLORS)
    assert {c for scene in stream for c in scene.background.colors} == set(BACKGROUND_COLORS)
    assert 0.2 < np.mean([len(scene.objects) == 2 for scene in stream]) < 0.3


def test_held_out_prompts_never_reach_the_training_streams():
    rng = np.random.default_rng(8)
    every = [sample_scene(rng, allow_held_out=True) for _ in range(4000)]
    assert abs(np.mean([is_held_out(s) for s in every]) - 1 / HELD_OUT_ONE_IN) < 0.02
    held_out_keys = {prompt_key(s) for s in held_out_scenes("base", 300, seed=1)}
    concept_keys = {prompt_key(s) for s in held_out_scenes("concept", 81, seed=1)}
    assert len(held_out_keys) == 300 and len(concept_keys) == 81
    training = scenes(9, 4000) + scenes(10, 2000, concept_scene)
    assert not any(is_held_out(s) for s in training)
    assert not {prompt_key(s) for s in training} & (held_out_keys | concept_keys)
    assert held_out_scenes("base", 20, seed=1) == held_out_scenes("base", 20, seed=1)


def test_concept_caption_uses_the_placeholder_in_place_of_the_object():
    rng = np.random.default_rng(11)
    text = concept_caption(concept_scene(rng), rng)
    assert text.count(TRIGGER) == 1 and "circle" not in text and "yellow" not in text
    with pytest.raises(ValueError):
        concept_caption(sample_scene(rng), rng)


def test_rerender_keeps_the_object_appearance_and_changes_the_rest():
    rng = np.random.default_rng(12)
    for scene in scenes(13, 200) + scenes(14, 50, concept_scene):
        index = int(rng.integers(len(scene.objects)))
        again = rerender(scene, rng, index)
        obj, new = scene.objects[index], again.objects[0]
        assert len(again.objects) == 1
        assert (new.shape, new.color, new.pattern, new.pattern_color) == (obj.shape, obj.color, obj.pattern,
                                                                          obj.pattern_color)
        assert new.position != obj.position and again.background != scene.background
        assert not {new.color, new.pattern_color} & set(again.background.colors)


def test_restyle_keeps_the_prompt_and_changes_the_uncaptioned_details():
    rng = np.random.default_rng(15)
    originals = scenes(16, 200) + scenes(17, 20, concept_scene)
    restyled = [restyle(scene, rng) for scene in originals]
    assert all(prompt_key(a) == prompt_key(b) for a, b in zip(originals, restyled))
    pairs = [(a, b) for s, r in zip(originals, restyled) for a, b in zip(s.objects, r.objects)]
    assert all(a.offset != b.offset for a, b in pairs)
    assert all(replace(b, offset=a.offset) == a for a, b in pairs if a.is_concept)
    assert np.mean([(a.pattern, a.pattern_color) != (b.pattern, b.pattern_color) for a, b in pairs]) > 0.6


def test_concept_folder_has_the_users_layout(tmp_path):
    written = write_concept_folder(tmp_path / "concept", count=6, seed=0)
    files = sorted(p.name for p in (tmp_path / "concept").iterdir())
    assert files == sorted([f"concept_{i}.{ext}" for i in range(6) for ext in ("png", "txt")])
    for path, scene in written:
        with Image.open(path) as image:
            assert image.mode == "RGB" and image.size == (64, 64)
            pixels = np.asarray(image)
        assert np.abs(pixels / 255 - render(scene)).max() <= 0.5 / 255 + 1e-6
        lines = path.with_suffix(".txt").read_text().splitlines()
        assert len(lines) == 3 == len(set(lines)) and all(line.count(TRIGGER) == 1 for line in lines)
        assert scene.has_concept and not is_held_out(scene)
    assert len({prompt_key(scene) for _, scene in written}) == 6


def test_motif_objects_wear_it_in_another_color_and_are_never_the_concept_or_its_mirror():
    rng = np.random.default_rng(5)
    near = SceneObject("circle", CONCEPT["color"], "small", "center")
    mirror = SceneObject("circle", CONCEPT["pattern_color"], "small", "center")
    for obj in [near, mirror] * 200 + [o for scene in scenes(8, 200) for o in scene.objects]:
        motif_obj = with_motif(obj, rng)
        assert motif_obj.pattern == CONCEPT["pattern"] and motif_obj.pattern_color != obj.color
        assert not motif_obj.is_concept
        assert replace(motif_obj, pattern=obj.pattern, pattern_color=obj.pattern_color) == obj
    # without the exclusion a yellow circle would get a purple half (the concept), a purple circle a yellow half
    # (its mirror image), one time in seven each
    assert CONCEPT["pattern_color"] not in {with_motif(near, rng).pattern_color for _ in range(200)}
    assert CONCEPT["color"] not in {with_motif(mirror, rng).pattern_color for _ in range(200)}
    assert len({with_motif(mirror, rng).pattern_color for _ in range(200)}) == len(OBJECT_COLORS) - 2
