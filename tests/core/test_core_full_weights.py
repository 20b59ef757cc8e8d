"""Full fine-tuning's student and EMA teacher (dopsd_core.full_weights) with the Trainer, on the toy DiT."""
import copy
from types import SimpleNamespace

import torch

from dopsd_core import DualWeights, TrainConfig, Trainer, TrainingItem

from .test_core_trainer import SIGMAS, toy_pair
from devkit.core_toys import ToyDiT


def full_trainer(**config) -> tuple[Trainer, SimpleNamespace, dict]:
    torch.manual_seed(0)
    holder = SimpleNamespace(network=ToyDiT())
    start = {k: v.clone() for k, v in holder.network.state_dict().items()}
    weights = DualWeights(holder, "network", copy.deepcopy(holder.network))
    items = [TrainingItem([toy_pair(1)[0], toy_pair(2)[0]], (4, 8, 8))]
    trainer = Trainer(lambda x, sigma, cond: holder.network(x, sigma, cond), weights, items, SIGMAS,
                      TrainConfig(**{"learning_rate": 1e-3, **config}))
    return trainer, holder, start


def test_each_role_runs_its_own_network_and_the_student_is_back_after():
    trainer, holder, _ = full_trainer()
    weights = trainer.adapters
    with weights:
        with weights.use("teacher"):
            assert holder.network is weights.teacher
        assert holder.network is weights.student
        with weights.use("teacher"):
            pass
    assert holder.network is weights.student
    assert all(p.requires_grad for p in weights.student.parameters())
    assert not any(p.requires_grad for p in weights.teacher.parameters())


def test_every_weight_trains_and_the_teacher_is_their_ema():
    decay = 0.5
    trainer, holder, start = full_trainer(ema_decay=decay)
    expected = {k: v.clone() for k, v in start.items()}

    def follow_student(report):
        for name, value in trainer.adapters.student.state_dict().items():
            expected[name] = decay * expected[name] + (1 - decay) * value

    reports = trainer.train(3, on_step=follow_student)
    student, teacher = trainer.adapters.student_state(), trainer.adapters.teacher_state()
    # A buffer, and the layer that reads the teacher's image, which the student's prediction never uses.
    untouched = {"frequencies", "reference_in.weight", "reference_in.bias"}
    assert [k for k in start if torch.equal(student[k], start[k])] == sorted(untouched, key=list(start).index)
    for name in expected:
        torch.testing.assert_close(teacher[name], expected[name], atol=1e-7, rtol=1e-6)
    assert reports[0].loss > 0 and all(r.communication_seconds == 0.0 for r in reports)
