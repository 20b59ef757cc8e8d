"""Training through model code written for inference.

Diffusion transformers written for sampling may update the residual stream in place, ``x += gate * f(norm(x))``
(ComfyUI's FLUX double- and single-stream blocks do, on the very tensors they receive as arguments). Autograd
refuses to backpropagate through that ("one of the variables needed for gradient computation has been modified
by an inplace operation") in two places:

* LayerNorm saves its input for backward, and the in-place add then changes it;
* gradient checkpointing saves each block's inputs for the recomputation, and the block then changes them.

And weights loaded under ``torch.inference_mode`` cannot be saved for backward at all (``make_weights_autograd_safe``).

While training, each block therefore works on copies of the tensors it is given, and each LayerNorm inside a
block normalizes a copy of its input. Values are unchanged; the cost is one copy of the residual stream per
block call and per norm call, of which only the norms' copies are kept for backward (in place of the input
LayerNorm would have kept anyway).
"""

import functools
from collections.abc import Iterable, Iterator
from contextlib import ExitStack, contextmanager

import torch
from torch import nn

from .forward_wrappers import wrapped_forwards


def _normalize_a_copy(_module: nn.Module, args: tuple):
    if args and isinstance(args[0], torch.Tensor) and args[0].requires_grad and torch.is_grad_enabled():
        return (args[0].clone(), *args[1:])
    return None


def _on_copies(forward, *args, **kwargs):
    # Whether or not an argument requires grad yet: the block may turn it into one that does, in place.
    if not torch.is_grad_enabled():
        return forward(*args, **kwargs)
    copy = lambda v: v.clone() if isinstance(v, torch.Tensor) and v.is_floating_point() else v  # noqa: E731
    return forward(*(copy(a) for a in args), **{k: copy(v) for k, v in kwargs.items()})


@contextmanager
def allow_inplace_residuals(blocks: Iterable[nn.Module], norm_types: tuple[type[nn.Module], ...] = (nn.LayerNorm,)
                            ) -> Iterator[None]:
    """While active, each of ``blocks`` receives copies of its floating-point tensor arguments while grad is
    enabled, and each ``norm_types`` layer inside them normalizes a copy of its input while autograd records it
    (grad enabled and the input requires grad); under ``no_grad`` nothing is copied.

    Enter it before gradient checkpointing wraps the blocks, so the copies are made inside the checkpointed
    function. Everything is restored on exit, also after an error.
    """
    blocks = list(blocks)
    with ExitStack() as stack:
        stack.enter_context(wrapped_forwards(blocks, lambda forward: functools.partial(_on_copies, forward)))
        for norm in (module for block in blocks for module in block.modules()):
            if isinstance(norm, norm_types):
                stack.callback(norm.register_forward_pre_hook(_normalize_a_copy).remove)
        yield


def make_weights_autograd_safe(module: nn.Module) -> None:
    """Replace inference-mode tensors among `module`'s parameters and buffers by ordinary copies of equal value.

    Inference code (ComfyUI's loaders among it) may load models inside torch.inference_mode, and autograd refuses to
    save such tensors for backward.
    Copies are made one tensor at a time, so memory grows by one tensor, not one model.
    """
    with torch.inference_mode(False):
        for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
            if tensor.is_inference():
                owner_name, _, attr = name.rpartition(".")
                owner = module.get_submodule(owner_name)
                copy = tensor.clone()
                if isinstance(tensor, nn.Parameter):
                    copy = nn.Parameter(copy, requires_grad=tensor.requires_grad)
                setattr(owner, attr, copy)
