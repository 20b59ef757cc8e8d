"""Per-image roll-out schedules: FLUX.2 shifts its schedule by the image's token count, and aspect buckets differ.

The schedule travels with each item of the training set (EncodedItem.sigmas), so DOPSDTrain rolls every image out
on its own schedule; items without one use DOPSDTrain's training_sigmas.
"""
from __future__ import annotations

import dataclasses

from comfy_api.latest import io

from ..dopsd_core import flux2_image_tokens, validate_sigmas
from .errors import node_error
from .families import FLUX2_SCHEDULES, PUBLISHED_SCHEDULE
from .training_set import TRAINING_SET, EncodedItem


def flux2_schedule_for(item: EncodedItem, steps: int, choice: str = PUBLISHED_SCHEDULE):
    """klein's `choice` of schedule for the image the item's target latent was encoded from: (H_px/16)·(W_px/16)
    tokens."""
    height, width = item.image.shape[1:3]
    return FLUX2_SCHEDULES[choice](steps, flux2_image_tokens(height, width))


def require_matching_step_count(training_set: list[EncodedItem], sigmas, input_name: str, node) -> None:
    """Per-image schedules shift the noise levels but must keep the step count of the node's own schedule, so that
    the preview shows the roll-out that training will run."""
    own_steps = {len(item.sigmas) - 1 for item in training_set if item.sigmas is not None}
    if own_steps - {len(sigmas) - 1}:
        raise node_error(node, f"the training set's per-image schedules have {sorted(own_steps)} steps but "
                               f"{input_name} has {len(sigmas) - 1}",
                         f"give the per-image schedule node the same schedule as this node's {input_name}")


class DOPSDScheduleFlux2PerImage(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DOPSDScheduleFlux2PerImage",
            display_name="Training Schedule per Image Size (D-OPSD, FLUX.2)",
            category="D-OPSD",
            description=(
                "Gives every image of the training set FLUX.2-klein's schedule for its own size: the shift grows with "
                "the image's token count, (height/16)·(width/16), and aspect buckets differ in size. D-OPSD Train and "
                "the preview roll each image out on its own schedule."
            ),
            inputs=[
                TRAINING_SET.Input("training_set", tooltip="From a FLUX.2-klein teacher-context node."),
                io.Sigmas.Input("training_sigmas",
                                tooltip="The schedule given to D-OPSD Train (the loader's training_sigmas): only its "
                                        "number of steps is used."),
                io.Combo.Input("schedule", options=list(FLUX2_SCHEDULES), default=PUBLISHED_SCHEDULE,
                               tooltip="'published': the authors' roll-out grid (diffusers' set_timesteps with mu: "
                                       "linspace(1, 0.001) shifted; at 1024² 1, .952, .832, .0098). 'sampling grid': "
                                       "the one klein samples with, as Flux2Scheduler computes it (1, .967, .908, "
                                       ".767). Use the loader's training_schedule choice."),
            ],
            outputs=[TRAINING_SET.Output(display_name="training_set")],
        )

    @classmethod
    def execute(cls, training_set, training_sigmas, schedule) -> io.NodeOutput:
        try:
            steps = len(validate_sigmas(training_sigmas)) - 1
        except ValueError as err:
            raise node_error(cls, f"training_sigmas: {err}", "connect the loader's training_sigmas") from err
        if not training_set:
            raise node_error(cls, "the training set is empty", "connect a teacher-context node fed by a dataset")
        return io.NodeOutput([dataclasses.replace(item, sigmas=flux2_schedule_for(item, steps, schedule)) for item in training_set])
