"""Cost model of one D-OPSD optimizer step for the real models, from their architectures' dimensions.

Arithmetic only (no torch, no weights): FLOPs of one optimizer step with the authors' effective batch
(gradient accumulation 4, 8 for klein edit tuning: their batch 1 on each of 4 or 8 GPUs), projected seconds
per step and hours per run (2000 steps Z-Image, 3000 klein) on one H100 at a stated utilisation, and the GPU
memory a run needs with bf16 weights, rank-64 LoRA and gradient checkpointing; then which knob (K,
accumulation, resolution, rank, checkpointing, conditioning caching, fp8 weights) moves time and memory most; and
which family, resolution and weight dtype fit an 8, 12, 16 or 24 GB card; and the hours per run on 1, 2, 4 or 8
H100s of one node (multi_gpu/train.py: the batch split over the GPUs, the LoRA gradients all-reduced each step).

Architectures (as ComfyUI builds them):
- Z-Image-Turbo: NextDiT, dim 3840, 30 heads of 128, 30 joint layers + 2 noise-refiner layers (image
  tokens) + 2 context-refiner layers (caption tokens), SwiGLU feed-forward 10240, patch 2 on the 16-channel
  FLUX.1 latent (1024 px -> 4096 image tokens), caption features 2560 wide (Qwen3-4B). 6.15 B parameters.
- FLUX.2-klein 4B: hidden 3072, 24 heads, 5 double-stream + 20 single-stream blocks, SwiGLU MLP ratio 3,
  128-channel latent at /16 (1024 px -> 4096 image tokens), text features 7680 wide (3 x 2560), 512 text
  tokens. klein 9B: hidden 4096, 32 heads, 8 double + 24 single blocks, text features 12288 wide.
- LoRA targets: the published recipe, q, k and v as three adapters. Z-Image: attention q/k/v/out and
  feed-forward of every block; klein: the double blocks' attention projections only (both streams). Both
  adapters (student trained, teacher EMA) kept in float32.

What one D-OPSD step is (batch 1, K roll-out steps): K x [teacher forward (no grad, teacher context) +
student forward + student backward (+ one recomputed student forward with gradient checkpointing)].
FLOP conventions: a linear layer costs 2*tokens*in*out forward; its backward costs the same again because
only the input gradient is needed (base weights are frozen); LoRA adds 2*tokens*rank*(in+out) forward and
twice that backward (input and adapter-weight gradients). Attention costs 4*L^2*width forward and 2.5x that
backward (FlashAttention recomputes the scores). Norms, RoPE and gating are bandwidth, not FLOPs; the
utilisation figure absorbs them.

Run: .venv/bin/python benchmarks/cost_model.py [--utilisation 0.4]
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass, replace

GB = 1e9
H100_BF16_DENSE_FLOPS = 989e12  # H100 SXM, bf16 tensor cores, dense
BF16 = 2
LORA_BYTES_PER_PARAM = 4 * 5  # float32 student + its gradient + AdamW m and v + float32 EMA teacher


@dataclass(frozen=True)
class Block:
    """``count`` identical transformer blocks. ``linears``: (in, out, stream, adapters) with stream "img",
    "txt" or "all" (the joint sequence) and the number of LoRA adapters on the layer's output slices (0: not
    adapted; 3: a fused qkv with q, k and v adapted separately). ``attention``: the stream attention runs over."""

    count: int
    linears: tuple[tuple[int, int, str, int], ...]
    attention: str
    width: int  # attention width (heads x head_dim)


@dataclass(frozen=True)
class Arch:
    name: str
    blocks: tuple[Block, ...]
    embedders: tuple[tuple[int, int, str], ...]  # per-token linear layers outside the blocks
    other_params: float  # modulation, embeddings etc. (counted in memory, negligible FLOPs)
    patch_pixels: int  # pixels per image token side (VAE factor x patch)
    text_tokens_student: int
    text_tokens_teacher: int
    teacher_reference_images: int  # FLUX.2 editing-branch teacher: target image as reference latents
    student_reference_images: int  # FLUX.2 edit tuning: the source image as a reference latent
    encoder_params: float  # text encoder (+ vision tower) parameters, resident unless conditioning is cached

    @property
    def params(self) -> float:
        linear = sum(b.count * sum(i * o for i, o, _, _ in b.linears) for b in self.blocks)
        return linear + sum(i * o for i, o, _ in self.embedders) + self.other_params

    def lora_params(self, rank: int) -> float:
        return sum(b.count * sum(lora_size(i, o, adapters, rank) for i, o, _, adapters in b.linears) for b in self.blocks)


def lora_size(in_features: int, out_features: int, adapters: int, rank: int) -> int:
    """Parameters of ``adapters`` rank-``rank`` LoRAs, each on an equal slice of the layer's outputs."""
    return adapters * rank * in_features + rank * out_features if adapters else 0


def zimage_turbo() -> Arch:
    d, f = 3840, 10240
    layer = ((d, 3 * d, "all", 3), (d, d, "all", 1), (d, f, "all", 1), (d, f, "all", 1), (f, d, "all", 1))

    def on(stream):
        return tuple((i, o, stream, lora) for i, o, _, lora in layer)

    return Arch(
        name="Z-Image-Turbo 6B",
        blocks=(Block(30, layer, "all", d), Block(2, on("img"), "img", d), Block(2, on("txt"), "txt", d)),
        embedders=((64, d, "img"), (2560, d, "txt"), (d, 64, "img")),
        other_params=32 * 256 * 4 * d + 40e6,  # adaLN modulation of 32 modulated blocks, t-embedder, final layer
        patch_pixels=16,
        # Student: the prompt in Z-Image's chat template, padded to a multiple of 32 (<= 512).
        # Teacher: Qwen3-VL features of a 768^2 image (576 merged patches) + the prompt (<= 1024).
        text_tokens_student=128,
        text_tokens_teacher=704,
        teacher_reference_images=0,
        student_reference_images=0,
        encoder_params=4.02e9 + 0.41e9,  # Qwen3-4B + the Qwen3-VL-4B vision tower
    )


def flux2_klein(hidden: int, double: int, single: int, context: int, name: str, encoder_params: float) -> Arch:
    h, m = hidden, 3 * hidden
    stream = lambda s: ((h, 3 * h, s, 3), (h, h, s, 1), (h, 2 * m, s, 0), (m, h, s, 0))  # noqa: E731
    return Arch(
        name=name,
        blocks=(
            Block(double, stream("img") + stream("txt"), "all", h),
            Block(single, ((h, 3 * h + 2 * m, "all", 0), (h + m, h, "all", 0)), "all", h),
        ),
        embedders=((128, h, "img"), (context, h, "txt"), (h, 128, "img")),
        other_params=2 * 6 * h * h + 3 * h * h + 60e6,  # global modulation, time embedder, final layer
        patch_pixels=16,
        text_tokens_student=512,
        text_tokens_teacher=512,  # the prompt + the keep-identity instruction, padded to 512
        teacher_reference_images=1,
        student_reference_images=0,
        encoder_params=encoder_params,
    )


def edit_tuning(arch: Arch) -> Arch:
    """klein edit tuning with one source: the student sees it as a reference, the teacher the source and target."""
    return replace(arch, name=f"{arch.name} edit", student_reference_images=1, teacher_reference_images=2)


ARCHS = {
    "zimage": zimage_turbo(),
    "klein4b": flux2_klein(3072, 5, 20, 7680, "FLUX.2-klein 4B", 4.02e9),
    "klein9b": flux2_klein(4096, 8, 24, 12288, "FLUX.2-klein 9B", 8.19e9),
}
ARCHS["klein4b_edit"] = edit_tuning(ARCHS["klein4b"])
# The published runs: (architecture, K, gradient accumulation, optimizer steps).
RUNS = (("zimage", 4, 4, 2000), ("zimage", 8, 4, 2000), ("klein4b", 4, 4, 3000), ("klein4b_edit", 4, 8, 3000),
        ("klein9b", 4, 4, 3000))


@dataclass(frozen=True)
class Knobs:
    k: int = 4
    accumulation: int = 4
    resolution: int = 1024
    rank: int = 64
    checkpointing: bool = True
    cache_conditioning: bool = True
    utilisation: float = 0.4
    weight_bytes: int = BF16  # 1: the loader's fp8 weight_dtype (every linear layer's weight in fp8)


def tokens(arch: Arch, knobs: Knobs, teacher: bool) -> dict[str, int]:
    image = (knobs.resolution // arch.patch_pixels) ** 2
    if teacher:
        image *= 1 + arch.teacher_reference_images
        text = arch.text_tokens_teacher
    else:
        image *= 1 + arch.student_reference_images
        text = arch.text_tokens_student
    return {"img": image, "txt": text, "all": image + text}


def forward_flops(arch: Arch, knobs: Knobs, teacher: bool) -> tuple[float, float, float]:
    """(base linear, LoRA, attention) FLOPs of one forward pass."""
    n = tokens(arch, knobs, teacher)
    linear = sum(2 * n[s] * i * o for i, o, s in arch.embedders)
    lora = attention = 0.0
    for block in arch.blocks:
        for i, o, s, adapters in block.linears:
            linear += block.count * 2 * n[s] * i * o
            lora += block.count * 2 * n[s] * lora_size(i, o, adapters, knobs.rank)
        attention += block.count * 4 * n[block.attention] ** 2 * block.width
    return linear, lora, attention


def step_flops(arch: Arch, knobs: Knobs) -> dict[str, float]:
    t_lin, t_lora, t_att = forward_flops(arch, knobs, teacher=True)
    s_lin, s_lora, s_att = forward_flops(arch, knobs, teacher=False)
    student_forward = s_lin + s_lora + s_att
    parts = {
        "teacher forward": t_lin + t_lora + t_att,
        "student forward": student_forward,
        "student backward": s_lin + 2 * s_lora + 2.5 * s_att,
        "recomputation (checkpointing)": student_forward if knobs.checkpointing else 0.0,
    }
    per_step = {name: knobs.accumulation * knobs.k * value for name, value in parts.items()}
    if not knobs.cache_conditioning:
        # Re-encode the student prompt and the teacher context every optimizer step (2 FLOPs/param/token).
        per_step["conditioning encoders"] = 2 * arch.encoder_params * (arch.text_tokens_student + arch.text_tokens_teacher)
    return per_step


def activation_bytes_per_block(block: Block, n: dict[str, int], rank: int) -> float:
    """bf16 tensors one block keeps for backward: every linear's input (and LoRA's rank-wide hidden), the
    attention's q, k, v, output, and ~6 token-wide tensors of norms, modulation, gating and residuals."""
    saved = 0.0
    for i, o, s, adapters in block.linears:
        saved += n[s] * (i + rank * adapters)
        if o > 2 * block.width:  # gated feed-forward: the two halves and their product
            saved += n[s] * o
    saved += n[block.attention] * (4 * block.width + 6 * block.width)
    return BF16 * saved


def memory(arch: Arch, knobs: Knobs) -> dict[str, float]:
    n = tokens(arch, knobs, teacher=False)
    per_block = [(block, activation_bytes_per_block(block, n, knobs.rank)) for block in arch.blocks]
    if knobs.checkpointing:
        boundaries = sum(block.count * BF16 * n[block.attention] * block.width for block, _ in per_block)
        activations = boundaries + max(size for _, size in per_block)
    else:
        activations = sum(block.count * size for block, size in per_block)
    teacher_n = tokens(arch, knobs, teacher=True)
    widest = max(o for block in arch.blocks for _, o, _, _ in block.linears)
    linear = arch.params - arch.other_params
    parts = {
        "weights": knobs.weight_bytes * linear + BF16 * arch.other_params,
        "LoRA student+teacher, grads, AdamW (fp32)": LORA_BYTES_PER_PARAM * arch.lora_params(knobs.rank),
        "activations of one roll-out step": activations,
        "teacher forward transient (no grad)": BF16 * teacher_n["all"] * 2 * widest,
    }
    if not knobs.cache_conditioning:
        parts["text encoder / VLM weights resident (bf16)"] = BF16 * arch.encoder_params
    return parts


# What a GPU needs beyond the run's tensors: the CUDA context, cuBLAS workspaces, allocator slack.
CUDA_OVERHEAD_GB = 1.5
# Bus bandwidth NCCL's all_reduce reaches between the H100s of one NVLink node, conservatively (bytes/s).
NVLINK_ALLREDUCE_BUS_BANDWIDTH = 300e9
GPU_COUNTS = (1, 2, 4, 8)
CARDS_GB = (8, 12, 16, 24)
FIT_ROWS = (("zimage", 1024), ("zimage", 768), ("zimage", 512), ("klein4b", 1024), ("klein4b", 768),
            ("klein4b", 512), ("klein9b", 1024), ("klein9b", 768), ("klein9b", 512))


def print_fit_table() -> None:
    """Which family, resolution and weight dtype fit which card (rank 64, gradient checkpointing, conditioning
    encoded once, one image per roll-out)."""
    print(f"{'model':21s} {'px':>5s} {'weights':>8s} {'GB':>6s} " + " ".join(f"{gb:>5d}GB" for gb in CARDS_GB))
    for key, resolution in FIT_ROWS:
        for dtype, weight_bytes in (("bf16", BF16), ("fp8", 1)):
            knobs = Knobs(resolution=resolution, weight_bytes=weight_bytes)
            need = sum(memory(ARCHS[key], knobs).values()) / GB + CUDA_OVERHEAD_GB
            print(f"{ARCHS[key].name:21s} {resolution:5d} {dtype:>8s} {need:6.1f} "
                  + " ".join(f"{'yes' if need <= gb else '-':>7s}" for gb in CARDS_GB))


def seconds_per_step_on(arch: Arch, knobs: Knobs, gpus: int) -> float:
    """One optimizer step with the batch (knobs.accumulation) split over `gpus` (which must divide it), plus a ring
    all_reduce of the float32 LoRA gradients, which does not overlap the compute (dopsd_core.data_parallel)."""
    compute = seconds_per_step(arch, replace(knobs, accumulation=knobs.accumulation // gpus))
    gradient_bytes = 4 * arch.lora_params(knobs.rank)
    return compute + 2 * (gpus - 1) / gpus * gradient_bytes / NVLINK_ALLREDUCE_BUS_BANDWIDTH


def print_gpu_count_table(utilisation: float) -> None:
    print(f"{'model':21s} {'K':>2s} {'batch':>5s} " + " ".join(f"{f'{n} GPU h/run':>12s}" for n in GPU_COUNTS)
          + f" {'all_reduce':>10s}")
    for key, k, batch, steps in RUNS:
        arch, knobs = ARCHS[key], Knobs(k=k, accumulation=batch, utilisation=utilisation)
        hours = [f"{seconds_per_step_on(arch, knobs, n) * steps / 3600:12.2f}" if batch % n == 0 else f"{'-':>12s}"
                 for n in GPU_COUNTS]
        allreduce_ms = 1e3 * 2 * 4 * arch.lora_params(knobs.rank) / NVLINK_ALLREDUCE_BUS_BANDWIDTH
        print(f"{arch.name:21s} {k:2d} {batch:5d} " + " ".join(hours) + f" {allreduce_ms:8.1f}ms")


def seconds_per_step(arch: Arch, knobs: Knobs) -> float:
    return sum(step_flops(arch, knobs).values()) / (H100_BF16_DENSE_FLOPS * knobs.utilisation)


def summary_rows(utilisation: float):
    rows = []
    for key, k, accumulation, steps in RUNS:
        arch, knobs = ARCHS[key], Knobs(k=k, accumulation=accumulation, utilisation=utilisation)
        flops = sum(step_flops(arch, knobs).values())
        seconds = seconds_per_step(arch, knobs)
        rows.append((arch, knobs, steps, flops, seconds, sum(memory(arch, knobs).values())))
    return rows


ZIMAGE_RUN_STEPS = 2000
KNOBS = [
    ("baseline (K=4, accumulation 4, 1024 px, rank 64)", {}),
    ("K = 8", {"k": 8}),
    ("K = 2", {"k": 2}),
    ("accumulation 1 (one roll-out per step)", {"accumulation": 1}),
    ("resolution 768 px", {"resolution": 768}),
    ("resolution 1536 px", {"resolution": 1536}),
    ("rank 16", {"rank": 16}),
    ("rank 128", {"rank": 128}),
    ("no gradient checkpointing", {"checkpointing": False}),
    ("conditioning re-encoded every step", {"cache_conditioning": False}),
    ("fp8 weights", {"weight_bytes": 1}),
]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--utilisation", type=float, default=0.4,
                        help="fraction of the H100's 989 TFLOP/s bf16 dense peak reached (default 0.4)")
    args = parser.parse_args(argv)
    u = args.utilisation
    print(f"Cost model: one D-OPSD optimizer step of the published recipe (gradient accumulation = the authors' GPU "
          f"count, batch 1 each), 1024x1024, bf16 weights, LoRA rank 64 on the published targets, gradient "
          f"checkpointing, conditioning encoded once; one H100 SXM at {100 * u:.0f}% of 989 TFLOP/s bf16")
    print(f"{'model':21s} {'params':>7s} {'LoRA':>6s} {'K':>2s} {'acc':>3s} {'TFLOP/step':>11s} {'s/step':>7s} "
          f"{'steps':>6s} {'h/run':>6s} {'memory GB':>10s}")
    for arch, knobs, steps, flops, seconds, mem in summary_rows(u):
        print(f"{arch.name:21s} {arch.params / 1e9:6.2f}B {arch.lora_params(knobs.rank) / 1e6:5.1f}M {knobs.k:2d} "
              f"{knobs.accumulation:3d} {flops / 1e12:11.0f} {seconds:7.2f} {steps:6d} {seconds * steps / 3600:6.2f} "
              f"{mem / GB:10.1f}")
    print("  Plain SFT at the same batch of 4 costs one student forward+backward(+recompute) per image, per step: "
          + ", ".join(f"{ARCHS[key].name} {sft_seconds(ARCHS[key], Knobs(utilisation=u)):.2f} s"
                      for key in ("zimage", "klein4b", "klein9b")) + ".")
    zimage = ARCHS["zimage"]
    base = Knobs(utilisation=u)
    parts = step_flops(zimage, base)
    total = sum(parts.values())
    print(f"  Where a Z-Image K=4 roll-out's FLOPs go: "
          + ", ".join(f"{name} {100 * value / total:.0f}%" for name, value in parts.items()))
    mem = memory(zimage, base)
    print(f"  Z-Image memory, GB: " + ", ".join(f"{name} {value / GB:.1f}" for name, value in mem.items())
          + "; add ~1-2 GB for the CUDA context and allocator slack.")
    print()
    print(f"Which knob moves it most (Z-Image-Turbo; factor vs baseline):")
    print(f"{'knob':48s} {'s/step':>7s} {'x time':>7s} {'h/2000':>7s} {'memory GB':>10s} {'x memory':>9s}")
    base_s, base_m = seconds_per_step(zimage, base), sum(memory(zimage, base).values())
    for label, change in KNOBS:
        knobs = replace(base, **change)
        s, m = seconds_per_step(zimage, knobs), sum(memory(zimage, knobs).values())
        print(f"{label:48s} {s:7.2f} {s / base_s:7.2f} {s * ZIMAGE_RUN_STEPS / 3600:7.2f} {m / GB:10.1f} "
              f"{m / base_m:9.2f}")
    print("  Memory depends on neither K nor accumulation here: each roll-out step is back-propagated at once and its "
          "graph freed, and accumulated gradients add into one buffer. A single backward over all K steps (the "
          "reference code) would keep K steps' activations.")
    print()
    print(f"Which GPU fits a run (memory above + {CUDA_OVERHEAD_GB} GB for the CUDA context and allocator slack):")
    print_fit_table()
    print()
    print(f"Several GPUs of one node (multi_gpu/train.py; '-': the GPU count does not divide the batch; all_reduce: "
          f"the LoRA gradients at {NVLINK_ALLREDUCE_BUS_BANDWIDTH / 1e9:.0f} GB/s bus bandwidth, per step):")
    print_gpu_count_table(u)


def sft_seconds(arch: Arch, knobs: Knobs) -> float:
    s_lin, s_lora, s_att = forward_flops(arch, knobs, teacher=False)
    forward = s_lin + s_lora + s_att
    flops = knobs.accumulation * (forward + (s_lin + 2 * s_lora + 2.5 * s_att) + (forward if knobs.checkpointing else 0.0))
    return flops / (H100_BF16_DENSE_FLOPS * knobs.utilisation)


if __name__ == "__main__":
    main()
