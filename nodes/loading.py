"""DOPSDLoadModel: a step-distilled model family's files, loaded through ComfyUI's own loaders."""
from __future__ import annotations

import comfy.samplers
import comfy.sd
import comfy.utils
import folder_paths
import torch
from comfy_api.latest import io

from . import comfy_compat
from .errors import node_error
from .families import CUSTOM, DEFAULT_IMAGE_TOKENS, FAMILIES, PUBLISHED_SCHEDULE, ROLLOUT_SCHEDULES, ZIMAGE_TURBO, rollout_schedule

PRESET_TEXT_ENCODER = "from preset"
BASE_MODEL_NAME_OPTION = "dopsd_base_model"  # the MODEL's file name, recorded in the trained LoRA's header
WEIGHT_DTYPE_OPTION = "dopsd_weight_dtype"  # how the loader keeps its weights, for a job that loads it again
# Custom models: the model's own schedule, at the steps few-step models are usually run with.
CUSTOM_INFERENCE_STEPS = 8
CUSTOM_TRAINING_STEPS = 4


def _options(folder: str, preferred: str) -> tuple[list[str], str | None]:
    files = folder_paths.get_filename_list(folder)
    return files, preferred if preferred in files else (files[0] if files else None)


def clip_type_for(name: str, node: str) -> comfy.sd.CLIPType:
    """The CLIPType member; FLUX.2-klein's Qwen3 encoder type only exists in newer ComfyUI releases."""
    member = comfy_compat.clip_type(name)
    if member is None:
        raise node_error(
            node,
            f"this ComfyUI has no text-encoder type '{name.lower()}'",
            "update ComfyUI to a release that supports this model family (FLUX.2-klein needs ComfyUI 0.4 or newer)",
        )
    return member


# The stock Load Diffusion Model node's weight_dtype choices, with the model options it passes for each.
WEIGHT_DTYPES = {
    "default": {},
    "fp8_e4m3fn": {"dtype": torch.float8_e4m3fn},
    "fp8_e4m3fn_fast": {"dtype": torch.float8_e4m3fn, "fp8_optimizations": True},
    "fp8_e5m2": {"dtype": torch.float8_e5m2},
}


class DOPSDLoadModel(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        diffusion_files, diffusion_default = _options("diffusion_models", ZIMAGE_TURBO.diffusion_model)
        encoder_files, encoder_default = _options("text_encoders", ZIMAGE_TURBO.text_encoder)
        vae_files, vae_default = _options("vae", ZIMAGE_TURBO.vae)
        return io.Schema(
            node_id="DOPSDLoadModel",
            display_name="Load Step-Distilled Model (D-OPSD)",
            category="D-OPSD",
            description=(
                "Loads a few-step (turbo) model with ComfyUI's own loaders and gives the family's inference "
                "schedule and D-OPSD training schedule. The stock loaders work just as well with every D-OPSD node."
            ),
            inputs=[
                io.Combo.Input("family", options=[*FAMILIES, CUSTOM], default=ZIMAGE_TURBO.name,
                               tooltip="Sets the schedules. 'custom': any flow model, with its own schedule."),
                io.Combo.Input("diffusion_model", options=diffusion_files, default=diffusion_default,
                               tooltip="From models/diffusion_models."),
                io.Combo.Input("text_encoder", options=encoder_files, default=encoder_default,
                               tooltip="From models/text_encoders."),
                io.Combo.Input("text_encoder_type", options=[PRESET_TEXT_ENCODER, *(t.name.lower() for t in comfy.sd.CLIPType)],
                               default=PRESET_TEXT_ENCODER, tooltip="Only needed for the 'custom' family."),
                io.Combo.Input("vae", options=vae_files, default=vae_default, tooltip="From models/vae."),
                io.Combo.Input("training_schedule", options=list(ROLLOUT_SCHEDULES), default=PUBLISHED_SCHEDULE,
                               tooltip="The roll-out schedule of training_sigmas. 'published': the authors' (Z-Image: "
                                       "4 steps 1, .9, .75, .5; klein: 4 steps ending near 0.001, which is not what it "
                                       "samples with). 'sampling grid': the family's own sampling schedule (Z-Image: "
                                       "its 8 steps). Not used by the 'custom' family."),
                io.Combo.Input("weight_dtype", options=list(WEIGHT_DTYPES), default="default",
                               tooltip="How the diffusion model's weights are kept, as in the stock Load Diffusion "
                                       "Model node. fp8 halves their memory (about 6 GB instead of 12 for Z-Image); "
                                       "D-OPSD trains the LoRA on top of the frozen fp8 weights in higher precision, "
                                       "and the saved LoRA applies to the fp8 and the bf16 model alike."),
            ],
            outputs=[
                io.Model.Output(display_name="MODEL"),
                io.Clip.Output(display_name="CLIP"),
                io.Vae.Output(display_name="VAE"),
                io.Sigmas.Output(display_name="inference_sigmas", tooltip="The few-step schedule to generate with."),
                io.Sigmas.Output(display_name="training_sigmas", tooltip="The roll-out schedule D-OPSD trains on."),
            ],
        )

    @classmethod
    def execute(cls, family, diffusion_model, text_encoder, text_encoder_type, vae, training_schedule,
                weight_dtype="default") -> io.NodeOutput:
        preset = FAMILIES.get(family)
        if preset is None and text_encoder_type == PRESET_TEXT_ENCODER:
            raise node_error(cls, "the 'custom' family has no preset text-encoder type",
                             "choose text_encoder_type (the type you would pick in the stock Load CLIP node)")
        type_name = (preset.clip_type if text_encoder_type == PRESET_TEXT_ENCODER else text_encoder_type).upper()
        clip_type = clip_type_for(type_name, cls.__name__)

        model = comfy.sd.load_diffusion_model(folder_paths.get_full_path_or_raise("diffusion_models", diffusion_model),
                                              model_options=dict(WEIGHT_DTYPES[weight_dtype]))
        model.model_options[BASE_MODEL_NAME_OPTION] = diffusion_model
        model.model_options[WEIGHT_DTYPE_OPTION] = weight_dtype
        clip = comfy.sd.load_clip(
            ckpt_paths=[folder_paths.get_full_path_or_raise("text_encoders", text_encoder)],
            embedding_directory=folder_paths.get_folder_paths("embeddings"),
            clip_type=clip_type,
        )
        loaded_vae = comfy.sd.VAE(sd=comfy.utils.load_torch_file(folder_paths.get_full_path_or_raise("vae", vae)))
        loaded_vae.throw_exception_if_invalid()

        if preset is None:
            sampling = model.get_model_object("model_sampling")
            inference = comfy.samplers.calculate_sigmas(sampling, "simple", CUSTOM_INFERENCE_STEPS)
            training = comfy.samplers.calculate_sigmas(sampling, "simple", CUSTOM_TRAINING_STEPS)
        else:
            inference = preset.inference_sigmas(DEFAULT_IMAGE_TOKENS)
            training = rollout_schedule(preset, training_schedule)(DEFAULT_IMAGE_TOKENS)
        return io.NodeOutput(model, clip, loaded_vae, inference.cpu().float(), training.cpu().float())
