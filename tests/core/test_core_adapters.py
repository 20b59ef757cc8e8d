import pytest
import torch
from torch import nn

from devkit.core_toys import LORA_TARGETS, CastLinear, ToyCond, ToyDiT, random_adapter_state
from dopsd_core import DualLora, LoraSpec, find_target_modules

SPEC = LoraSpec(rank=4, alpha=8.0, target_modules=LORA_TARGETS)


def toy_inputs(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 8, 8, generator=generator)
    cond = ToyCond(torch.randn(2, 8, generator=generator), torch.randn(2, 4, 8, 8, generator=generator))
    return x, torch.tensor([0.9, 0.3]), cond


def test_adapts_linear_subclasses_and_applies_the_documented_update():
    torch.manual_seed(0)
    model = nn.Sequential(CastLinear(6, 5), nn.ReLU(), CastLinear(5, 3))
    adapters = DualLora(model, LoraSpec(rank=2, alpha=3.0, target_modules=["0"]))
    assert adapters.module_names == ("0",)
    state = random_adapter_state(adapters, seed=1)
    adapters.load_state(state)
    x = torch.randn(7, 6)
    base = model[0].get_base_layer()
    expected = x @ base.weight.T + base.bias + (3.0 / 2) * (x @ state["0"]["down"].T @ state["0"]["up"].T)
    torch.testing.assert_close(model[0](x), expected)
    # The subclass's own forward still runs: bf16 inputs get bf16 results from float32 weights.
    assert model(x.bfloat16()).dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in adapters.student_parameters())


def test_bf16_base_model_gets_float32_adapters_that_train():
    torch.manual_seed(0)
    model = nn.Sequential(CastLinear(6, 5), nn.GELU(), CastLinear(5, 3)).bfloat16()
    adapters = DualLora(model, LoraSpec(rank=2, alpha=4.0, target_modules=["0", "2"]))
    adapters.load_state(random_adapter_state(adapters, seed=1))
    out = model(torch.randn(7, 6, dtype=torch.bfloat16))
    out.float().square().mean().backward()
    assert out.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 and p.grad.abs().sum() > 0 for p in adapters.student_parameters())
    assert all(p.grad is None for n, p in model.named_parameters() if "lora_" not in n)


def test_target_selection_by_regex_or_suffix():
    model = ToyDiT()
    assert find_target_modules(model, LORA_TARGETS) == [
        f"blocks.{i}.{name}" for i in range(2) for name in ("q", "k", "v", "out", "ff_in", "ff_out")
    ]
    assert find_target_modules(model, ["q", "blocks.1.ff_in"]) == ["blocks.0.q", "blocks.1.q", "blocks.1.ff_in"]
    assert find_target_modules(model, ["norm1"]) == []  # LayerNorm is not a linear layer
    with pytest.raises(ValueError, match="no linear layer"):
        DualLora(model, LoraSpec(target_modules=["nothing"]))
    with pytest.raises(ValueError, match="target_modules"):
        DualLora(model, LoraSpec())


def test_teacher_starts_equal_to_student_and_stays_frozen_in_every_role():
    torch.manual_seed(0)
    model = ToyDiT()
    adapters = DualLora(model, LoraSpec(rank=4, alpha=8.0, target_modules=LORA_TARGETS, init="gaussian"))
    student, teacher = adapters.student_state(), adapters.teacher_state()
    assert all(torch.equal(student[n]["down"], teacher[n]["down"]) for n in student)
    assert all(student[n]["down"].abs().sum() > 0 and student[n]["up"].abs().sum() == 0 for n in student)
    teacher_params = [p for n, p in model.named_parameters() if ".teacher" in n]
    for role in ("teacher", "student", "teacher"):
        adapters.activate(role)
        assert all(p.requires_grad for p in adapters.student_parameters())
        assert not any(p.requires_grad for p in teacher_params)
        assert not any(p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)


def test_use_switches_the_applied_adapter_and_restores_the_previous_one():
    torch.manual_seed(0)
    model = ToyDiT()
    adapters = DualLora(model, SPEC)
    adapters.load_state(random_adapter_state(adapters, 1), random_adapter_state(adapters, 2))
    x, sigma, cond = toy_inputs()
    student_out = model(x, sigma, cond)
    with adapters.use("teacher"):
        teacher_out = model(x, sigma, cond)
        assert adapters.active_role == "teacher"
    assert adapters.active_role == "student"
    assert torch.equal(model(x, sigma, cond), student_out)
    assert not torch.allclose(teacher_out, student_out)
    with pytest.raises(ValueError, match="role"):
        adapters.activate("critic")


def test_fast_role_switch_applies_the_same_adapter_as_peft_set_adapter():
    torch.manual_seed(0)
    model = ToyDiT()
    adapters = DualLora(model, SPEC)
    adapters.load_state(random_adapter_state(adapters, 1), random_adapter_state(adapters, 2))
    x, sigma, cond = toy_inputs()
    assert adapters._fast_switch, "peft no longer keeps the active adapter where DualLora sets it"
    outputs = {}
    for fast in (True, False):
        adapters._fast_switch = fast
        for role in ("teacher", "student"):
            adapters.activate(role)
            outputs[fast, role] = model(x, sigma, cond)
            assert all(p.requires_grad for p in adapters.student_parameters())
    for role in ("teacher", "student"):
        assert torch.equal(outputs[True, role], outputs[False, role])


def test_ema_update_matches_a_hand_computation():
    torch.manual_seed(0)
    adapters = DualLora(ToyDiT(), SPEC)
    student, teacher = random_adapter_state(adapters, 1), random_adapter_state(adapters, 2)
    adapters.load_state(student, teacher)
    decay = 0.9
    adapters.ema_update(decay)
    for name, entry in adapters.teacher_state().items():
        for key in ("down", "up"):
            assert torch.equal(entry[key], teacher[name][key] * decay + student[name][key] * (1 - decay))
    updated = adapters.teacher_state()
    adapters.ema_update(1.0)
    assert all(torch.equal(updated[n]["down"], e["down"]) for n, e in adapters.teacher_state().items())
    adapters.ema_update(0.0)
    assert all(
        torch.equal(t["down"], s["down"]) and torch.equal(t["up"], s["up"])
        for t, s in zip(adapters.teacher_state().values(), adapters.student_state().values())
    )
    with pytest.raises(ValueError, match="decay"):
        adapters.ema_update(1.5)


def test_states_are_detached_copies_and_load_checks_their_fit():
    torch.manual_seed(0)
    adapters = DualLora(ToyDiT(), SPEC)
    state = adapters.student_state()
    state["blocks.0.q"]["up"].add_(1.0)
    assert adapters.student_state()["blocks.0.q"]["up"].abs().sum() == 0
    adapters.load_state(state)
    assert torch.equal(adapters.teacher_state()["blocks.0.q"]["up"], state["blocks.0.q"]["up"])
    with pytest.raises(ValueError, match="missing"):
        adapters.load_state({k: v for k, v in state.items() if k != "blocks.0.q"})
    with pytest.raises(ValueError, match="alpha"):
        adapters.load_state({k: {**v, "alpha": 1.0} for k, v in state.items()})
    with pytest.raises(ValueError, match="shape"):
        adapters.load_state({k: {**v, "down": v["down"][:2]} for k, v in state.items()})
    with pytest.raises(ValueError, match="teacher state"):
        adapters.load_state(random_adapter_state(adapters, seed=3), {})
    assert torch.equal(adapters.student_state()["blocks.0.q"]["up"], state["blocks.0.q"]["up"]), "nothing loaded"


def test_init_is_reproducible_from_the_spec_seed():
    downs = [DualLora(ToyDiT(), LoraSpec(rank=4, alpha=8.0, target_modules=LORA_TARGETS, seed=s)).student_state()
             for s in (7, 7, 8)]
    assert torch.equal(downs[0]["blocks.1.v"]["down"], downs[1]["blocks.1.v"]["down"])
    assert not torch.equal(downs[0]["blocks.1.v"]["down"], downs[2]["blocks.1.v"]["down"])


def test_remove_restores_the_base_model_exactly():
    torch.manual_seed(0)
    model = ToyDiT()
    model.position.requires_grad_(False)  # a mixed set of flags must come back as it was
    x, sigma, cond = toy_inputs()
    out_before = model(x, sigma, cond)
    state_before = {k: v.clone() for k, v in model.state_dict().items()}
    flags_before = {n: p.requires_grad for n, p in model.named_parameters()}
    layers_before = {n: m for n, m in model.named_modules()}

    with DualLora(model, SPEC) as adapters:
        assert not any(p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)
        adapters.load_state(random_adapter_state(adapters, 1), random_adapter_state(adapters, 2))
        optimizer = torch.optim.AdamW(adapters.student_parameters(), lr=1e-2)
        for _ in range(3):
            model(x, sigma, cond).square().mean().backward()
            optimizer.step()
        assert not torch.equal(model(x, sigma, cond), out_before)

    assert {n: m for n, m in model.named_modules()} == layers_before
    assert type(model.blocks[0].q) is CastLinear
    assert model.state_dict().keys() == state_before.keys()
    assert all(torch.equal(v, state_before[k]) for k, v in model.state_dict().items())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags_before
    assert not hasattr(model, "peft_config")
    assert torch.equal(model(x, sigma, cond), out_before)


def test_gaussian_init_is_the_default_and_draws_down_from_n_0_1_over_rank_squared():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(512, 256), nn.Linear(256, 512))
    rank = 16
    gaussian = DualLora(model, LoraSpec(rank=rank, alpha=32.0, target_modules=["0", "1"])).student_state()
    downs = torch.cat([entry["down"].flatten() for entry in gaussian.values()])
    assert abs(downs.std().item() - 1 / rank) < 0.02 / rank
    assert abs(downs.mean().item()) < 0.02 / rank
    assert all(not entry["up"].any() for entry in gaussian.values())

    kaiming = DualLora(nn.Sequential(nn.Linear(512, 256)), LoraSpec(rank=rank, target_modules=["0"], init="default"))
    down = kaiming.student_state()["0"]["down"]
    assert down.abs().max() <= 512 ** -0.5  # peft's Kaiming-uniform bound, 1/sqrt(fan_in)
    assert abs(down.std().item() - 512 ** -0.5 / 3 ** 0.5) < 0.1 * 512 ** -0.5


def test_output_slices_get_separate_adapters_that_apply_to_their_rows_only():
    torch.manual_seed(0)
    model = nn.Sequential(CastLinear(6, 12), nn.ReLU(), CastLinear(12, 3))
    fused = model[0]
    x = torch.randn(5, 6)
    before = model(x)
    spec = LoraSpec(rank=2, alpha=3.0, target_modules=["0", "2"], output_slices={"0": (4, 4, 4)})
    with DualLora(model, spec) as adapters:
        assert adapters.module_names == ("0.0", "0.1", "0.2", "2")
        assert sum(p.numel() for p in adapters.student_parameters()) == 3 * 2 * (6 + 4) + 2 * (12 + 3)
        torch.testing.assert_close(model(x), before)  # up starts at zero: the slices compute the fused layer
        state = random_adapter_state(adapters, seed=1)
        adapters.load_state(state)
        delta = torch.cat([x @ state[f"0.{i}"]["down"].T @ state[f"0.{i}"]["up"].T for i in range(3)], dim=-1)
        torch.testing.assert_close(model[0](x), fused(x) + 1.5 * delta)
        assert model(x.bfloat16()).dtype == torch.bfloat16
        model(x).square().mean().backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in adapters.student_parameters())
        assert fused.weight.grad is None
    assert model[0] is fused
    assert torch.equal(model(x), before)


def test_output_slices_that_do_not_partition_the_layer_are_refused_and_leave_the_model_as_it_was():
    model = nn.Sequential(nn.Linear(6, 12))
    layer = model[0]
    with pytest.raises(ValueError, match="do not partition"):
        DualLora(model, LoraSpec(rank=2, target_modules=["0"], output_slices={"0": (4, 4)}))
    assert model[0] is layer and not hasattr(model, "peft_config") and layer.weight.requires_grad
