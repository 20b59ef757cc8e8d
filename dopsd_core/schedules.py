"""Sigma schedules for rectified-flow models.

A schedule is a 1-D float32 tensor ``sigmas`` with ``sigmas[0]`` the starting noise level
(at most 1) and ``sigmas[-1] == 0``; a roll-out takes ``len(sigmas) - 1`` Euler steps along
``x_sigma = (1 - sigma) * x0 + sigma * noise``.
"""

import math
from collections.abc import Sequence

import torch
from torch import Tensor

ZIMAGE_TURBO_TRAINING_SIGMAS_4 = (1.0, 0.9, 0.75, 0.5, 0.0)
ZIMAGE_TURBO_INFERENCE_SIGMAS_8 = (1.0, 0.9769, 0.9478, 0.9099, 0.8586, 0.7853, 0.6719, 0.4732, 0.0)

# FLUX.2 empirical shift: mu = a * image_tokens + b, fitted at 10 and at 200 sampling steps.
_FLUX2_MU_10_STEPS = (8.73809524e-05, 1.89833333)
_FLUX2_MU_200_STEPS = (0.00016927, 0.45666666)
_FLUX2_MU_STEP_INDEPENDENT_ABOVE_TOKENS = 4300
# diffusers' FlowMatchEulerDiscreteScheduler with 1000 training timesteps: its smallest sigma.
_DIFFUSERS_FLOW_SIGMA_MIN = 1.0 / 1000


def validate_sigmas(sigmas: Tensor | Sequence[float]) -> Tensor:
    """Return ``sigmas`` as a float32 tensor, or raise ``ValueError`` saying what is wrong."""
    sigmas = torch.as_tensor(sigmas).to(torch.float32)
    if sigmas.ndim != 1:
        raise ValueError(f"sigmas must be a 1-D list of noise levels, got shape {tuple(sigmas.shape)}")
    if len(sigmas) < 2:
        raise ValueError(f"sigmas need at least 2 entries (a start and the final 0), got {len(sigmas)}")
    if not torch.isfinite(sigmas).all():
        raise ValueError(f"sigmas must be finite numbers, got {sigmas.tolist()}")
    if sigmas[-1] != 0:
        raise ValueError(f"sigmas must end at exactly 0 (a clean image), but the last is {sigmas[-1].item()}")
    if not (sigmas[:-1] > sigmas[1:]).all():
        raise ValueError(f"sigmas must be strictly decreasing, got {sigmas.tolist()}")
    if sigmas[0] > 1:
        raise ValueError(
            f"sigmas must start at most at 1 (pure noise for a flow model), got {sigmas[0].item()}"
        )
    return sigmas


def zimage_turbo_training_sigmas(steps: int = 4) -> Tensor:
    """The Z-Image-Turbo D-OPSD training schedule: the authors' 4 steps, or the 8 inference steps."""
    if steps == 4:
        return torch.tensor(ZIMAGE_TURBO_TRAINING_SIGMAS_4, dtype=torch.float32)
    if steps == 8:
        return zimage_turbo_inference_sigmas()
    raise ValueError(f"Z-Image-Turbo training schedules exist for 4 or 8 steps, not {steps}")


def zimage_turbo_inference_sigmas() -> Tensor:
    """The 8-step schedule Z-Image-Turbo samples with."""
    return torch.tensor(ZIMAGE_TURBO_INFERENCE_SIGMAS_8, dtype=torch.float32)


def flux2_klein_mu(image_tokens: int, steps: int) -> float:
    """FLUX.2's resolution- and step-dependent shift.

    With ``mu_10(n) = a1 n + b1`` and ``mu_200(n) = a2 n + b2`` (fits at 10 and 200 steps):
    ``mu = mu_200(n)`` above 4300 tokens, else the line through (10, mu_10) and (200, mu_200)
    evaluated at ``steps``.
    """
    (a1, b1), (a2, b2) = _FLUX2_MU_10_STEPS, _FLUX2_MU_200_STEPS
    mu_200 = a2 * image_tokens + b2
    if image_tokens > _FLUX2_MU_STEP_INDEPENDENT_ABOVE_TOKENS:
        return mu_200
    mu_10 = a1 * image_tokens + b1
    slope = (mu_200 - mu_10) / 190.0
    return slope * steps + (mu_200 - 200.0 * slope)


def flux2_image_tokens(height_px: int, width_px: int) -> int:
    """The packed image sequence length FLUX.2 schedules are keyed on: ``(height_px / 16) * (width_px / 16)``,
    rounded to an integer as ComfyUI's Flux2Scheduler does for sizes that are not multiples of 16."""
    if height_px <= 0 or width_px <= 0:
        raise ValueError(f"image size must be positive, got {width_px}x{height_px} px")
    return round(height_px * width_px / 256)


def flux2_klein_sigmas(steps: int, image_tokens: int) -> Tensor:
    """FLUX.2's sampling schedule (the diffusers klein pipeline, ComfyUI's Flux2Scheduler):
    ``t = linspace(1, 1/steps, steps)`` through ``flux2_time_shift``, then 0."""
    _require_steps(steps)
    return flux2_time_shift(torch.linspace(1.0, 1.0 / steps, steps, dtype=torch.float64), image_tokens, steps)


def flux2_klein_training_sigmas(steps: int, image_tokens: int) -> Tensor:
    """The D-OPSD authors' klein roll-out schedule: diffusers' ``set_timesteps(steps, mu=mu)`` with no explicit
    sigmas, i.e. ``t = linspace(1, 0.001, steps)`` (sigma_max to the scheduler's sigma_min = 1/1000) through
    ``flux2_time_shift``, then 0. It ends far lower than the sampling grid: at 1024² it is
    [1, 0.952, 0.832, 0.0098, 0] against [1, 0.967, 0.908, 0.767, 0]."""
    _require_steps(steps)
    t = torch.linspace(1.0, _DIFFUSERS_FLOW_SIGMA_MIN, steps, dtype=torch.float64)
    return flux2_time_shift(t, image_tokens, steps)


def flux2_time_shift(t: Tensor, image_tokens: int, steps: int) -> Tensor:
    """``sigma = e^mu / (e^mu + (1/t - 1))`` with ``mu = flux2_klein_mu(image_tokens, steps)``, followed by the
    final 0, as float32."""
    exp_mu = math.exp(flux2_klein_mu(image_tokens, steps))
    sigmas = exp_mu / (exp_mu + (1.0 / t - 1.0))
    return torch.cat([sigmas, sigmas.new_zeros(1)]).to(torch.float32)


def _require_steps(steps: int) -> None:
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
