"""The one place that knows which ComfyUI release the pack runs on.

The pack is tested on ComfyUI 0.3.75 and used on the newer 0.4x line. Every other module depends only on
surfaces both have (the V3 `io` node API, ModelPatcher, model_sampling, the sampler/guider machinery, comfy.sd
LoRA loading, folder_paths). What differs is handled here, each with the reason:

* FLUX.2-klein's text encoder. In 0.4x, `comfy.sd.CLIPType.FLUX2` (and FLUX) loads a Qwen3 file
  (`qwen_3_4b` / `qwen_3_8b`) as klein's encoder: three hidden layers stacked into 3 x hidden features, the
  width the klein DiT's `txt_in` expects. 0.3.75 has no FLUX2 member and loads any Qwen3 file as Z-Image's
  encoder (one hidden layer), which a real klein checkpoint cannot use. So the klein presets ask for "FLUX2"
  and this module reports it missing instead of silently picking another type. (The tiny test checkpoints
  are built for the 0.3.75 encoder's width and are loaded with type "lumina2".)
* Reference latents. Both releases carry reference images into a model through the conditioning key
  `reference_latents` (a list, appended to by every ReferenceLatent node) and turn it into the model's
  `ref_latents` input in `BaseModel.extra_conds`. The pack attaches them the way ReferenceLatent does, via
  `node_helpers.conditioning_set_values(..., append=True)`; if a later release moves that helper, only
  `with_reference_latents` changes.
"""
from __future__ import annotations

import comfy.sd
import node_helpers
import torch

REFERENCE_LATENTS_KEY = "reference_latents"


def clip_type(name: str) -> comfy.sd.CLIPType | None:
    """The `comfy.sd.CLIPType` member called `name` (case-insensitive), or None where this ComfyUI lacks it
    (e.g. "FLUX2" before the 0.4x line)."""
    return getattr(comfy.sd.CLIPType, name.upper(), None)


def with_reference_latents(conditioning: list, latents: list[torch.Tensor]) -> list:
    """A copy of `conditioning` with `latents` appended to its reference latents, exactly as chaining one stock
    ReferenceLatent node per latent would do. Latents are in the VAE's space, as VAE.encode returns them."""
    if not latents:
        return conditioning
    return node_helpers.conditioning_set_values(conditioning, {REFERENCE_LATENTS_KEY: list(latents)}, append=True)


def reference_latents(conditioning: list) -> list[list[torch.Tensor]]:
    """The reference latents of every entry of `conditioning` (an empty list where an entry has none)."""
    return [list(extras.get(REFERENCE_LATENTS_KEY, [])) for _, extras in conditioning]
