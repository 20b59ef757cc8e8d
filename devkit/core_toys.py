"""Small pure-torch stand-ins for a ComfyUI flow model, shared by the core tests and benchmark."""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from dopsd_core import DualLora, append_dims, noise_latent, x0_loss

LORA_TARGETS = r"blocks\.\d+\.(q|k|v|out|ff_in|ff_out)"


class CastLinear(nn.Linear):
    """Like ComfyUI's linear layers: a subclass whose forward casts the weights to the input dtype."""

    def forward(self, x: Tensor) -> Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.weight.to(x.dtype), bias)


@dataclass(frozen=True)
class ToyCond:
    """A prompt embedding, and for the teacher the target latent as a reference."""

    prompt: Tensor
    reference: Tensor | None = None


class Block(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False)
        self.q, self.k, self.v, self.out = (CastLinear(dim, dim) for _ in range(4))
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False)
        self.ff_in, self.ff_out = CastLinear(dim, 4 * dim), CastLinear(4 * dim, dim)
        self.modulation = CastLinear(dim, 2 * dim)

    def forward(self, h: Tensor, c: Tensor) -> Tensor:
        shift, scale = rearrange(self.modulation(c), "b (two d) -> two b 1 d", two=2)
        y = self.norm1(h) * (1 + scale) + shift
        q, k, v = (rearrange(proj(y), "b n (h d) -> b h n d", h=self.heads) for proj in (self.q, self.k, self.v))
        h = h + self.out(rearrange(F.scaled_dot_product_attention(q, k, v), "b h n d -> b n (h d)"))
        return h + self.ff_out(F.gelu(self.ff_in(self.norm2(h))))


class ToyDiT(nn.Module):
    """A DiT-like x0 predictor ``(x [B, C, H, W], sigma [B], ToyCond) -> x0``; a reference latent
    is patchified and added to the image tokens, like an in-context reference image."""

    def __init__(self, channels=4, size=8, patch=2, dim=64, depth=2, heads=4, prompt_dim=8):
        super().__init__()
        self.patch = patch
        patch_dim, tokens = channels * patch * patch, (size // patch) ** 2
        self.x_in, self.reference_in = CastLinear(patch_dim, dim), CastLinear(patch_dim, dim)
        self.position = nn.Parameter(torch.randn(tokens, dim))
        self.register_buffer("frequencies", torch.logspace(0, 3, 8))
        self.sigma_in, self.prompt_in = CastLinear(16, dim), CastLinear(prompt_dim, dim)
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(depth))
        self.norm_out = nn.LayerNorm(dim)
        self.x0_out = CastLinear(dim, patch_dim)

    def tokens(self, latent: Tensor) -> Tensor:
        return rearrange(latent, "b c (h p) (w q) -> b (h w) (c p q)", p=self.patch, q=self.patch)

    def forward(self, x: Tensor, sigma: Tensor, cond: ToyCond) -> Tensor:
        angles = sigma[:, None] * self.frequencies
        c = F.silu(self.sigma_in(torch.cat([angles.sin(), angles.cos()], -1)) + self.prompt_in(cond.prompt))
        h = self.x_in(self.tokens(x)) + self.position
        if cond.reference is not None:
            h = h + self.reference_in(self.tokens(cond.reference))
        for block in self.blocks:
            h = block(h, c)
        side = x.shape[-1] // self.patch
        return rearrange(
            self.x0_out(self.norm_out(h)), "b (h w) (c p q) -> b c (h p) (w q)", w=side, p=self.patch, q=self.patch
        )


def random_adapter_state(adapters: DualLora, seed: int, scale: float = 0.1) -> dict:
    """A non-trivial adapter state (the fresh one has ``up = 0``) of the right shapes."""
    generator = torch.Generator().manual_seed(seed)
    return {
        name: {
            "down": scale * torch.randn(entry["down"].shape, generator=generator),
            "up": scale * torch.randn(entry["up"].shape, generator=generator),
            "alpha": entry["alpha"],
        }
        for name, entry in adapters.student_state().items()
    }


def role_predictor(model: nn.Module, adapters: DualLora, role: str, cond: ToyCond):
    """``(x, sigma) -> x0`` of one role with a fixed conditioning, for roll-outs and previews."""

    def predict(x: Tensor, sigma: Tensor) -> Tensor:
        with adapters.use(role):
            return model(x, sigma, cond)

    return predict


def reference_dopsd_backward(model, adapters, student_cond, teacher_cond, noise, sigmas) -> Tensor:
    """The authors' formulation, written out here rather than through the pack's roll-out: an Euler walk from
    ``sigmas[0] * noise`` driven by the student's x0, each state detached (no gradient through time), every
    step's student graph kept, the K x0 losses averaged, one backward. Returns the per-step losses."""
    losses = []
    x = sigmas[0] * noise
    with adapters.use("student"):
        for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
            sigma_batch = sigma.expand(x.shape[0])
            with torch.no_grad(), adapters.use("teacher"):
                teacher_x0 = model(x, sigma_batch, teacher_cond)
            student_x0 = model(x, sigma_batch, student_cond)
            losses.append((student_x0 - teacher_x0).square().mean())
            x = (x + (x - student_x0) / sigma * (sigma_next - sigma)).detach()
    torch.stack(losses).mean().backward()
    return torch.stack(losses).detach()


def pretrain_in_context_copy(model: ToyDiT, steps: int = 200, batch: int = 32, seed: int = 0) -> ToyDiT:
    """Teach the base model, by x0 regression on random latents, to reproduce the reference when
    it gets one (every other step) and to predict the mean without: a teacher context that
    carries the target, as in D-OPSD, and a student that lacks it."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(steps):
        x0, noise = (torch.randn(batch, 4, 8, 8, generator=generator) for _ in range(2))
        sigma = torch.rand(batch, generator=generator)
        prompt = torch.randn(batch, 8, generator=generator)
        x = noise_latent(x0, noise, append_dims(sigma, x0.ndim))
        cond = ToyCond(prompt, x0 if step % 2 == 0 else None)
        loss = x0_loss(model(x, sigma, cond), x0)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.requires_grad_(False)
