"""The committed evaluator on real renders of held-out prompts: attributes, concept, sharpness, Fréchet distance."""
import numpy as np
import pytest
import torch

from world.evaluators import (ATTRIBUTES, WEIGHTS_DIR, concept_probability, evaluate, frechet_distance,
                              gaussian_blur, near_miss_scene, sharpness)
from world.manifest import verify_manifest, write_manifest
from world.scenes import held_out_scenes, render_batch, restyle

COUNT = 300


@pytest.fixture(scope="module")
def base():
    """Held-out base prompts with their real renders, and other real renders of the same prompts (other patterns,
    second colors and offsets)."""
    scenes = held_out_scenes("base", COUNT, seed=101)
    rng = np.random.default_rng(202)
    return scenes, render_batch(scenes), render_batch([restyle(scene, rng) for scene in scenes])


@pytest.fixture(scope="module")
def concept():
    scenes = held_out_scenes("concept", 81, seed=101)
    return scenes, render_batch(scenes)


def test_manifest_lists_the_committed_weights_and_catches_a_changed_file(tmp_path):
    verify_manifest(WEIGHTS_DIR)
    assert (WEIGHTS_DIR / "evaluator.safetensors").stat().st_size < 2_000_000
    (tmp_path / "a.bin").write_bytes(b"weights")
    write_manifest(tmp_path)
    verify_manifest(tmp_path)
    (tmp_path / "a.bin").write_bytes(b"weightz")
    with pytest.raises(ValueError, match="a.bin: sha256 differs"):
        verify_manifest(tmp_path)
    (tmp_path / "b.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="b.bin: not in the manifest"):
        verify_manifest(tmp_path)


def test_attributes_of_real_renders_are_read_correctly(evaluator, base, concept):
    scenes, images, others = base
    accuracy = evaluate(images, scenes, others, evaluator)["attribute_accuracy"]
    assert min(accuracy[name] for name in ATTRIBUTES) >= 0.95, accuracy
    concept_scenes, concept_images = concept
    accuracy = evaluate(concept_images, concept_scenes, concept_images, evaluator)["attribute_accuracy"]
    assert min(accuracy[name] for name in ATTRIBUTES) >= 0.95, accuracy
    # a softer image still shows what it shows: blur is the sharpness metric's business
    accuracy = evaluate(gaussian_blur(images, 1.0), scenes, others, evaluator)["attribute_accuracy"]
    assert min(accuracy[name] for name in ATTRIBUTES) >= 0.95, accuracy


def share_of_commonest(values) -> float:
    return max(values.count(v) for v in set(values)) / len(values)


def test_attributes_of_noise_are_near_chance(evaluator, base):
    """On uniform noise no attribute beats always answering its commonest value by more than 0.1."""
    scenes, images, _ = base
    noise = np.random.default_rng(0).random(images.shape, dtype=np.float32)
    accuracy = evaluate(noise, scenes, images, evaluator)["attribute_accuracy"]
    objects = [obj for scene in scenes for obj in scene.objects]
    chance = {name: share_of_commonest([getattr(obj, name) for obj in objects])
              for name in ("shape", "color", "size", "position")}
    chance |= {"background": share_of_commonest([scene.background for scene in scenes]),
               "count": share_of_commonest([len(scene.objects) for scene in scenes])}
    assert all(accuracy[name] <= chance[name] + 0.1 for name in chance), (accuracy, chance)


def test_concept_fidelity_keys_on_the_concept_motif(evaluator, base, concept):
    scenes, images, _ = base
    concept_scenes, concept_images = concept
    rng = np.random.default_rng(5)
    near_misses = [near_miss_scene(rng) for _ in range(200)]
    on_concept = concept_probability(evaluator.outputs(concept_images))
    on_base = concept_probability(evaluator.outputs(images))
    on_near_misses = concept_probability(evaluator.outputs(render_batch(near_misses)))
    assert on_concept.mean() > 0.95 and np.mean(on_concept > 0.5) > 0.95
    assert on_base.mean() < 0.02 and on_near_misses.mean() < 0.05 and np.mean(on_near_misses > 0.5) < 0.03
    noise = np.random.default_rng(2).random(concept_images.shape, dtype=np.float32)
    assert concept_probability(evaluator.outputs(noise)).mean() < 0.2
    # still there when blurred a little, as a few-step model's output may be
    assert concept_probability(evaluator.outputs(gaussian_blur(concept_images, 0.7))).mean() > 0.8


def test_sharpness_drops_for_blurred_renders(base):
    scenes, images, others = base
    assert 0.85 < sharpness(others, images) < 1.15
    assert sharpness(gaussian_blur(images, 0.7), images) < 0.5
    assert sharpness(gaussian_blur(images, 1.5), images) < 0.1


def test_frechet_distance_separates_real_from_degraded(evaluator, base):
    scenes, images, others = base
    features = evaluator.outputs(images)["features"]
    real = frechet_distance(evaluator.outputs(others)["features"], features)
    slightly_blurred, blurred = (frechet_distance(evaluator.outputs(gaussian_blur(others, sigma))["features"], features)
                                 for sigma in (1.0, 1.5))
    noise = np.random.default_rng(1).random(images.shape, dtype=np.float32)
    noisy = frechet_distance(evaluator.outputs(noise)["features"], features)
    # measured with the committed weights: about 34, 76, 178 and 43000
    assert 1.5 * real < slightly_blurred and 4 * real < blurred and 20 * blurred < noisy, (real, slightly_blurred,
                                                                                          blurred, noisy)
    assert frechet_distance(features, features) == pytest.approx(0, abs=1e-3)


def test_evaluate_takes_comfyui_image_tensors(evaluator, base):
    scenes, images, others = base
    result = evaluate(torch.from_numpy(images[:40]), scenes[:40], torch.from_numpy(others[:40]), evaluator)
    assert set(result) == {"attribute_accuracy", "concept_fidelity", "sharpness", "frechet_distance"}
    assert set(result["attribute_accuracy"]) == {*ATTRIBUTES, "all"}
    with pytest.raises(ValueError, match="expected"):
        evaluate(images[:, :32], scenes, others, evaluator)
