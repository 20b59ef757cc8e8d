"""Benchmark of the dopsd_core training step on a small DiT-like model (a script, not a test).

(a) Overhead: wall time of one D-OPSD optimizer step divided by the sum of its parts timed on
    their own (K teacher forwards under no_grad + K student forward+backward passes).
(b) Memory: peak bytes of activations saved for backward, backward per roll-out step (the
    trainer) vs one backward of the summed loss (the reference code), for K = 2, 4, 8. Counted
    with saved-tensor hooks (parameters excluded), so it works on CPU; on CUDA the allocator's
    peak is printed as well.

Run from the repository root: python benchmarks/bench_core.py [--repeats 7] [--threads 1] [--device cpu]
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dopsd_core import (  # noqa: E402
    DualLora,
    LoraSpec,
    Trainer,
    TrainConfig,
    TrainingItem,
    TrainingPair,
    flux2_klein_sigmas,
    x0_loss,
)
from devkit.core_toys import LORA_TARGETS, ToyCond, ToyDiT, reference_dopsd_backward  # noqa: E402

MIB = 2**20


class SavedActivationMeter:
    """Bytes of tensors autograd keeps for backward, alive at once; parameters are not counted."""

    def __init__(self, parameters):
        self.parameter_storages = {p.untyped_storage().data_ptr() for p in parameters}
        self.live: dict[int, list[int]] = {}  # storage -> [saved references, bytes]
        self.current = self.peak = 0

    def pack(self, tensor: torch.Tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() in self.parameter_storages:
            return tensor
        return _SavedTensor(self, tensor, storage.data_ptr(), storage.nbytes())

    @staticmethod
    def unpack(saved):
        return saved.tensor if isinstance(saved, _SavedTensor) else saved

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)

    def acquire(self, storage: int, nbytes: int) -> None:
        entry = self.live.setdefault(storage, [0, nbytes])
        if entry[0] == 0:
            self.current += nbytes
            self.peak = max(self.peak, self.current)
        entry[0] += 1

    def release(self, storage: int) -> None:
        entry = self.live[storage]
        entry[0] -= 1
        if entry[0] == 0:
            self.current -= entry[1]
            del self.live[storage]


class _SavedTensor:
    def __init__(self, meter: SavedActivationMeter, tensor: torch.Tensor, storage: int, nbytes: int):
        self.meter, self.tensor, self.storage = meter, tensor, storage
        meter.acquire(storage, nbytes)

    def __del__(self):
        self.meter.release(self.storage)


def build(k: int, device: torch.device, dim: int, depth: int, side: int):
    torch.manual_seed(0)
    model = ToyDiT(channels=4, size=side, patch=2, dim=dim, depth=depth, heads=4).to(device)
    adapters = DualLora(model, LoraSpec(rank=64, alpha=128.0, target_modules=LORA_TARGETS))
    generator = torch.Generator().manual_seed(1)
    prompt = torch.randn(1, 8, generator=generator).to(device)
    reference = torch.randn(1, 4, side, side, generator=generator).to(device)
    pair = TrainingPair(ToyCond(prompt), ToyCond(prompt, reference))
    tokens = (side // 2) ** 2
    trainer = Trainer(
        model, adapters, [TrainingItem([pair], (4, side, side))], flux2_klein_sigmas(k, tokens), TrainConfig(), device
    )
    return model, adapters, pair, trainer


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device) -> float:
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def overhead(device: torch.device, repeats: int, k: int, **shape) -> None:
    model, adapters, pair, trainer = build(k, device, **shape)
    x = torch.randn(1, 4, shape["side"], shape["side"], device=device)
    sigma = torch.full((1,), 0.5, device=device)
    with torch.no_grad():
        target = model(x, sigma, pair.teacher_cond)

    def teacher_forwards():
        with torch.no_grad(), adapters.use("teacher"):
            for _ in range(k):
                model(x, sigma, pair.teacher_cond)

    def student_forward_backwards():
        with adapters.use("student"):
            for _ in range(k):
                x0_loss(model(x, sigma, pair.student_cond), target).backward()
        for p in adapters.student_parameters():
            p.grad = None

    timed(lambda: trainer.train(1), device)  # warm-up
    steps, teachers, students = [], [], []
    for _ in range(repeats):  # interleaved, so a busy machine slows all three alike
        steps.append(timed(lambda: trainer.train(1), device))
        teachers.append(timed(teacher_forwards, device))
        students.append(timed(student_forward_backwards, device))
    ratios = [s / (t + u) for s, t, u in zip(steps, teachers, students)]

    def ms(values: list[float]) -> str:
        return f"{1e3 * statistics.median(values):8.1f} ms"

    print(f"(a) K={k}, median of {repeats}")
    print(f"    one D-OPSD optimizer step       {ms(steps)}")
    print(f"    {k} teacher forwards (no_grad)    {ms(teachers)}")
    print(f"    {k} student forward+backward      {ms(students)}")
    print(f"    step / sum of parts             {statistics.median(ratios):8.3f}   (target <= 1.15; "
          f"min {min(ratios):.3f}, max {max(ratios):.3f})")


def peak_saved_bytes(fn, model: torch.nn.Module) -> int:
    meter = SavedActivationMeter(model.parameters())
    with meter.hooks():
        fn()
    return meter.peak


def memory(device: torch.device, ks: tuple[int, ...], **shape) -> None:
    print("(b) peak activations saved for backward (MiB)")
    model, adapters, pair, trainer = build(1, device, **shape)
    x = torch.randn(1, 4, shape["side"], shape["side"], device=device)
    sigma = torch.full((1,), 0.5, device=device)
    one_step = peak_saved_bytes(lambda: model(x, sigma, pair.student_cond), model)
    print(f"    one roll-out step (one student forward): {one_step / MIB:.2f} MiB")
    print("     K   per-step backward   summed-loss backward   ratio   allocator peak per-step / summed")
    peaks = {}
    for k in ks:
        model, adapters, pair, trainer = build(k, device, **shape)
        noise = torch.randn(1, 4, shape["side"], shape["side"], device=device)
        runs = {
            "per_step": lambda: trainer.accumulate_gradients(0),
            "summed": lambda: reference_dopsd_backward(
                model, adapters, pair.student_cond, pair.teacher_cond, noise, trainer.sigmas
            ),
        }
        allocator = {}
        for name, run in runs.items():
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
                baseline = torch.cuda.memory_allocated(device)
            peaks[k, name] = peak_saved_bytes(run, model)
            if device.type == "cuda":
                allocator[name] = f"{(torch.cuda.max_memory_allocated(device) - baseline) / MIB:.1f}"
            for p in adapters.student_parameters():
                p.grad = None
        allocator_text = " / ".join(allocator.values()) if allocator else "n/a (CPU)"
        print(f"    {k:2d}   {peaks[k, 'per_step'] / MIB:17.2f}   {peaks[k, 'summed'] / MIB:20.2f}"
              f"   {peaks[k, 'summed'] / peaks[k, 'per_step']:5.2f}   {allocator_text}")
    first, last = ks[0], ks[-1]
    growth = {name: (peaks[last, name] - peaks[first, name]) / one_step for name in ("per_step", "summed")}
    print(f"    growth K={first} -> K={last}, in one step's activations: per-step {growth['per_step']:+.2f}, "
          f"summed-loss {growth['summed']:+.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    # One thread by default: on a small shared machine, spinning intra-op threads make timings erratic.
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    shape = dict(dim=256, depth=4, side=32)  # 16 x 16 = 256 tokens
    print(f"bench_core: ToyDiT dim 256, 4 blocks, 256 tokens, LoRA rank 64 / alpha 128 on 24 linear layers; "
          f"{device}, {args.threads} threads, torch {torch.__version__}")
    overhead(device, args.repeats, 4, **shape)
    memory(device, (2, 4, 8), **shape)


if __name__ == "__main__":
    main()
