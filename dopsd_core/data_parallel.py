"""Data parallelism: one optimizer step's micro-steps spread over processes, their gradients averaged.

With W processes of A micro-steps each, an optimizer step has a batch of A·W roll-outs; process r
runs micro-steps r·A … r·A + A - 1. Each micro-step draws from ``micro_step_generator(seed, step,
index)`` alone, so W processes with A micro-steps draw exactly what one process with A·W draws, and
the averaged gradient is the one that process accumulates (up to the order of the float sums).

Why not DistributedDataParallel: its reducer expects one backward per forward through the wrapped
module, and a D-OPSD micro-step runs 2K forwards and K backwards (one per roll-out step) through
ComfyUI's model call. The gradients are averaged once per optimizer step instead, with one
``all_reduce`` per dtype: the collective DDP's buckets issue, without overlap, which matters little
for LoRA gradients that are small next to a roll-out's compute.
"""

import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor


def micro_step_generator(seed: int, step: int, index: int) -> torch.Generator:
    """The CPU generator micro-step ``index`` of optimizer step ``step`` (both from 0) draws from."""
    high, low = np.random.SeedSequence([seed, step, index]).generate_state(2, np.uint32)
    return torch.Generator().manual_seed(int(high) << 32 | int(low))


@dataclass(frozen=True)
class DataParallel:
    """This process's place among ``world_size`` training processes (``torch.distributed`` must be
    initialised when ``world_size`` > 1)."""

    rank: int = 0
    world_size: int = 1

    def __post_init__(self):
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is not among {self.world_size} processes")

    def micro_steps(self, per_process: int) -> range:
        """The batch indices of this process's micro-steps."""
        return range(self.rank * per_process, (self.rank + 1) * per_process)

    def average_(self, tensors: Sequence[Tensor]) -> float:
        """Replace each tensor by its mean over the processes, in place; returns the seconds it took (which
        include waiting for the slowest process)."""
        if self.world_size == 1:
            return 0.0
        start = time.perf_counter()
        by_dtype: dict[torch.dtype, list[Tensor]] = {}
        for tensor in tensors:
            by_dtype.setdefault(tensor.dtype, []).append(tensor)
        for group in by_dtype.values():
            flat = torch.cat([t.reshape(-1) for t in group])
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)
            flat /= self.world_size
            for tensor, part in zip(group, flat.split([t.numel() for t in group])):
                tensor.copy_(part.view_as(tensor))
        return time.perf_counter() - start
