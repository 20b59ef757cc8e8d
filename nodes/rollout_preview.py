"""DOPSDRolloutPreview: look at the teacher before training.

The student rolls out its own few-step trajectory from the prompt alone; at every state the teacher's
prediction (prompt + target image) is shown beside the student's. D-OPSD pulls the student toward exactly
these teacher images, so artifacts visible here will be learned.
"""
from __future__ import annotations

import torch
from einops import rearrange
from comfy_api.latest import io

from ..dopsd_core import rollout_preview, validate_sigmas
from .training_set import TRAINING_SET
from .errors import node_error
from .item_schedules import require_matching_step_count
from .model_bridge import explain_unreadable_conditioning, model_session, require_flow_model, require_latents_of


class DOPSDRolloutPreview(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DOPSDRolloutPreview",
            display_name="Roll-out Preview: Student vs Teacher (D-OPSD)",
            category="D-OPSD",
            description=(
                "For one image–prompt pair: the student's own few-step roll-out and, at each step, the predicted "
                "image of the student (left), the teacher (middle) and the target (right)."
            ),
            inputs=[
                io.Model.Input("model", tooltip="The model you will train (the same MODEL as Train's input)."),
                io.Vae.Input("vae", tooltip="The MODEL's own VAE: decodes the panels."),
                TRAINING_SET.Input("training_set", tooltip="The training set Train gets."),
                io.Sigmas.Input("sigmas", tooltip="The training schedule to preview. An image with its own schedule "
                                                  "(Training Schedule per Image Size) is previewed on that one, as "
                                                  "D-OPSD Train rolls it out."),
                io.Int.Input("image_index", default=0, min=0, max=100_000, tooltip="Which image of the set."),
                io.Int.Input("prompt_variant", default=0, min=0, max=1_000, tooltip="Which of its prompt variants."),
                io.Int.Input("seed", default=0, min=0, max=2**63 - 1, control_after_generate=False,
                             tooltip="The roll-out's starting noise; change it to see another trajectory."),
            ],
            outputs=[
                io.Image.Output(display_name="student_teacher_target", tooltip="One image per roll-out step."),
                io.Latent.Output(display_name="rollout_states", tooltip="The student's state at each step."),
            ],
        )

    @classmethod
    def execute(cls, model, vae, training_set, sigmas, image_index, prompt_variant, seed) -> io.NodeOutput:
        require_flow_model(model, cls)
        try:
            sigmas = validate_sigmas(sigmas)
        except ValueError as err:
            raise node_error(cls, f"sigmas: {err}", "connect a schedule that ends at 0") from err
        if not 0 <= image_index < len(training_set):
            raise node_error(cls, f"image_index {image_index} is outside the training set of {len(training_set)}",
                             f"pick 0 to {len(training_set) - 1}")
        item = training_set[image_index]
        require_latents_of(model, [item.latent], cls)
        if not 0 <= prompt_variant < len(item.pairs):
            raise node_error(cls, f"{item.name} has {len(item.pairs)} prompt variants, not {prompt_variant + 1}",
                             f"pick 0 to {len(item.pairs) - 1}")
        pair = item.pairs[prompt_variant]
        require_matching_step_count([item], sigmas, "sigmas", cls)
        if item.sigmas is not None:
            sigmas = item.sigmas
        shape = tuple(item.latent.shape)
        noise = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
        with model_session(model, shape, training=False) as session:
            with explain_unreadable_conditioning(cls):
                student, teacher = session.prepare(pair.student, shape), session.prepare(pair.teacher, shape)
                session.check_reads([student, teacher], shape)
            steps = rollout_preview(
                lambda x, s: session.predict_x0(x, s, student),
                lambda x, s: session.predict_x0(x, s, teacher),
                noise.to(session.device),
                sigmas.to(session.device),
            )
            to_vae = lambda latent: session.to_vae_space(latent).float().cpu()  # noqa: E731
            latents = [(to_vae(s.state), to_vae(s.student_x0), to_vae(s.teacher_x0)) for s in steps]
        target = item.image[..., :3].cpu()
        panels = []
        for _, student_x0, teacher_x0 in latents:
            student_image, teacher_image = vae.decode(student_x0), vae.decode(teacher_x0)
            height, width = student_image.shape[1:3]
            resized_target = rearrange(torch.nn.functional.interpolate(
                rearrange(target, "b h w c -> b c h w"), size=(height, width), mode="bilinear", align_corners=False
            ), "b c h w -> b h w c")
            panels.append(rearrange([student_image[:1], teacher_image[:1], resized_target],
                                    "panel b h w c -> b h (panel w) c"))
        return io.NodeOutput(torch.cat(panels), {"samples": torch.cat([state for state, _, _ in latents])})
