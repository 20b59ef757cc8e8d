"""Mutation check: do the tests catch the bugs that matter?

Each mutation below is a small deliberate bug, described by its intent and located by exact snippets of the
current code. The script first snapshots the working tree (without its environments), so editing the repository while it runs
changes nothing; for every mutation it copies the snapshot into a temporary folder, applies the edits, runs the tests named for it with pytest and reports CAUGHT (some test failed) or
SURVIVED (all passed), with the time taken. A mutation whose snippet is no longer found exactly once is reported as
STALE: the code moved, and the entry needs updating to the new code.

Not part of .ci/run (it runs the named tests once per mutation, about 10-15 minutes on two cores). Run it after
changing the training core, the Train or Save node, or the tests of either:

    .venv/bin/python scripts/mutation_check.py              # every mutation
    .venv/bin/python scripts/mutation_check.py ema_none     # some, by name
    .venv/bin/python scripts/mutation_check.py --list

It exits non-zero when a mutation survived or is stale.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
NOT_COPIED = {".git", ".venv", ".venv-comfy033", ".comfyui", "output", "test-artifacts", "__pycache__",
              ".pytest_cache"}
CORE_TRAINER = "tests/core/test_core_trainer.py"
ZIMAGE_E2E = "tests/zimage/test_zimage_end_to_end.py"
ZIMAGE_PROMISES = "tests/zimage/test_zimage_promises.py"
MULTI_GPU = "tests/multi_gpu/test_training_jobs.py"


@dataclass(frozen=True)
class Edit:
    file: str
    find: str
    replace: str


@dataclass(frozen=True)
class Mutation:
    name: str
    intent: str
    edits: tuple[Edit, ...]
    tests: tuple[str, ...]  # pytest node ids or paths, run together


MUTATIONS = (
    Mutation("ema_none", "the teacher is never updated", (
        Edit("dopsd_core/trainer.py", "            self.adapters.ema_update(self.config.ema_decay)\n", "            pass\n"),),
        (f"{CORE_TRAINER}::test_teacher_is_an_ema_of_the_student_after_each_optimizer_step",)),
    Mutation("ema_before_optimizer_step", "the EMA follows the student before the optimizer moves it", (
        Edit("dopsd_core/trainer.py",
             "        self.optimizer.step()\n        self.optimizer.zero_grad(set_to_none=True)\n"
             "        if self.config.objective == \"dopsd\":\n            self.adapters.ema_update(self.config.ema_decay)\n",
             "        if self.config.objective == \"dopsd\":\n            self.adapters.ema_update(self.config.ema_decay)\n"
             "        self.optimizer.step()\n        self.optimizer.zero_grad(set_to_none=True)\n"),),
        (f"{CORE_TRAINER}::test_teacher_is_an_ema_of_the_student_after_each_optimizer_step",)),
    Mutation("ema_inverted", "teacher <- student * decay + teacher * (1 - decay)", (
        Edit("dopsd_core/adapters.py",
             '        torch._foreach_mul_(self._params["teacher"], decay)\n'
             '        torch._foreach_add_(self._params["teacher"], torch._foreach_mul(self._params["student"], 1.0 - decay))',
             '        torch._foreach_mul_(self._params["teacher"], 1.0 - decay)\n'
             '        torch._foreach_add_(self._params["teacher"], torch._foreach_mul(self._params["student"], decay))'),),
        (f"{CORE_TRAINER}::test_teacher_is_an_ema_of_the_student_after_each_optimizer_step",)),
    Mutation("merge_into_input_model", "a successful run patches the trained LoRA into the input MODEL", (
        Edit("nodes/training.py", "        trained = TrainedLora(lora, metadata)\n",
             "        model.add_patches(__import__('comfy.lora').lora.load_lora(lora, __import__('comfy.lora').lora"
             ".model_lora_keys_unet(model.model, {})), 1.0)\n"
             "        trained = TrainedLora(lora, metadata)\n"),),
        (f"{ZIMAGE_E2E}::test_input_model_is_unchanged_by_training_success_cancel_and_failure",)),
    Mutation("alpha_written_as_rank", "the saved LoRA's alpha is its rank: half strength at alpha 2 x rank", (
        Edit("nodes/lora_io.py", "    return lora_tensors(adapter_state, file_keys(adapter_state, slice_keys), dtype)",
             "    return lora_tensors({m: {**e, 'alpha': e['down'].shape[0]} for m, e in adapter_state.items()}, "
             "file_keys(adapter_state, slice_keys), dtype)"),),
        (f"{ZIMAGE_E2E}::test_saved_lora_reproduces_the_students_rollout_at_the_end_of_training",)),
    Mutation("teacher_exported", "the LoRA file holds the EMA teacher instead of the student", (
        Edit("nodes/training.py", "comfy_lora_tensors(adapters.student_state(), ", "comfy_lora_tensors(adapters.teacher_state(), "),),
        (f"{ZIMAGE_E2E}::test_saved_lora_reproduces_the_students_rollout_at_the_end_of_training",)),
    Mutation("wrong_key_prefix", "LoRA keys under a prefix ComfyUI's loader does not map", (
        Edit("nodes/lora_io.py", 'DIFFUSION_MODEL_PREFIX = "diffusion_model."', 'DIFFUSION_MODEL_PREFIX = "unet."'),),
        (f"{ZIMAGE_E2E}::test_saved_lora_reproduces_the_students_rollout_at_the_end_of_training",)),
    Mutation("qkv_slices_swapped", "the q and v adapters are saved under each other's keys", (
        Edit("nodes/lora_io.py", "for i, part in enumerate(parts)}", "for i, part in enumerate(parts[::-1])}"),),
        (f"{ZIMAGE_E2E}::test_saved_lora_reproduces_the_students_rollout_at_the_end_of_training",)),
    Mutation("accumulation_scale_ignored", "each accumulated micro-step adds its full gradient", (
        Edit("dopsd_core/trainer.py", "loss_scale = 1.0 / ((len(sigmas) - 1) * self.config.gradient_accumulation)",
             "loss_scale = 1.0 / (len(sigmas) - 1)"),),
        (f"{CORE_TRAINER}::test_accumulated_gradient_is_the_mean_of_separate_micro_step_gradients",)),
    Mutation("gradient_through_time", "the roll-out state keeps its graph: backpropagation through time", (
        Edit("dopsd_core/rollout.py", "x = euler_step(x, x0.detach(), sigma, sigma_next)", "x = euler_step(x, x0, sigma, sigma_next)"),
        Edit("dopsd_core/trainer.py", "(loss * loss_scale).backward()", "(loss * loss_scale).backward(retain_graph=True)")),
        (f"{CORE_TRAINER}::test_backward_per_rollout_step_equals_one_backward_of_the_summed_loss",)),
    Mutation("teacher_uses_student_adapter", "the teacher prediction runs with the student's adapter", (
        Edit("dopsd_core/trainer.py", 'with torch.no_grad(), self.adapters.use("teacher"), self._autocast():',
             'with torch.no_grad(), self.adapters.use("student"), self._autocast():'),),
        (f"{CORE_TRAINER}::test_backward_per_rollout_step_equals_one_backward_of_the_summed_loss",)),
    Mutation("resume_restores_step_only", "resume sets the step counter but not weights, optimizer or random state", (
        Edit("dopsd_core/trainer.py",
             "        self.adapters.load_state(checkpoint.student, checkpoint.teacher)\n"
             "        self.adapters.load_optimizer_state(self.optimizer, checkpoint.trainer_state[\"optimizer\"])\n",
             ""),
        Edit("dopsd_core/trainer.py", "        self._set_random_state(checkpoint.trainer_state[\"random\"])\n", "")),
        (f"{ZIMAGE_PROMISES}::test_resumed_training_ends_with_the_lora_of_an_uninterrupted_run",)),
    Mutation("checkpoint_teacher_is_student", "checkpoints store the student as the teacher", (
        Edit("dopsd_core/trainer.py",
             "student, teacher = self.adapters.student_state(), self.adapters.teacher_state()",
             "student, teacher = self.adapters.student_state(), self.adapters.student_state()"),),
        (f"{ZIMAGE_PROMISES}::test_resumed_training_ends_with_the_lora_of_an_uninterrupted_run",)),
    Mutation("vlm_teacher_blank_image", "the VLM teacher is shown a black image instead of the target", (
        Edit("nodes/teacher_vlm.py", "image[..., :3].clamp(0, 1).float()", "image[..., :3].clamp(0, 1).mul(0).float()"),),
        (f"{ZIMAGE_PROMISES}::test_the_vlm_teachers_prediction_follows_the_image_and_the_students_does_not",)),
    Mutation("autocast_never_on", "bf16 mixed precision is accepted but never switched on", (
        Edit("dopsd_core/trainer.py", 'self._autocast_dtype = torch.bfloat16 if precision == "bf16" else None',
             "self._autocast_dtype = None"),),
        (f"{CORE_TRAINER}::test_mixed_precision_is_the_dtype_the_models_layers_compute_in",)),
    Mutation("klein_trains_on_the_sampling_grid", "the authors' klein grid (to 0.001) replaced by the sampling grid", (
        Edit("dopsd_core/schedules.py", "t = torch.linspace(1.0, _DIFFUSERS_FLOW_SIGMA_MIN, steps, dtype=torch.float64)",
             "t = torch.linspace(1.0, 1.0 / steps, steps, dtype=torch.float64)"),),
        ("tests/core/test_core_schedules.py",)),
    Mutation("loss_space_ignored", "the velocity loss option computes the x0 loss", (
        Edit("dopsd_core/losses.py", '    if space == "x0":\n        return x0_loss(student_x0, teacher_x0)\n',
             '    if space in ("x0", "velocity"):\n        return x0_loss(student_x0, teacher_x0)\n'),),
        (f"{CORE_TRAINER}::test_velocity_loss_space_weights_each_rollout_step_by_one_over_sigma_squared",)),
    Mutation("cancel_ignored", "Cancel is not looked at during a roll-out", (
        Edit("dopsd_core/trainer.py",
             "            if should_cancel():\n                raise TrainingCancelled(f\"cancelled during optimizer step {self.step + 1}\")\n"
             "            student_x0, loss = self._distill_on_state",
             "            student_x0, loss = self._distill_on_state"),),
        (f"{CORE_TRAINER}::test_cancel_mid_rollout_leaves_the_last_completed_step",)),
    Mutation("start_from_lora_ignored", "start_from_lora is accepted but training starts from zero", (
        Edit("nodes/training.py", "                start_from(adapters, *start, file_keys, spec)\n", "                pass\n"),),
        ("tests/zimage/test_start_from_lora.py",)),
    Mutation("memory_plan_from_small_probes_only", "the plan extrapolates from the quarter- and half-area steps "
             "instead of measuring the full-size one", (
        Edit("dopsd_core/memory_plan.py", "        points.append((prod(latent_shape), measure_step(tuple(latent_shape))))\n",
             ""),),
        ("tests/zimage/test_memory_plan.py",)),
    Mutation("memory_plan_never_stops", "a run that does not fit starts anyway", (
        Edit("nodes/memory_check.py", "    if plan.step_measured and plan.training * SAFETY_FACTOR <= available:\n",
             "    if True:\n"),),
        ("tests/zimage/test_memory_plan.py",)),
    Mutation("damaged_checkpoint_resumed", "resume trusts the newest checkpoint without checking it", (
        Edit("dopsd_core/checkpoints.py", "        damage = checkpoint_damage(path)\n", "        damage = None\n"),),
        ("tests/core/test_core_checkpoints.py",)),
    Mutation("keep_last_ignored", "every checkpoint is kept whatever keep_last says", (
        Edit("dopsd_core/checkpoints.py", "        deleted += intact[:-keep_last]\n", ""),),
        ("tests/core/test_core_checkpoints.py",)),
    Mutation("loss_history_not_restored", "a resumed run's loss graph starts at the resume", (
        Edit("dopsd_core/trainer.py",
             '        self.loss_history = list(checkpoint.trainer_state.get("losses", []))  # older checkpoints have none\n',
             ""),),
        ("tests/core/test_core_checkpoints.py",)),
    Mutation("ranks_draw_alike", "every process runs the same micro-steps instead of its own share of the batch", (
        Edit("dopsd_core/data_parallel.py", "return range(self.rank * per_process, (self.rank + 1) * per_process)",
             "return range(per_process)"),),
        (f"{MULTI_GPU}::test_two_processes_train_what_one_process_trains_with_twice_the_accumulation",)),
    Mutation("gradients_summed", "the processes' gradients are summed, not averaged", (
        Edit("dopsd_core/data_parallel.py", "            flat /= self.world_size\n", ""),),
        (f"{MULTI_GPU}::test_two_processes_train_what_one_process_trains_with_twice_the_accumulation",)),
    Mutation("full_teacher_frozen", "full fine-tuning's teacher never follows the student", (
        Edit("dopsd_core/full_weights.py", "            teacher.lerp_(student, 1.0 - decay)\n", "            pass\n"),),
        ("tests/core/test_core_full_weights.py",)),
    Mutation("draws_ignore_step", "a micro-step's draws do not depend on the optimizer step", (
        Edit("dopsd_core/data_parallel.py", "SeedSequence([seed, step, index])", "SeedSequence([seed, index])"),),
        ("tests/core/test_core_training_jobs.py",)),
)


def copy_repository(source: Path, destination: Path) -> None:
    shutil.copytree(source, destination, symlinks=True,
                    ignore=lambda folder, names: [n for n in names if n in NOT_COPIED])
    for environment in (".venv", ".comfyui"):  # shared read-only: the copy's tests use the same installs
        if (REPO / environment).exists() and not (destination / environment).exists():
            (destination / environment).symlink_to(REPO / environment)


def apply(mutation: Mutation, root: Path) -> str | None:
    """Apply every edit; the reason it cannot be applied, or None."""
    for edit in mutation.edits:
        path = root / edit.file
        text = path.read_text()
        count = text.count(edit.find)
        if count != 1:
            return f"{edit.file}: snippet found {count} times, expected once: {edit.find.strip()[:70]!r}"
        path.write_text(text.replace(edit.find, edit.replace))
    return None


def run(mutation: Mutation, snapshot: Path, python: str, timeout: int) -> tuple[str, float, str]:
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=f"dopsd_mutant_{mutation.name}_") as folder:
        root = Path(folder) / "repo"
        copy_repository(snapshot, root)
        stale = apply(mutation, root)
        if stale:
            return "STALE", time.perf_counter() - start, stale
        command = [python, "-m", "pytest", "-c", "tests/pytest.ini", "--rootdir", "tests", "-x", "-q", "-p",
                   "no:cacheprovider", *mutation.tests]
        env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
        try:
            done = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return "CAUGHT", time.perf_counter() - start, f"tests timed out after {timeout} s"
        lines = [line for line in done.stdout.splitlines() if line.strip()]
        summary = lines[-1] if lines else done.stderr.strip().splitlines()[-1:]
        first_error = next((line[1:].strip() for line in lines if line.startswith("E ")), "")
        if first_error:
            summary = f"{summary}; first error: {first_error[:150]}"
        verdict = "SURVIVED" if done.returncode == 0 else "CAUGHT"
        if done.returncode in (2, 3, 4):  # interrupted, internal error, usage error: not a test verdict
            verdict = "ERROR"
        return verdict, time.perf_counter() - start, str(summary)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="mutations to run (default: all)")
    parser.add_argument("--list", action="store_true", help="list the mutations and their tests")
    parser.add_argument("--timeout", type=int, default=600, help="seconds per mutation's test run")
    args = parser.parse_args(argv)
    unknown = set(args.names) - {m.name for m in MUTATIONS}
    if unknown:
        parser.error(f"unknown mutations: {', '.join(sorted(unknown))}")
    selected = [m for m in MUTATIONS if not args.names or m.name in args.names]
    if args.list:
        for m in selected:
            print(f"{m.name:36s} {m.intent}\n{'':36s} tests: {', '.join(m.tests)}")
        return 0
    python = str(REPO / ".venv" / "bin" / "python")
    started, results = time.perf_counter(), []
    with tempfile.TemporaryDirectory(prefix="dopsd_mutation_snapshot_") as folder:
        snapshot = Path(folder) / "repo"
        copy_repository(REPO, snapshot)
        for mutation in selected:
            verdict, seconds, detail = run(mutation, snapshot, python, args.timeout)
            results.append(verdict)
            print(f"{verdict:8s} {seconds:6.1f} s  {mutation.name:36s} {mutation.intent}\n{'':18s}{detail}",
                  flush=True)
    print(f"\n{results.count('CAUGHT')} caught, {results.count('SURVIVED')} survived, {results.count('STALE')} stale, "
          f"{results.count('ERROR')} errors; {time.perf_counter() - started:.0f} s in all")
    return 0 if all(v == "CAUGHT" for v in results) else 1


if __name__ == "__main__":
    sys.exit(main())
