"""Per-item roll-out schedules: a TrainingItem may carry its own sigmas (FLUX.2's shift depends on the image size,
and aspect buckets differ), and the trainer rolls that item out on them."""
import pytest
import torch

from dopsd_core import (
    DualLora,
    LoraSpec,
    Trainer,
    TrainConfig,
    TrainingItem,
    TrainingPair,
    flux2_image_tokens,
    flux2_klein_sigmas,
    zimage_turbo_training_sigmas,
)
from devkit.core_toys import LORA_TARGETS, ToyCond, ToyDiT

TRAINER_SIGMAS = zimage_turbo_training_sigmas()  # 1, .9, .75, .5, 0
SMALL_IMAGE_SIGMAS = flux2_klein_sigmas(4, 256)  # 256x256 px
LARGE_IMAGE_SIGMAS = flux2_klein_sigmas(4, 8192)  # above the 4300-token kink


def test_item_sigmas_are_validated_and_stored_as_float32():
    item = TrainingItem([], (4, 8, 8), sigmas=[1.0, 0.5, 0.0])
    assert item.sigmas.dtype == torch.float32 and item.sigmas.tolist() == [1.0, 0.5, 0.0]
    assert TrainingItem([], (4, 8, 8)).sigmas is None
    with pytest.raises(ValueError, match="TrainingItem sigmas: .*end at exactly 0"):
        TrainingItem([], (4, 8, 8), sigmas=[1.0, 0.5])


def pair(seed: int):
    generator = torch.Generator().manual_seed(seed)
    prompt = torch.randn(1, 8, generator=generator)
    reference = torch.randn(1, 4, 8, 8, generator=generator)
    return TrainingPair(ToyCond(prompt), ToyCond(prompt, reference))


def recording_trainer(items, config=TrainConfig(seed=3)):
    torch.manual_seed(0)
    model = ToyDiT()
    calls = []

    def denoiser(x, sigma, cond):
        calls.append((cond, sigma[0].item()))
        return model(x, sigma, cond)

    adapters = DualLora(model, LoraSpec(rank=2, alpha=2.0, target_modules=LORA_TARGETS))
    return Trainer(denoiser, adapters, items, TRAINER_SIGMAS, config), calls


def test_each_item_is_rolled_out_on_its_own_schedule_or_else_the_trainers():
    pairs = [pair(1), pair(2), pair(3)]
    items = [
        TrainingItem([pairs[0]], (4, 8, 8), sigmas=SMALL_IMAGE_SIGMAS),
        TrainingItem([pairs[1]], (4, 8, 8), sigmas=LARGE_IMAGE_SIGMAS),
        TrainingItem([pairs[2]], (4, 8, 8)),
    ]
    expected = {id(p.student_cond): s for p, s in zip(pairs, (SMALL_IMAGE_SIGMAS, LARGE_IMAGE_SIGMAS, TRAINER_SIGMAS))}
    trainer, calls = recording_trainer(items, TrainConfig(seed=3, gradient_accumulation=6))
    trainer.train(1)
    seen: dict[int, list[float]] = {}
    for cond, sigma in calls:
        if cond.reference is None:  # the student's calls: one per roll-out step
            seen.setdefault(id(cond), []).append(sigma)
    assert len(seen) == 3, "the seed should draw every item within 6 micro-steps"
    for key, sigmas in seen.items():
        schedule = expected[key][:-1].tolist()
        assert len(sigmas) % len(schedule) == 0
        assert sigmas == schedule * (len(sigmas) // len(schedule)), "an item was rolled out on another schedule"
    assert not torch.equal(SMALL_IMAGE_SIGMAS, LARGE_IMAGE_SIGMAS)


def test_item_sigmas_with_another_step_count_are_refused():
    items = [TrainingItem([pair(1)], (4, 8, 8), sigmas=flux2_klein_sigmas(8, 1024))]
    with pytest.raises(ValueError, match="item 0: its own sigmas have 8 steps but the trainer's have 4"):
        recording_trainer(items)


@pytest.mark.parametrize(
    "height, width, tokens",
    [(1024, 1024, 4096), (768, 1344, 4032), (64, 96, 24), (1000, 1000, 3906)],  # 1000²/256 = 3906.25
)
def test_flux2_image_tokens_are_sixteen_pixel_patches(height, width, tokens):
    assert flux2_image_tokens(height, width) == tokens


def test_flux2_image_tokens_refuse_empty_images():
    with pytest.raises(ValueError, match="must be positive"):
        flux2_image_tokens(0, 64)
