"""Looking inside a run: x0 predictions at a fixed noisy state, fixed-noise roll-outs."""
from __future__ import annotations

import torch

from devkit.comfy_runtime import pack_module

PROBE_SIGMA = 0.7
PROBE_SEED = 3


def predict_x0(model, conditionings: list[list], shape: tuple[int, ...], sigma: float = PROBE_SIGMA) -> list[torch.Tensor]:
    """Each CONDITIONING's x0 prediction at one fixed noisy state, through ComfyUI's conditioning machinery."""
    bridge = pack_module("nodes.model_bridge")
    generator = torch.Generator().manual_seed(PROBE_SEED)
    clean, noise = torch.randn(shape, generator=generator), torch.randn(shape, generator=generator)
    with torch.no_grad(), bridge.model_session(model, shape, training=False) as session:
        x = ((1 - sigma) * clean + sigma * noise).to(session.device)
        sigmas = torch.full((shape[0],), sigma, device=session.device)
        return [session.predict_x0(x, sigmas, session.prepare(c, shape)).float().cpu() for c in conditionings]


def x0_for_two_images(model, item_a, item_b) -> tuple[torch.Tensor, ...]:
    """(student A, student B, teacher A, teacher B) x0 for the first prompt variant of two training-set items that
    share their prompt and differ in their image."""
    pair_a, pair_b = item_a.pairs[0], item_b.pairs[0]
    assert pair_a.prompt == pair_b.prompt and not torch.equal(item_a.latent, item_b.latent)
    return tuple(predict_x0(model, [pair_a.student, pair_b.student, pair_a.teacher, pair_b.teacher],
                            tuple(item_a.latent.shape)))


def relative_change(a: torch.Tensor, b: torch.Tensor) -> float:
    """RMS of the difference, relative to the RMS of `a`."""
    return ((a - b).pow(2).mean().sqrt() / a.pow(2).mean().sqrt()).item()


def sample_with_noise(model, positive: list, sigmas: torch.Tensor, shape: tuple[int, ...], seed: int):
    """Euler sampling, CFG 1, from the noise ComfyUI draws for `seed`, through ComfyUI's sampler (comfy.sample)."""
    import comfy.sample
    import comfy.samplers

    latent = torch.zeros(shape)
    noise = comfy.sample.prepare_noise(latent, seed)
    with torch.inference_mode():
        return comfy.sample.sample_custom(model, noise, 1.0, comfy.samplers.sampler_object("euler"), sigmas,
                                          positive, positive, latent, seed=seed, disable_pbar=True).clone()
