"""Trade compute for memory: recompute chosen submodules' activations during backward."""

import functools
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

from torch import nn
from torch.utils.checkpoint import checkpoint

from .forward_wrappers import wrapped_forwards


@contextmanager
def gradient_checkpointing(modules: Iterable[nn.Module]) -> Iterator[None]:
    """Inside the block, each module keeps only its inputs for backward and reruns its forward there.

    Wraps the instance's ``forward`` (so subclasses' custom forwards and hooks still run) and
    restores it on exit, also after an error.
    """
    with wrapped_forwards(modules, lambda forward: functools.partial(checkpoint, forward, use_reentrant=False)):
        yield
