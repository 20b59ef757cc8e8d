"""Trade compute for memory: recompute chosen submodules' activations during backward."""

import functools
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

from torch import nn
from torch.utils.checkpoint import checkpoint


@contextmanager
def gradient_checkpointing(modules: Iterable[nn.Module]) -> Iterator[None]:
    """Inside the block, each module keeps only its inputs for backward and reruns its forward there.

    Wraps the instance's ``forward`` (so subclasses' custom forwards and hooks still run) and
    restores it on exit, also after an error.
    """
    patched = []
    try:
        for module in modules:
            own_forward = module.__dict__.get("forward")
            module.forward = functools.partial(checkpoint, module.forward, use_reentrant=False)
            patched.append((module, own_forward))
        yield
    finally:
        for module, own_forward in reversed(patched):
            if own_forward is None:
                del module.forward
            else:
                module.forward = own_forward
