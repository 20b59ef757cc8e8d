"""The world's builder still runs every stage (for a moment each), writes what ComfyUI's loaders read, and resumes
an interrupted stage. The real build's sizes are in world/builder.py; this runs its command as a user would."""
import re
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from tests.pretrained_world.world_build import build
from world.builder import (MADE_UP_WORDS, OBJECT_LOSS_WEIGHT, corpus_example, flow_matching_loss, latent_coverage,
                           load_world_dit)
from world.manifest import MANIFEST, verify_manifest
from world.models import (DIT_LAYERS, VISION_CONFIG, WEIGHT_FILES, initial_dit_state_dict, text_encoder_state_dict,
                          vision_tensors, world_is_built)
from world.resumable import train_resumably
from world.scenes import CONCEPT, RADII, SHAPE_WORDS, Background, Scene, SceneObject, render


def test_every_stage_runs_and_writes_its_output(built):
    out, log = built
    for stage in ("vae", "corpus", "pretrain", "trajectories", "distill", "export"):
        assert f"[{stage}] done" in log
    vae = load_file(out / "vae" / "vae.safetensors")
    assert vae["encoder.conv_out.weight"].shape[0] == 2 * 16 and vae["decoder.conv_in.weight"].shape[1] == 16
    pretrained = load_file(out / "pretrain" / "dit.safetensors")
    distilled = load_file(out / "distill" / "dit.safetensors")
    assert pretrained.keys() == distilled.keys() and "cap_embedder.1.weight" in pretrained
    # trained: the output layer left its zero start
    assert pretrained["final_layer.linear.weight"].abs().sum() > 0
    shard = torch.load(out / "corpus" / "shard_000.pt", weights_only=True)
    assert shard["latents"].shape == (24, 16, 8, 8)
    assert shard["object_cover"].shape == (24, 8, 8) and 0 < shard["object_cover"].mean() < 0.5
    kinds = set(shard["kinds"])
    assert kinds == {"text", "context"}
    widths = {f.shape[1] for f in shard["features"]}
    assert widths == {32}
    context_lengths = [f.shape[0] for f, kind in zip(shard["features"], shard["kinds"]) if kind == "context"]
    assert min(context_lengths) > 64, "the teacher's features hold the 64 image tokens and the caption"
    trajectory = torch.load(out / "trajectories" / "batch_000.pt", weights_only=True)
    assert trajectory["states"].shape[0] == 9 and trajectory["sigmas"][0] == 1.0 and trajectory["sigmas"][-1] == 0


def test_export_writes_the_shipped_files_with_their_manifest(built):
    out, _ = built
    weights = out / "weights"
    verify_manifest(weights)
    assert sorted(p.name for p in weights.iterdir()) == sorted([MANIFEST, *WEIGHT_FILES])
    shipped, distilled = load_file(weights / "dit.safetensors"), load_file(out / "distill" / "dit.safetensors")
    assert all(v.dtype == torch.bfloat16 for v in shipped.values())
    assert all(torch.equal(shipped[k], distilled[k].to(torch.bfloat16)) for k in distilled)
    assert sum(p.stat().st_size for p in weights.iterdir()) < 38_000_000, "with the evaluator, at most 40 MB"


def test_exported_weights_count_as_built_and_damaged_ones_are_refused(built, tmp_path):
    out, _ = built
    assert world_is_built(out / "weights")
    assert not world_is_built(tmp_path), "an empty folder: the world is not built yet"
    damaged = shutil.copytree(out / "weights", tmp_path / "damaged")
    with open(damaged / "vae.safetensors", "r+b") as file:
        file.seek(-4, 2)
        file.write(b"\0\0\0\0")
    with pytest.raises(ValueError, match="vae.safetensors: sha256 differs"):
        world_is_built(damaged)
    (damaged / "text_encoder.safetensors").unlink()
    with pytest.raises(ValueError, match="incomplete, missing text_encoder.safetensors"):
        world_is_built(damaged)
    (damaged / "dit.safetensors").unlink()
    assert not world_is_built(damaged), "the shipped VAE without the DiT (built last): not built yet"


def test_the_untrained_dit_starts_with_unit_query_key_norms_and_a_zero_output():
    """Norm weights above one made the first pretraining's attention nearly one-hot and its learning ten times
    slower (world/models.py)."""
    start = initial_dit_state_dict()
    norms = [v for k, v in start.items() if k.endswith(("q_norm.weight", "k_norm.weight"))]
    assert len(norms) == 2 * (DIT_LAYERS + 4), "every block's query and key norm, refiners included"
    assert all(torch.equal(v, torch.ones_like(v)) for v in norms)
    assert not start["final_layer.linear.weight"].any() and not start["final_layer.linear.bias"].any()


def test_a_finished_stage_is_not_redone(built):
    out, _ = built
    before = (out / "distill" / "dit.safetensors").stat().st_mtime_ns
    result = build(out, "distill")
    assert result.returncode == 0 and (out / "distill" / "dit.safetensors").stat().st_mtime_ns == before


def test_a_stage_out_of_time_stops_checkpointed_and_the_next_run_finishes_it(built):
    out, _ = built
    again = ["--out", str(out / "again"), "--weights", str(out / "again" / "weights"), "--steps", "3"]
    result = build(out, "encoders", "vae", *again, "--minutes", "0")
    assert result.returncode == 3 and "run the same command again" in result.stdout
    assert (out / "again" / "vae" / "checkpoint_a.pt").exists() and not (out / "again" / "vae" / "vae.safetensors").exists()
    result = build(out, "vae", *again)
    assert result.returncode == 0 and "resumed at step 1/3" in result.stdout


def test_the_vae_stage_takes_the_shipped_vae_and_refuses_a_damaged_one(built, tmp_path):
    out, _ = built
    shipped = shutil.copytree(out / "weights", tmp_path / "weights")
    result = build(tmp_path / "fresh", "encoders", "vae", "--weights", str(shipped))
    assert result.returncode == 0 and "the shipped" in result.stdout, result.stdout + result.stderr
    assert (tmp_path / "fresh" / "vae" / "vae.safetensors").read_bytes() == (shipped / "vae.safetensors").read_bytes()
    assert not (tmp_path / "fresh" / "vae" / "checkpoint_a.pt").exists(), "not trained again"
    with open(shipped / "vae.safetensors", "r+b") as file:
        file.seek(-4, 2)
        file.write(b"\0\0\0\0")
    result = build(tmp_path / "other", "encoders", "vae", "--weights", str(shipped))
    assert result.returncode != 0 and "vae.safetensors: sha256 differs" in result.stderr
    assert not (tmp_path / "other" / "vae" / "vae.safetensors").exists()


def test_a_resumed_loop_ends_with_the_weights_of_an_unbroken_one(tmp_path):
    def run(checkpoint, minutes):
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 2)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)

        def step(index, rng):
            x = torch.from_numpy(rng.standard_normal((8, 4)).astype(np.float32)) + torch.randn(8, 4)
            loss = model(x).pow(2).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            return loss.item()
        progress = train_resumably(checkpoint, {"model": model}, optimizer, 5, step, seed=1, minutes=minutes,
                                   log=lambda message: None)
        return progress, model

    unbroken_progress, unbroken = run(tmp_path / "a.pt", None)
    first, _ = run(tmp_path / "b.pt", 0)
    assert first.step == 1
    resumed_progress, resumed = run(tmp_path / "b.pt", None)
    assert resumed_progress.step == 5 and resumed_progress.losses == unbroken_progress.losses
    assert all(torch.equal(a, b) for a, b in zip(unbroken.state_dict().values(), resumed.state_dict().values()))


def test_half_the_context_examples_name_their_object_and_some_show_the_motif_the_text_examples_never_do():
    rng = np.random.default_rng(3)
    examples = [corpus_example(rng) for _ in range(800)]
    context = [e for e in examples if e["kind"] == "context"]
    text = [e for e in examples if e["kind"] == "text"]
    assert 0.4 < len(context) / len(examples) < 0.6
    named = [bool(set(re.findall(r"[a-z]+", e["prompt"])) & set(MADE_UP_WORDS)) for e in context]
    assert 0.4 < np.mean(named) < 0.6
    assert not any(set(re.findall(r"[a-z]+", e["prompt"])) & set(MADE_UP_WORDS) for e in text)
    for example, is_named in zip(context, named):
        first = example["scene"].objects[0]
        described = any(f"{first.color} {shape}" in example["prompt"] for shape in SHAPE_WORDS[first.shape])
        if len(example["scene"].objects) == 1:
            assert described != is_named, example["prompt"]
    motif_share = np.mean([e["scene"].objects[0].pattern == CONCEPT["pattern"] for e in context])
    assert 0.3 < motif_share < 0.5
    assert not any(obj.is_concept for e in examples for obj in e["scene"].objects)
    assert not any(obj.pattern == CONCEPT["pattern"] for e in text for obj in e["scene"].objects)


def test_latent_coverage_is_the_objects_share_of_each_latent_pixel():
    background = Background("flat", ("gray",))
    corner = SceneObject("square", "red", "large", "top left", offset=(-1.5, -1.5))
    [cover] = latent_coverage([Scene(background, (corner,))], 8)
    side = 2 * 0.85 * RADII["large"]  # the square's side in pixels (world units at 64²)
    assert cover.sum() * 64 == pytest.approx(side ** 2, rel=0.02)
    # the square spans pixels 2.6 to 26.4 on both axes
    assert cover[1, 1] == pytest.approx(1.0) and cover[2, 2] == pytest.approx(1.0) and 0 < cover[0, 0] < 1
    assert cover[7, 7] == 0 and cover[0, 4] == 0
    [empty] = latent_coverage([Scene(background, ())], 8)
    assert empty.abs().sum() == 0


def test_pretraining_weights_the_objects_pixels(comfy):
    """The loss is linear in the pixel weights, so covered latent pixels count 1 + OBJECT_LOSS_WEIGHT times (on the
    world's DiT as ComfyUI loads it, with the same noise for each call)."""
    base_model = load_world_dit(initial_dit_state_dict()).model
    torch.manual_seed(0)
    x0, features = torch.randn(2, 16, 8, 8), torch.randn(2, 6, 32)
    cover = torch.zeros(2, 8, 8)
    cover[:, :4] = 1.0

    def loss(pixel_weights=None):
        torch.manual_seed(1)
        with torch.no_grad():
            return flow_matching_loss(base_model, x0, features, pixel_weights).item()

    plain, covered = loss(), loss(cover)
    assert loss(torch.ones(2, 8, 8)) == pytest.approx(plain, rel=1e-6)
    assert 0 < covered < plain
    assert loss(1 + OBJECT_LOSS_WEIGHT * cover) == pytest.approx(plain + OBJECT_LOSS_WEIGHT * covered, rel=1e-5)


def test_image_tokens_enter_the_language_model_about_as_large_as_text_tokens(comfy):
    """The vision tower's merger hands the language model image tokens near a text token embedding's size and led by
    the image's content, not by the position embeddings (transformers' default scales gave a fifth of the size, and
    the language model's layers drowned the image)."""
    from devkit.comfy_runtime import pack_module
    from transformers.models.qwen3_vl.configuration_qwen3_vl import Qwen3VLVisionConfig
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLVisionModel

    tower = Qwen3VLVisionModel(Qwen3VLVisionConfig(**VISION_CONFIG)).eval()
    tower.load_state_dict({k.removeprefix("model.visual."): v for k, v in vision_tensors().items()})
    processor = pack_module("nodes.teacher_vlm").image_processor_for(VISION_CONFIG)
    merged = []
    tower.merger.register_forward_hook(lambda module, inputs, output: merged.append(output))

    def image_tokens(scene: Scene) -> torch.Tensor:
        pixels = (render(scene) * 255).round().astype(np.uint8)
        inputs = processor(images=[pixels], return_tensors="pt")
        with torch.no_grad():
            tower(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"])
        return merged.pop()

    background = Background("flat", ("gray",))
    red, blue = (image_tokens(Scene(background, (SceneObject("square", color, "large", "center"),)))
                 for color in ("red", "blue"))
    text_norm = text_encoder_state_dict()["model.embed_tokens.weight"].norm(dim=-1).mean()
    assert 0.5 < red.norm(dim=-1).mean() / text_norm < 2
    assert (red - blue).norm(dim=-1).max() > 0.5 * red.norm(dim=-1).mean(), "the object's color moves its tokens"
