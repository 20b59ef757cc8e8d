import pytest
import torch

from dopsd_core import (
    DualLora,
    LoraSpec,
    append_dims,
    Trainer,
    TrainConfig,
    TrainingCancelled,
    TrainingItem,
    TrainingPair,
    flow_matching_loss,
    noise_latent,
    rollout_preview,
    x0_loss,
    zimage_turbo_training_sigmas,
)
from devkit.core_toys import (
    LORA_TARGETS,
    Block,
    ToyCond,
    ToyDiT,
    pretrain_in_context_copy,
    random_adapter_state,
    reference_dopsd_backward,
    role_predictor,
)

SIGMAS = zimage_turbo_training_sigmas()  # K = 4
SPEC = LoraSpec(rank=4, alpha=8.0, target_modules=LORA_TARGETS)


def toy_pair(seed: int) -> tuple[TrainingPair, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    target, prompt = torch.randn(1, 4, 8, 8, generator=generator), torch.randn(1, 8, generator=generator)
    return TrainingPair(ToyCond(prompt), ToyCond(prompt, target)), target


def gradients(adapters: DualLora) -> list[torch.Tensor]:
    return [p.grad.clone() for p in adapters.student_parameters()]


@pytest.fixture(scope="module")
def in_context_weights():
    torch.manual_seed(0)
    return pretrain_in_context_copy(ToyDiT()).state_dict()


def test_equal_contexts_and_adapters_give_zero_loss_and_zero_gradient():
    torch.manual_seed(0)
    model = ToyDiT()
    adapters = DualLora(model, SPEC)
    adapters.load_state(random_adapter_state(adapters, seed=1))  # teacher = student, and not the trivial zero LoRA
    pair, _ = toy_pair(2)
    same_context = TrainingPair(pair.student_cond, pair.student_cond)
    trainer = Trainer(model, adapters, [TrainingItem([same_context], (4, 8, 8))], SIGMAS)
    losses = trainer.accumulate_gradients(0)
    assert losses.shape == (4,) and torch.count_nonzero(losses) == 0
    assert all(torch.count_nonzero(grad) == 0 for grad in gradients(adapters))


def test_backward_per_rollout_step_equals_one_backward_of_the_summed_loss():
    torch.manual_seed(0)
    model = ToyDiT()
    adapters = DualLora(model, SPEC)
    adapters.load_state(random_adapter_state(adapters, seed=1), random_adapter_state(adapters, seed=2))
    pair, _ = toy_pair(2)
    states = []

    def recording_denoiser(x, sigma, cond):
        states.append(x)
        return model(x, sigma, cond)

    trainer = Trainer(recording_denoiser, adapters, [TrainingItem([pair], (4, 8, 8))], SIGMAS)
    per_step_losses = trainer.accumulate_gradients(0)
    per_step_gradients = gradients(adapters)
    for p in adapters.student_parameters():
        p.grad = None

    noise = states[0]  # sigmas[0] = 1, so the first state is the noise itself
    reference_losses = reference_dopsd_backward(model, adapters, pair.student_cond, pair.teacher_cond, noise, SIGMAS)
    assert torch.equal(per_step_losses, reference_losses)
    assert max(grad.abs().max() for grad in per_step_gradients) > 1e-3, "the comparison needs a real gradient"
    for ours, reference in zip(per_step_gradients, gradients(adapters)):
        # Same math; only the order of float32 gradient accumulation differs.
        torch.testing.assert_close(ours, reference, atol=1e-6, rtol=1e-5, msg="fp32 tolerance atol 1e-6, rtol 1e-5")


def test_dopsd_pulls_the_student_rollout_toward_the_teacher_with_the_target(in_context_weights):
    model = ToyDiT()
    model.load_state_dict(in_context_weights)
    base_before = {k: v.clone() for k, v in model.state_dict().items()}
    adapters = DualLora(model, LoraSpec(rank=8, alpha=16.0, target_modules=LORA_TARGETS))
    pair, target = toy_pair(5)
    eval_noise = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(6))
    prompt = pair.student_cond.prompt.expand(4, -1)

    def evaluate():
        steps = rollout_preview(
            role_predictor(model, adapters, "student", ToyCond(prompt)),
            role_predictor(model, adapters, "teacher", ToyCond(prompt, target.expand(4, -1, -1, -1))),
            eval_noise,
            SIGMAS,
        )
        loss = torch.stack([x0_loss(step.student_x0, step.teacher_x0) for step in steps]).mean().item()
        final = steps[-1]
        return loss, (final.student_x0 - final.teacher_x0).norm().item(), (final.student_x0 - target).norm().item()

    loss_before, gap_before, target_gap_before = evaluate()
    config = TrainConfig(learning_rate=3e-3)
    Trainer(model, adapters, [TrainingItem([pair], (4, 8, 8))], SIGMAS, config).train(60)
    loss_after, gap_after, target_gap_after = evaluate()
    print(
        f"\nD-OPSD toy, 60 steps: roll-out x0 loss {loss_before:.4f} -> {loss_after:.4f} "
        f"(x{loss_after / loss_before:.3f}); final student-teacher x0 distance {gap_before:.2f} -> {gap_after:.2f} "
        f"(x{gap_after / gap_before:.3f}); student-target distance {target_gap_before:.2f} -> {target_gap_after:.2f}"
    )
    assert loss_after < 0.1 * loss_before
    assert gap_after < 0.25 * gap_before
    assert target_gap_after < 0.5 * target_gap_before
    adapters.remove()
    assert all(torch.equal(v, base_before[k]) for k, v in model.state_dict().items())


def test_sft_lowers_the_flow_matching_loss(in_context_weights):
    model = ToyDiT()
    model.load_state_dict(in_context_weights)
    adapters = DualLora(model, LoraSpec(rank=8, alpha=16.0, target_modules=LORA_TARGETS))
    pair, target = toy_pair(5)
    generator = torch.Generator().manual_seed(7)
    noise = torch.randn(8, 4, 8, 8, generator=generator)
    sigma = torch.linspace(0.1, 1.0, 8)
    x = noise_latent(target, noise, append_dims(sigma, 4))
    prompt = pair.student_cond.prompt.expand(8, -1)

    def evaluate():
        with torch.no_grad():
            predicted_x0 = model(x, sigma, ToyCond(prompt))
        return flow_matching_loss(predicted_x0, target, noise, x, append_dims(sigma, 4)).item()

    loss_before = evaluate()
    config = TrainConfig(objective="sft", learning_rate=3e-3, gradient_accumulation=2)
    item = TrainingItem([pair], (4, 8, 8), target_latent=target[0])
    reports = Trainer(model, adapters, [item], SIGMAS, config).train(40)
    loss_after = evaluate()
    print(f"\nSFT toy, 40 steps: flow-matching loss {loss_before:.4f} -> {loss_after:.4f} "
          f"(x{loss_after / loss_before:.3f})")
    assert all(len(report.per_step_losses) == 1 for report in reports)
    assert loss_after < 0.5 * loss_before


def make_trainer(seed: int = 0, **config) -> Trainer:
    torch.manual_seed(0)
    model = ToyDiT()
    adapters = DualLora(model, SPEC)
    target = toy_pair(4)[1]  # SFT's clean latent; D-OPSD ignores it
    items = [TrainingItem([toy_pair(1)[0], toy_pair(2)[0]], (4, 8, 8), target_latent=target[0]),
             TrainingItem([toy_pair(3)[0]], (1, 4, 8, 8), target_latent=target)]
    return Trainer(model, adapters, items, SIGMAS, TrainConfig(**{"seed": seed, "learning_rate": 1e-3, **config}))


def test_training_is_deterministic_under_the_seed():
    runs = [make_trainer(seed) for seed in (0, 0, 1)]
    losses = [[report.per_step_losses for report in trainer.train(3)] for trainer in runs]
    assert losses[0] == losses[1]
    assert losses[0] != losses[2]
    for a, b in zip(runs[0].adapters.student_parameters(), runs[1].adapters.student_parameters()):
        assert torch.equal(a, b)


def test_velocity_loss_space_weights_each_rollout_step_by_one_over_sigma_squared():
    x0_space = make_trainer().accumulate_gradients(0)
    velocity_space = make_trainer(loss_space="velocity").accumulate_gradients(0)
    torch.testing.assert_close(velocity_space, x0_space / SIGMAS[:-1] ** 2)


def test_reports_and_learning_rate_warmup():
    trainer = make_trainer(warmup_steps=3)
    seen = []
    reports = trainer.train(4, on_step=seen.append)
    assert seen == reports
    assert [r.step for r in reports] == [1, 2, 3, 4]
    assert [r.lr for r in reports] == pytest.approx([1e-3 / 3, 2e-3 / 3, 1e-3, 1e-3])
    for report in reports:
        assert len(report.per_step_losses) == 4
        assert report.loss == pytest.approx(sum(report.per_step_losses) / 4)
        assert report.grad_norm > 0 and report.seconds > 0


def test_cancel_mid_rollout_leaves_the_last_completed_step():
    trainer, uninterrupted = make_trainer(), make_trainer()
    trainer.train(1)
    after_one_step = [p.clone() for p in trainer.adapters.student_parameters()]
    teacher_after_one_step = trainer.adapters.teacher_state()
    polls = []

    def cancel_on_third_poll():
        polls.append(None)
        return len(polls) == 3

    with pytest.raises(TrainingCancelled):
        trainer.train(1, should_cancel=cancel_on_third_poll)
    assert trainer.step == 1
    assert all(torch.equal(a, b) for a, b in zip(trainer.adapters.student_parameters(), after_one_step))
    teacher = trainer.adapters.teacher_state()
    assert all(torch.equal(teacher_after_one_step[n]["down"], e["down"]) for n, e in teacher.items())
    assert all(p.grad is None for p in trainer.adapters.student_parameters())
    # Nothing of the cancelled step remains: carrying on matches a run that was never interrupted.
    assert [r.loss for r in trainer.train(1)] == [r.loss for r in uninterrupted.train(2)][1:]
    for a, b in zip(trainer.adapters.student_parameters(), uninterrupted.adapters.student_parameters()):
        assert torch.equal(a, b)


def test_gradient_checkpointing_recomputes_blocks_with_the_same_result(monkeypatch):
    block_forward, calls = Block.forward, []

    def counted_forward(self, h, c):
        calls.append(torch.is_grad_enabled())
        return block_forward(self, h, c)

    monkeypatch.setattr(Block, "forward", counted_forward)
    plain, checkpointed = make_trainer(), make_trainer()
    checkpointed.checkpointed_modules = list(checkpointed.denoiser.blocks)
    block_calls = []
    for trainer in (plain, checkpointed):
        calls.clear()
        trainer.train(1)
        block_calls.append(len(calls))
        assert all("forward" not in block.__dict__ for block in trainer.denoiser.blocks)
    # 4 roll-out steps x 2 blocks x (teacher + student forward), plus one recomputation per student forward.
    assert block_calls == [4 * 2 * 2, 4 * 2 * 3]
    for a, b in zip(plain.adapters.student_parameters(), checkpointed.adapters.student_parameters()):
        torch.testing.assert_close(a, b, atol=1e-7, rtol=0)


def test_bf16_autocast_on_cpu_trains():
    report = make_trainer(mixed_precision="bf16").train(1)[0]
    assert torch.isfinite(torch.tensor(report.per_step_losses)).all() and report.grad_norm > 0


def test_invalid_setups_are_refused():
    with pytest.raises(ValueError, match="objective"):
        TrainConfig(objective="rl")
    with pytest.raises(ValueError, match="loss_space"):
        TrainConfig(loss_space="eps")
    with pytest.raises(ValueError, match="checkpoint_dir"):
        TrainConfig(checkpoint_every=10)
    trainer = make_trainer()
    with pytest.raises(ValueError, match="target_latent"):
        Trainer(trainer.denoiser, trainer.adapters, [TrainingItem(trainer.items[0].variants, (4, 8, 8))], SIGMAS,
                TrainConfig(objective="sft"))
    with pytest.raises(ValueError, match="end at exactly 0"):
        Trainer(trainer.denoiser, trainer.adapters, trainer.items, [1.0, 0.5])
    with pytest.raises(ValueError, match="prompt variant"):
        Trainer(trainer.denoiser, trainer.adapters, [TrainingItem([], (4, 8, 8))], SIGMAS)


def test_teacher_is_an_ema_of_the_student_after_each_optimizer_step():
    """Checked against an EMA computed here from the student after every step, with a decay at which the teacher
    moves visibly (0.9999 would look frozen) and that is not symmetric (0.5 would hide a swapped update)."""
    decay = 0.7
    trainer = make_trainer(ema_decay=decay, learning_rate=1e-2)
    expected = trainer.adapters.teacher_state()
    initial = trainer.adapters.teacher_state()

    def follow_student(report):
        student = trainer.adapters.student_state()
        for name, entry in expected.items():
            for key in ("down", "up"):
                entry[key] = decay * entry[key] + (1 - decay) * student[name][key]

    trainer.train(3, on_step=follow_student)
    teacher, student = trainer.adapters.teacher_state(), trainer.adapters.student_state()
    for name in expected:
        for key in ("down", "up"):
            torch.testing.assert_close(teacher[name][key], expected[name][key], atol=1e-7, rtol=1e-6)
    moved = max((teacher[n]["up"] - initial[n]["up"]).abs().max() for n in teacher)
    lag = max((teacher[n]["up"] - student[n]["up"]).abs().max() for n in teacher)
    assert moved > 1e-3 and lag > 1e-3, "the teacher must have moved, and still trail the student"


@pytest.mark.parametrize("objective", ["dopsd", "sft"])
def test_accumulated_gradient_is_the_mean_of_separate_micro_step_gradients(objective):
    """A micro-steps with accumulation A against A single micro-steps with the same draws, averaged here. Adam is
    invariant to the gradient's scale, so only the gradient itself shows a wrong accumulation scale."""
    settings = {"objective": objective, "grad_clip": 0.0}
    accumulated = make_trainer(gradient_accumulation=3, **settings)
    separate = make_trainer(gradient_accumulation=1, **settings)
    for index in range(3):
        accumulated.accumulate_gradients(index)
    mean = None
    for index in range(3):
        separate.accumulate_gradients(index)
        single = gradients(separate.adapters)
        mean = single if mean is None else [m + g for m, g in zip(mean, single)]
        separate.optimizer.zero_grad(set_to_none=True)
    mean = [m / 3 for m in mean]
    assert max(g.abs().max() for g in mean) > 1e-4, "the comparison needs a real gradient"
    for ours, reference in zip(gradients(accumulated.adapters), mean):
        torch.testing.assert_close(ours, reference, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("precision, dtype", [("bf16", torch.bfloat16), ("no", torch.float32)])
def test_mixed_precision_is_the_dtype_the_models_layers_compute_in(precision, dtype):
    trainer = make_trainer(mixed_precision=precision)
    seen = []
    handle = trainer.denoiser.blocks[0].ff_in.register_forward_hook(lambda module, args, out: seen.append(out.dtype))
    try:
        trainer.train(1)
    finally:
        handle.remove()
    assert seen and set(seen) == {dtype}
