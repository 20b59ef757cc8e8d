import pytest
import torch

from dopsd_core import (
    distillation_loss,
    euler_step,
    flow_matching_loss,
    noise_latent,
    rollout,
    rollout_preview,
    velocity_loss,
    x0_loss,
    zimage_turbo_training_sigmas,
)


def test_euler_step_with_the_true_x0_stays_on_the_straight_path():
    generator = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(2, 3, 4, 4, generator=generator), torch.randn(2, 3, 4, 4, generator=generator)
    x_next = euler_step(noise_latent(x0, noise, 0.75), x0, 0.75, 0.5)
    torch.testing.assert_close(x_next, noise_latent(x0, noise, 0.5), atol=1e-6, rtol=0)


def test_rollout_with_a_perfect_predictor_ends_at_the_target():
    generator = torch.Generator().manual_seed(1)
    x0, noise = torch.randn(1, 4, 8, 8, generator=generator), torch.randn(1, 4, 8, 8, generator=generator)
    seen_sigmas = []

    def oracle(x, sigma):
        assert sigma.shape == (1,)
        seen_sigmas.append(sigma.item())
        return x0

    final = rollout(oracle, noise, zimage_turbo_training_sigmas())
    assert seen_sigmas == pytest.approx([1.0, 0.9, 0.75, 0.5])
    torch.testing.assert_close(final, x0, atol=1e-6, rtol=0)


def test_rollout_preview_follows_the_student_and_records_the_teacher():
    sigmas = torch.tensor([0.8, 0.4, 0.0])
    noise = torch.ones(1, 2, 2, 2)
    preview = rollout_preview(lambda x, s: torch.zeros_like(x), lambda x, s: torch.full_like(x, 3.0), noise, sigmas)
    assert [step.sigma for step in preview] == pytest.approx([0.8, 0.4])
    # Student predicts 0, so the state shrinks toward 0: x = 0.8 -> 0.8 + 0.8 / 0.8 * (0.4 - 0.8) = 0.4.
    assert [step.state.flatten()[0].item() for step in preview] == pytest.approx([0.8, 0.4])
    assert all(torch.equal(step.teacher_x0, torch.full((1, 2, 2, 2), 3.0)) for step in preview)
    assert all(not step.student_x0.requires_grad for step in preview)


def test_velocity_loss_is_x0_loss_over_sigma_squared():
    generator = torch.Generator().manual_seed(2)
    student, teacher, x = (torch.randn(2, 4, 8, 8, generator=generator) for _ in range(3))
    for sigma in (0.9, 0.5, 0.1):
        torch.testing.assert_close(velocity_loss(student, teacher, x, sigma), x0_loss(student, teacher) / sigma**2)
    assert distillation_loss("x0", student, teacher, x, 0.5) == x0_loss(student, teacher)
    assert distillation_loss("velocity", student, teacher, x, 0.5) == velocity_loss(student, teacher, x, 0.5)
    with pytest.raises(ValueError, match="loss space"):
        distillation_loss("eps", student, teacher, x, 0.5)


def test_flow_matching_loss_compares_velocities_with_noise_minus_x0():
    generator = torch.Generator().manual_seed(3)
    x0, noise, predicted = (torch.randn(2, 4, 8, 8, generator=generator) for _ in range(3))
    sigma = torch.tensor([0.3, 0.7]).reshape(2, 1, 1, 1)
    x = noise_latent(x0, noise, sigma)
    expected = ((x - predicted) / sigma - (noise - x0)).square().mean()
    torch.testing.assert_close(flow_matching_loss(predicted, x0, noise, x, sigma), expected)
    assert flow_matching_loss(x0, x0, noise, x, sigma) < 1e-10
