"""Wrapping modules' forward for the length of a block, the one way the core changes how a model runs."""

from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack, contextmanager

from torch import nn


@contextmanager
def wrapped_forwards(modules: Iterable[nn.Module], wrap: Callable[[Callable], Callable]) -> Iterator[None]:
    """Inside the block each module's ``forward`` is ``wrap(forward)``, set on the instance so that subclasses'
    own forwards and hooks still run; the instance's previous ``forward`` comes back on exit, also after an error."""
    with ExitStack() as stack:
        for module in modules:
            own_forward = module.__dict__.get("forward")
            module.forward = wrap(module.forward)
            stack.callback(_restore_forward, module, own_forward)
        yield


def _restore_forward(module: nn.Module, own_forward) -> None:
    if own_forward is None:
        del module.forward
    else:
        module.forward = own_forward
