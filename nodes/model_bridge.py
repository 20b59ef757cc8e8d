"""A ComfyUI MODEL as dopsd_core predictors.

ComfyUI's model call returns the denoised x0 for every model family, and its conditioning machinery turns a
CONDITIONING (text features, VLM features, reference latents, masks) into model inputs. Going through that
machinery, rather than calling the network directly, is what lets one training node serve any flow model.
"""
from __future__ import annotations

from contextlib import contextmanager

import comfy.model_management
import comfy.model_patcher
import comfy.model_sampling
import comfy.sampler_helpers
import comfy.samplers
import torch

from .errors import node_error


def require_flow_model(model, node) -> None:
    sampling = model.get_model_object("model_sampling")
    if not isinstance(sampling, comfy.model_sampling.CONST):
        raise node_error(
            node,
            f"the MODEL is not a flow-matching model (its sampling is {type(sampling).__name__})",
            "D-OPSD trains rectified-flow models such as Z-Image-Turbo or FLUX.2-klein; load one of those",
        )


def require_latents_of(model, latents: list[torch.Tensor], node) -> None:
    """The training set's latents must come from this model's VAE: a mixed-up VAE only shows up, otherwise, as
    a matrix-shape error deep inside the model."""
    expected = model.model.latent_format.latent_channels
    found = sorted({latent.shape[1] for latent in latents} - {expected})
    if found:
        raise node_error(
            node,
            f"the training set's images were encoded into {'/'.join(map(str, found))}-channel latents, but this "
            f"MODEL works on {expected}-channel latents: they come from another model's VAE",
            "connect the VAE (and CLIP) from this MODEL's own loader to the teacher-context node, or train the MODEL "
            "the training set was made for",
        )


@contextmanager
def explain_unreadable_conditioning(node):
    """Shape and key errors while the model first reads a training set's conditioning almost always mean a CLIP or
    teacher context made for another model; say so, with the model's own error, instead of that error alone."""
    try:
        yield
    except (KeyError, RuntimeError) as err:
        if isinstance(err, comfy.model_management.OOM_EXCEPTION) or "out of memory" in str(err).lower():
            raise
        raise node_error(
            node,
            f"the MODEL cannot read the training set's conditioning ({type(err).__name__}: {err}); it was probably "
            "made with another model's text encoder or teacher context",
            "build the training set with the CLIP and VAE from this MODEL's own loader and the teacher-context node "
            "of its family (VLM for Z-Image, Reference Image or Edit Tuning for FLUX.2-klein)",
        ) from err


class ModelSession:
    """A loaded MODEL with its conditionings prepared: `predict_x0(x, sigma, cond)` in the model's latent space.

    Latents from VAE.encode are in the VAE's space; `to_model_space` / `to_vae_space` convert, exactly as
    ComfyUI's samplers do around sampling.
    """

    def __init__(self, model, inner, model_options):
        self.model = model
        self.inner = inner
        self.model_options = model_options
        self.device = model.load_device
        self.dtype = model.model_dtype()

    def prepare(self, conditioning, latent_shape) -> list[dict]:
        """CONDITIONING -> the processed form `predict_x0` takes (done once per conditioning, not per call)."""
        noise = torch.zeros(latent_shape, device=self.device)
        conds = {"positive": comfy.sampler_helpers.convert_cond(conditioning)}
        return comfy.samplers.process_conds(self.inner, noise, conds, self.device, seed=0)["positive"]

    def predict_x0(self, x: torch.Tensor, sigma: torch.Tensor, prepared: list[dict]) -> torch.Tensor:
        return comfy.samplers.calc_cond_batch(self.inner, [prepared], x, sigma.to(x.device), self.model_options)[0]

    def check_reads(self, prepared: list[list[dict]], latent_shape) -> None:
        """One prediction per prepared conditioning, before any training state exists, so that a conditioning this
        model cannot read fails early (inside `explain_unreadable_conditioning`)."""
        x = torch.zeros(latent_shape, device=self.device)
        sigma = torch.ones(latent_shape[0], device=self.device)
        with torch.no_grad():
            for conditioning in prepared:
                self.predict_x0(x, sigma, conditioning)

    def to_model_space(self, latent: torch.Tensor) -> torch.Tensor:
        return self.inner.process_latent_in(latent.to(self.device))

    def to_vae_space(self, latent: torch.Tensor) -> torch.Tensor:
        return self.inner.process_latent_out(latent)


@contextmanager
def comfy_training_mode(training: bool = True):
    """Tell ComfyUI's model code that gradients will flow, for the duration of the block.

    ComfyUI 0.33 (not 0.3.75) runs fused inference-only kernels (comfy-kitchen: `rms_rope` in Z-Image's attention,
    `apply_rope` in FLUX/klein, INT8 linears) unless `comfy.model_management.in_training` is set: they have no
    autograd formula, and backward fails with "Trying to backward through comfy_kitchen... but no autograd formula
    was registered". 0.33's own TrainLoraNode sets the flag around its training loop (comfy_extras/nodes_train.py);
    so does this, restoring the previous value afterwards, also on error. Where the attribute does not exist
    (0.3.75) nothing changes."""
    mm = comfy.model_management
    if not training or not hasattr(mm, "in_training"):
        yield
        return
    previous = mm.in_training
    mm.in_training = True
    try:
        yield
    finally:
        mm.in_training = previous


@contextmanager
def model_session(model, latent_shape, training: bool):
    """Load `model` through ComfyUI's model management for a roll-out or a training run, and release it after.

    Training keeps every weight on the device (no partial offload) and asks for the memory of the activations
    too, so other models are unloaded first instead of failing mid-run (0.33's TrainLoraNode does the same with
    `force_full_load=True` unless it offloads; it asks for 1e20 bytes, i.e. unloads every other model, where this asks
    for an estimate). While training, ComfyUI's model code runs in training mode (`comfy_training_mode`).
    """
    if training:
        comfy.model_management.load_models_gpu(
            [model], memory_required=training_memory_estimate(model, latent_shape), force_full_load=True
        )
    inner, _, loaded = comfy.sampler_helpers.prepare_sampling(model, latent_shape, {}, model.model_options)
    options = comfy.model_patcher.create_model_options_clone(model.model_options)
    model.pre_run()
    try:
        with comfy_training_mode(training):
            yield ModelSession(model, inner, options)
    finally:
        model.cleanup()
        comfy.sampler_helpers.cleanup_models({}, loaded)


def training_memory_estimate(model, latent_shape) -> int:
    """ComfyUI's own estimate for one forward, times a margin for the activations autograd keeps for one backward."""
    activations_margin = 3
    memory_required, _ = comfy.sampler_helpers.estimate_memory(model, list(latent_shape), {})
    return int(memory_required * activations_margin)
