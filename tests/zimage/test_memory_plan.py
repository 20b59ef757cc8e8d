"""DOPSDTrain's memory plan: before the first step it measures what the run will need, shows it on the node, and
stops with settings that fit when the memory is not there; the settings it names then fit."""
from __future__ import annotations

import re
from contextlib import contextmanager

import pytest

from devkit.comfy_runtime import pack_module
from devkit.graph import Graph
from tests.node_errors import node_error_message
from tests.zimage.zimage_graphs import load_family, train, training_set

# Large enough that one roll-out step's activations dominate what training allocates (a 32x32 latent, 256 tokens).
MEGAPIXELS = 256 * 256 / 1_000_000
UNITS = {"MB": 1e6, "GB": 1e9}
PLAN = re.compile(r"memory plan: about ([\d.]+) (MB|GB) at the peak \(weights ([\d.]+) (MB|GB), LoRA ([\d.]+) (MB|GB), "
                  r"gradients and optimizer ([\d.]+) (MB|GB), one roll-out step ([\d.]+) (MB|GB)\)")
# The measured peak of training against the plan's training part (optimizer state + one roll-out step). Measured:
# -2.0 % / -0.7 % (0.3.75) and -2.2 % / -0.7 % (0.33) with / without checkpointing; the rest of an optimizer step
# (clipping, AdamW's and the EMA's temporaries) is what the plan leaves out.
STATED_ERROR = 0.10


def plan_shown(comfy, node_id: str) -> dict[str, float]:
    texts = [data["text"] for event, data in comfy.server.messages
             if event == "progress_text" and str(data["node"]) == str(node_id)]
    match = PLAN.match(texts[0]) if texts else None
    assert match, texts
    values = [float(v) * UNITS[u] for v, u in zip(match.groups()[::2], match.groups()[1::2])]
    return dict(zip(("total", "weights", "adapters", "optimizer_state", "step"), values))


class TrainingPeak:
    """A training observer measuring the allocator peak while Trainer.train runs (after the plan was made)."""

    peak: int | None = None

    @contextmanager
    def watching(self, trainer):
        with pack_module("dopsd_core").AllocationPeak(trainer.device) as peak:
            yield
        self.peak = peak.peak

    def after_step(self, trainer, report):
        pass


def run_training(comfy, folder, megapixels=MEGAPIXELS, **inputs):
    g = Graph()
    loader = load_family(g)
    trained = train(g, loader, training_set(g, loader, folder, megapixels=megapixels), steps=2, **inputs)
    g.node("DOPSDSaveLoRA", model=loader.out(0), lora=trained.out(1), lora_name="memory_plan", overwrite=True,
           strength=1.0)
    observers, observer = pack_module("nodes.training").TRAINING_OBSERVERS, TrainingPeak()
    observers.append(observer)
    try:
        run = comfy.run(g.to_api())
    finally:
        observers.remove(observer)
    return run, trained.node_id, observer.peak, loader.node_id


@pytest.fixture(scope="module")
def plans(comfy, concept_folder):
    """The plan and the measured training peak with gradient checkpointing on and off."""
    measured = {}
    for checkpointing in (True, False):
        run, train_id, peak, _ = run_training(comfy, concept_folder, gradient_checkpointing=checkpointing)
        assert run.success, run.error or run.node_errors
        measured[checkpointing] = plan_shown(comfy, train_id), peak
    return measured


@pytest.mark.parametrize("checkpointing", [True, False], ids=["checkpointing", "no checkpointing"])
def test_the_plan_is_within_its_stated_error_of_the_measured_peak(plans, checkpointing):
    plan, measured = plans[checkpointing]
    planned = plan["optimizer_state"] + plan["step"]
    print(f"\ncheckpointing {checkpointing}: planned {planned / 1e6:.1f} MB (step {plan['step'] / 1e6:.1f} MB), "
          f"measured {measured / 1e6:.1f} MB, error {planned / measured - 1:+.1%}")
    assert abs(planned / measured - 1) < STATED_ERROR
    assert plans[False][0]["step"] > 1.5 * plans[True][0]["step"], "checkpointing keeps less for backward"


def test_too_little_memory_stops_before_training_and_the_named_setting_fits(comfy, comfy_base, concept_folder, plans):
    checkpointed, _ = plans[True]
    resident = checkpointed["weights"] + checkpointed["adapters"]
    limit_gb = (resident + 1.5 * (checkpointed["optimizer_state"] + checkpointed["step"])) / 1e9
    assert (resident + plans[False][0]["optimizer_state"] + plans[False][0]["step"]) / 1e9 > limit_gb
    folder = "dopsd/checkpoints/memory_plan_stop"
    run, train_id, peak, loader_id = run_training(comfy, concept_folder, gradient_checkpointing=False,
                                                  memory_limit_gb=limit_gb, checkpoint_every=1, checkpoint_folder=folder)
    message = node_error_message(run, "DOPSDTrain")
    for fragment in ("for training on top of the loaded model", "memory_limit_gb", "turn gradient_checkpointing on",
                     ": fits", "Nothing was trained"):
        assert fragment in message, message
    assert peak is None, "training started"
    assert not [m for e, m in comfy.server.messages if e == "progress" and str(m.get("node")) == str(train_id)]
    assert not (comfy_base / "output" / folder).exists()
    model = run.output(loader_id)[0]
    assert not any("lora_" in name for name, _ in model.model.diffusion_model.named_modules())

    fixed, _, _, _ = run_training(comfy, concept_folder, gradient_checkpointing=True, memory_limit_gb=limit_gb)
    assert fixed.success, fixed.error


def test_the_megapixels_it_names_fit(comfy, concept_folder, plans):
    plan, _ = plans[True]
    limit_gb = (plan["weights"] + plan["adapters"] + 0.8 * (plan["optimizer_state"] + plan["step"])) / 1e9
    run, _, _, _ = run_training(comfy, concept_folder, memory_limit_gb=limit_gb)
    message = node_error_message(run, "DOPSDTrain")
    megapixels = float(re.search(r"megapixels to ([\d.]+) or less", message).group(1))
    assert 0.1 * MEGAPIXELS < megapixels < MEGAPIXELS
    fits, train_id, _, _ = run_training(comfy, concept_folder, megapixels=megapixels, memory_limit_gb=limit_gb)
    assert fits.success, fits.error
