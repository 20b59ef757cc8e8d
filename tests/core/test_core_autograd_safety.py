"""Training through blocks that update their residual stream in place, as ComfyUI's FLUX blocks do."""
import pytest
import torch
from torch import nn

from dopsd_core import allow_inplace_residuals, gradient_checkpointing


class InPlaceBlock(nn.Module):
    """``x += gate * mlp(norm(x))`` on the tensor it is given, like ComfyUI's FLUX single-stream block."""

    def __init__(self, dim: int = 8, inplace: bool = True):
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False)
        self.mlp = nn.Linear(dim, dim)
        self.inplace = inplace

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        update = gate * self.mlp(self.norm(x))
        if self.inplace:
            x += update
            return x
        return x + update


class Stack(nn.Module):
    def __init__(self, inplace: bool):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Linear(8, 8).requires_grad_(False)  # a frozen input layer: block 0's input needs no grad
        self.blocks = nn.ModuleList(InPlaceBlock(inplace=inplace) for _ in range(3))

    def forward(self, x, gate):
        x = self.embed(x)
        for block in self.blocks:
            x = block(x, gate)
        return x


def gradients(model: Stack, checkpointing: bool, safe: bool) -> list[torch.Tensor]:
    x, gate = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(1)), torch.full((1, 1, 8), 0.5)
    with allow_inplace_residuals(model.blocks if safe else ()), \
            gradient_checkpointing(model.blocks if checkpointing else ()):
        model(x, gate).square().mean().backward()
    grads = [p.grad.clone() for p in model.blocks.parameters()]
    model.zero_grad(set_to_none=True)
    return grads


@pytest.mark.parametrize("checkpointing", [False, True])
def test_in_place_residual_blocks_fail_without_and_match_out_of_place_with(checkpointing):
    with pytest.raises(RuntimeError, match="modified by an inplace operation|different metadata"):
        gradients(Stack(inplace=True), checkpointing, safe=False)
    expected = gradients(Stack(inplace=False), checkpointing=False, safe=False)
    for ours, reference in zip(gradients(Stack(inplace=True), checkpointing, safe=True), expected):
        torch.testing.assert_close(ours, reference, rtol=0, atol=1e-7)


def test_everything_is_restored_and_inference_is_untouched():
    model = Stack(inplace=True)
    x, gate = torch.randn(2, 5, 8), torch.full((1, 1, 8), 0.5)
    with torch.no_grad():
        before = model(x.clone(), gate)
    with allow_inplace_residuals(model.blocks):
        assert all("forward" in block.__dict__ for block in model.blocks)
        with torch.no_grad():
            embedded = model.embed(x)
            out = model.blocks[0](embedded, gate)
            assert out is embedded, "under no_grad the block still works in place on what it is given (no copies)"
    assert all("forward" not in block.__dict__ for block in model.blocks)
    assert all(not block.norm._forward_pre_hooks for block in model.blocks)
    with torch.no_grad():
        assert torch.equal(model(x.clone(), gate), before)
