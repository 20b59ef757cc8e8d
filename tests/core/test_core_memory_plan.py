import pytest
import torch

from dopsd_core import DualLora, LoraSpec, Trainer, TrainConfig, TrainingItem, fp8_savings, plan_memory
from dopsd_core.memory_plan import StepMemoryCurve, probe_latent_shapes, tensor_bytes
from devkit.core_toys import LORA_TARGETS, ToyDiT
from tests.core.test_core_trainer import SIGMAS, SPEC, toy_pair


def test_the_curve_through_three_points_is_exact_for_a_quadratic_cost_and_finds_the_largest_latent_that_fits():
    def cost(n):
        return 1000 + 30 * n + n**2 / 64  # whole bytes at the measured sizes

    curve = StepMemoryCurve(tuple((n, round(cost(n))) for n in (256, 512, 1024)))
    assert curve(4096) == pytest.approx(cost(4096), rel=1e-6)
    fitting = curve.largest_latent(cost(700))
    assert fitting == pytest.approx(700, abs=0.01)
    assert curve.largest_latent(cost(100)) == 0.0, "below the smallest measurement nothing is promised"
    assert curve.largest_latent(cost(2000)) == 1024


def test_probes_are_a_quarter_and_half_of_the_area_in_whole_patches():
    assert probe_latent_shapes((1, 16, 128, 128)) == [(1, 16, 64, 64), (1, 16, 90, 90)]
    assert probe_latent_shapes((1, 16, 26, 40)) == [(1, 16, 12, 20), (1, 16, 18, 28)]
    assert probe_latent_shapes((1, 16, 4, 4)) == [(1, 16, 2, 2), (1, 16, 2, 2)]


def test_a_latent_of_a_few_patches_is_measured_at_the_sizes_that_differ():
    measured = []

    def measure(shape):
        measured.append(shape)
        return 10 * torch.Size(shape).numel()

    plan, curve = plan_memory(ToyDiT(), [], (1, 16, 4, 4), measure)
    assert measured == [(1, 16, 2, 2), (1, 16, 4, 4)] and plan.step == 10 * 256
    plan, curve = plan_memory(ToyDiT(), [], (1, 16, 2, 2), measure)
    assert measured[2:] == [(1, 16, 2, 2)] and plan.step == 10 * 64 and curve.largest_latent(10 * 64) == 64


def test_the_plan_counts_weights_both_loras_gradients_and_adam_moments_and_the_measured_step():
    model = ToyDiT()
    adapters = DualLora(model, SPEC)
    student = adapters.student_parameters()
    measured = {}

    def measure(shape):
        measured[shape] = 7 * torch.Size(shape).numel()
        return measured[shape]

    plan, curve = plan_memory(model, student, (1, 4, 8, 8), measure)
    lora = sum(p.numel() * 4 for p in student)
    assert plan.adapters == 2 * lora and plan.optimizer_state == 3 * lora
    assert plan.weights == tensor_bytes([*model.parameters(), *model.buffers()])
    assert plan.step == 7 * 256 and plan.step_measured and len(measured) == 3
    assert plan.total == plan.weights + plan.adapters + plan.optimizer_state + plan.step


def test_a_full_size_step_that_runs_out_of_memory_leaves_a_lower_bound():
    def measure(shape):
        if shape == (1, 4, 8, 8):
            raise torch.OutOfMemoryError("no room")
        return 100 * torch.Size(shape).numel()

    plan, _ = plan_memory(ToyDiT(), [], (1, 4, 8, 8), measure)
    assert not plan.step_measured and plan.step == 100 * 256
    assert "more than" in plan.describe()


def test_fp8_savings_count_every_linear_weight_above_one_byte():
    model = ToyDiT()
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert fp8_savings(model) == 3 * linear  # float32: 4 bytes -> 1
    assert fp8_savings(model.to(torch.float8_e4m3fn)) == 0


def test_measuring_a_step_leaves_training_exactly_as_without_it():
    def train(measure_first: bool):
        torch.manual_seed(0)
        model = ToyDiT()
        adapters = DualLora(model, SPEC)
        pair, _ = toy_pair(2)
        trainer = Trainer(model, adapters, [TrainingItem([pair], (4, 8, 8))], SIGMAS, TrainConfig(seed=3))
        if measure_first:
            peak = trainer.step_memory(trainer.items[0])
            assert peak > 0 and all(p.grad is None for p in adapters.student_parameters())
        reports = trainer.train(2)
        return [r.loss for r in reports], adapters.student_state()

    (losses, state), (measured_losses, measured_state) = train(False), train(True)
    assert losses == measured_losses
    assert all(torch.equal(state[name][part], measured_state[name][part]) for name in state for part in ("down", "up"))


def test_checkpointing_measures_less_than_keeping_every_activation():
    torch.manual_seed(0)
    model = ToyDiT(depth=4)
    adapters = DualLora(model, LoraSpec(rank=4, alpha=8.0, target_modules=LORA_TARGETS))
    pair, _ = toy_pair(2)
    items = [TrainingItem([pair], (4, 8, 8))]
    kept = Trainer(model, adapters, items, SIGMAS).step_memory(items[0])
    checkpointed = Trainer(model, adapters, items, SIGMAS, checkpointed_modules=list(model.blocks)).step_memory(items[0])
    assert checkpointed < 0.7 * kept
