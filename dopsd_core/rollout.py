"""Deterministic Euler roll-outs in x0 form, shared by training and preview.

A predictor maps a state ``x`` at noise level ``sigma`` (shape ``[B]``) to a prediction of the
clean latent x0. The velocity of ``x_sigma = (1 - sigma) x0 + sigma noise`` is
``(x - x0) / sigma``, so one Euler step from ``sigma`` to ``sigma_next`` is
``x + (x - x0) / sigma * (sigma_next - sigma)``.
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

Predictor = Callable[[Tensor, Tensor], Tensor]


def append_dims(values: Tensor, ndim: int) -> Tensor:
    """View per-sample ``values`` of shape ``[B]`` as ``[B, 1, ..., 1]`` with ``ndim`` dimensions."""
    return values.reshape(values.shape + (1,) * (ndim - values.ndim))


def noise_latent(x0: Tensor, noise: Tensor, sigma: Tensor | float) -> Tensor:
    """The state at noise level ``sigma`` on the straight path from ``x0`` to ``noise``."""
    return (1 - sigma) * x0 + sigma * noise


def velocity(x: Tensor, x0: Tensor, sigma: Tensor | float) -> Tensor:
    """The velocity ``(x - x0) / sigma`` an x0 prediction implies at ``(x, sigma)`` (k-diffusion's ``to_d``)."""
    return (x - x0) / sigma


def euler_step(x: Tensor, x0: Tensor, sigma: Tensor | float, sigma_next: Tensor | float) -> Tensor:
    """One Euler step of the probability-flow ODE, given the model's x0 at ``(x, sigma)``."""
    return x + velocity(x, x0, sigma) * (sigma_next - sigma)


def rollout(predict_x0: Predictor, noise: Tensor, sigmas: Tensor) -> Tensor:
    """Walk ``sigmas`` from ``x = sigmas[0] * noise`` and return the final state.

    The start is what a sampler gives for an empty (zero) latent: ``(1 - sigma) * 0 + sigma * noise``.
    ``predict_x0(x, sigma)`` is called once per step with ``sigma`` broadcast to ``[B]``; its
    result drives the step and is detached, so no gradient flows through time.
    """
    x = sigmas[0] * noise
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        x0 = predict_x0(x, sigma.expand(x.shape[0]))
        x = euler_step(x, x0.detach(), sigma, sigma_next)
    return x


@dataclass(frozen=True)
class RolloutStep:
    """Both roles' predictions at one state of the student's trajectory."""

    state: Tensor
    sigma: float
    student_x0: Tensor
    teacher_x0: Tensor


@torch.no_grad()
def rollout_preview(
    predict_student: Predictor, predict_teacher: Predictor, noise: Tensor, sigmas: Tensor
) -> list[RolloutStep]:
    """The student's own trajectory, with the teacher's x0 at each of its states.

    This is the trajectory D-OPSD trains on, so it shows what the student will be pulled toward.
    """
    steps = []

    def predict_and_record(x: Tensor, sigma: Tensor) -> Tensor:
        student_x0 = predict_student(x, sigma)
        steps.append(RolloutStep(x, sigma[0].item(), student_x0, predict_teacher(x, sigma)))
        return student_x0

    rollout(predict_and_record, noise, sigmas)
    return steps
