import math

import numpy as np
import pytest
import torch

from dopsd_core import (
    flux2_klein_mu,
    flux2_klein_sigmas,
    flux2_klein_training_sigmas,
    validate_sigmas,
    zimage_turbo_inference_sigmas,
    zimage_turbo_training_sigmas,
)

A1, B1, A2, B2 = 8.73809524e-05, 1.89833333, 0.00016927, 0.45666666


@pytest.mark.parametrize(
    "tokens, steps, expected",
    [
        # Hand-computed in 40-digit decimal: mu_10 + (steps - 10) * (mu_200 - mu_10) / 190.
        (256, 4, 1.965567161408538947),
        (1024, 4, 2.030689707949945263),
        (4096, 4, 2.291179894115570526),
        (4300, 4, 2.308478070540631579),
        # Above 4300 tokens only the 200-step line counts: a2 * n + b2.
        (4301, 4, 1.18469693),
        (8192, 4, 1.84332650),
    ],
)
def test_flux2_klein_mu_matches_hand_computed_values(tokens, steps, expected):
    assert flux2_klein_mu(tokens, steps) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("tokens", [256, 1024, 4096, 4300, 4301, 8192])
@pytest.mark.parametrize("steps", [4, 10, 200])
def test_flux2_klein_mu_is_the_documented_piecewise_line(tokens, steps):
    mu_10, mu_200 = A1 * tokens + B1, A2 * tokens + B2
    expected = mu_200 if tokens > 4300 else mu_10 + (steps - 10) * (mu_200 - mu_10) / 190
    assert flux2_klein_mu(tokens, steps) == pytest.approx(expected, abs=1e-12)


def test_flux2_klein_mu_hits_both_fits_at_their_step_counts():
    assert flux2_klein_mu(1024, 10) == pytest.approx(A1 * 1024 + B1, abs=1e-12)
    assert flux2_klein_mu(1024, 200) == pytest.approx(A2 * 1024 + B2, abs=1e-12)


def test_flux2_klein_sigmas_at_1024_px_4_steps():
    # 1024 x 1024 px = 64 x 64 tokens; e^mu / (e^mu + 1/t - 1) at t = 1, 3/4, 1/2, 1/4 with mu = 2.2911798941.
    expected = torch.tensor([1.0, 0.96738398824, 0.90814392252, 0.76719996387, 0.0])
    sigmas = flux2_klein_sigmas(4, 4096)
    assert sigmas.dtype == torch.float32
    torch.testing.assert_close(sigmas, expected, atol=1e-7, rtol=0)


@pytest.mark.parametrize("steps, tokens", [(1, 256), (4, 1024), (8, 8192), (50, 4096)])
def test_flux2_klein_sigmas_are_a_valid_schedule_of_the_requested_length(steps, tokens):
    sigmas = flux2_klein_sigmas(steps, tokens)
    assert len(sigmas) == steps + 1
    assert sigmas[0] == 1.0
    torch.testing.assert_close(validate_sigmas(sigmas), sigmas)


def test_zimage_turbo_schedules():
    assert zimage_turbo_training_sigmas().tolist() == pytest.approx([1.0, 0.9, 0.75, 0.5, 0.0])
    assert zimage_turbo_training_sigmas(8).tolist() == pytest.approx(
        [1.0, 0.9769, 0.9478, 0.9099, 0.8586, 0.7853, 0.6719, 0.4732, 0.0]
    )
    assert torch.equal(zimage_turbo_training_sigmas(8), zimage_turbo_inference_sigmas())
    with pytest.raises(ValueError, match="4 or 8 steps"):
        zimage_turbo_training_sigmas(6)


@pytest.mark.parametrize(
    "sigmas, message",
    [
        ([[1.0, 0.0]], "1-D"),
        ([0.0], "at least 2"),
        ([1.0, 0.5, 0.1], "end at exactly 0"),
        ([1.0, 0.5, 0.5, 0.0], "strictly decreasing"),
        ([0.5, 0.9, 0.0], "strictly decreasing"),
        ([1.5, 0.5, 0.0], "at most at 1"),
        ([1.0, float("nan"), 0.0], "finite"),
    ],
)
def test_validate_sigmas_explains_what_is_wrong(sigmas, message):
    with pytest.raises(ValueError, match=message):
        validate_sigmas(sigmas)


def test_validate_sigmas_accepts_sequences_and_returns_float32():
    sigmas = validate_sigmas([0.8, 0.3, 0.0])
    assert sigmas.dtype == torch.float32 and sigmas.tolist() == pytest.approx([0.8, 0.3, 0.0])


@pytest.mark.parametrize(
    "tokens, expected",
    [
        # 40-digit decimal evaluation of DESIGN.md's formula (mu at 4 steps, t = 1, 3/4, 1/2, 1/4, then 0).
        (256, [1.0, 0.95539076140, 0.87713418512, 0.70411167555, 0.0]),  # 256x256 px
        (1024, [1.0, 0.95808537163, 0.88398183170, 0.71749655870, 0.0]),  # 512x512 px
        (4032, [1.0, 0.96721232323, 0.90769021639, 0.76622929548, 0.0]),  # 768x1344 px, a ~1 MP bucket
        (4300, [1.0, 0.96792539319, 0.90957675935, 0.77027519983, 0.0]),  # last token count of the step-dependent line
        (4301, [1.0, 0.90748524978, 0.76579127308, 0.52150787984, 0.0]),  # first of the 200-step line: a jump
        (8192, [1.0, 0.94988110725, 0.86334165193, 0.67802586312, 0.0]),  # 1024x2048 px
    ],
)
def test_flux2_klein_4_step_sigmas_at_several_image_sizes(tokens, expected):
    torch.testing.assert_close(flux2_klein_sigmas(4, tokens), torch.tensor(expected), atol=1e-7, rtol=0)


def diffusers_klein_training_sigmas(steps: int, image_tokens: int) -> list[float]:
    """What the authors' klein training scripts roll out on, written out as diffusers 0.38 computes it:
    FlowMatchEulerDiscreteScheduler (1000 training timesteps, dynamic shifting) ``set_timesteps(steps, mu=mu)``
    with mu from the klein pipeline's ``compute_empirical_mu(image_seq_len, steps)``."""
    if image_tokens > 4300:
        mu = A2 * image_tokens + B2
    else:
        m_200, m_10 = A2 * image_tokens + B2, A1 * image_tokens + B1
        slope = (m_200 - m_10) / 190.0
        mu = slope * steps + (m_200 - 200.0 * slope)
    train_sigmas = np.linspace(1, 1000, 1000, dtype=np.float32)[::-1] / 1000
    sigma_max, sigma_min = float(train_sigmas[0]), float(train_sigmas[-1])
    timesteps = np.linspace(sigma_max * 1000, sigma_min * 1000, steps)
    sigmas = timesteps / 1000
    sigmas = math.exp(mu) / (math.exp(mu) + (1 / sigmas - 1) ** 1.0)
    return [*sigmas.tolist(), 0.0]


def test_klein_training_schedule_at_1024_px_is_the_authors_grid():
    sigmas = flux2_klein_training_sigmas(4, 4096)
    torch.testing.assert_close(sigmas, torch.tensor([1.0, 0.952, 0.832, 0.0098, 0.0]), atol=1e-3, rtol=0)
    assert sigmas.dtype == torch.float32
    # The sampling grid at the same size ends its last step far higher.
    assert flux2_klein_sigmas(4, 4096)[3] > 0.7


@pytest.mark.parametrize("tokens", [256, 1024, 2304, 3600, 4300, 4301, 5184, 8192])
@pytest.mark.parametrize("steps", [2, 4, 8])
def test_klein_training_schedule_matches_the_diffusers_scheduler_at_other_sizes(tokens, steps):
    expected = torch.tensor(diffusers_klein_training_sigmas(steps, tokens), dtype=torch.float32)
    sigmas = flux2_klein_training_sigmas(steps, tokens)
    torch.testing.assert_close(sigmas, expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(validate_sigmas(sigmas), sigmas)
