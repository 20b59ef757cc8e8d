"""Losses between x0 predictions, in x0 or velocity space.

At a shared state ``x`` and noise level ``sigma`` the velocity of an x0 prediction is
``v = (x - x0) / sigma``, so ``|v_s - v_t|^2 = |x0_s - x0_t|^2 / sigma^2``: the velocity loss
is the x0 loss weighted by ``1 / sigma^2``. All losses are reduced in float32.
"""

from typing import Literal

import torch.nn.functional as F
from torch import Tensor

from .rollout import velocity

LossSpace = Literal["x0", "velocity"]
LOSS_SPACES: tuple[LossSpace, ...] = ("x0", "velocity")


def x0_loss(student_x0: Tensor, teacher_x0: Tensor) -> Tensor:
    """Mean squared error between x0 predictions (the D-OPSD authors' choice)."""
    return F.mse_loss(student_x0.float(), teacher_x0.float())


def velocity_loss(student_x0: Tensor, teacher_x0: Tensor, x: Tensor, sigma: Tensor | float) -> Tensor:
    """Mean squared error between the velocities ``(x - x0) / sigma`` the predictions imply."""
    x = x.float()
    return F.mse_loss(velocity(x, student_x0.float(), sigma), velocity(x, teacher_x0.float(), sigma))


def distillation_loss(
    space: LossSpace, student_x0: Tensor, teacher_x0: Tensor, x: Tensor, sigma: Tensor | float
) -> Tensor:
    """The D-OPSD per-step loss in the chosen space."""
    if space == "x0":
        return x0_loss(student_x0, teacher_x0)
    if space == "velocity":
        return velocity_loss(student_x0, teacher_x0, x, sigma)
    raise ValueError(f"loss space must be one of {LOSS_SPACES}, got {space!r}")


def flow_matching_loss(
    predicted_x0: Tensor, x0: Tensor, noise: Tensor, x: Tensor, sigma: Tensor | float
) -> Tensor:
    """Rectified-flow SFT loss, in velocity space: MSE between the predicted velocity
    ``(x - predicted_x0) / sigma`` and the target ``noise - x0``, where
    ``x = (1 - sigma) x0 + sigma noise`` (so it equals ``x0_loss(predicted_x0, x0) / sigma^2``).

    ``sigma`` must be positive and broadcast against ``x`` (e.g. shape ``[B, 1, 1, 1]``).
    """
    return F.mse_loss(velocity(x.float(), predicted_x0.float(), sigma), noise.float() - x0.float())
