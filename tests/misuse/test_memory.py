"""Memory behaviour of training, measured in the real ComfyUI runtime.

- DOPSDTrain asks ComfyUI's model management for the memory it needs (weights fully loaded, plus activations)
  before it starts, so other models are unloaded first instead of running out mid-run.
- The Z-Image VLM teacher is freed as soon as the teacher context is encoded.
- After DOPSDTrain returns, none of its training state stays referenced: the trainer, optimizer (AdamW moments),
  student/teacher adapters and autograd graphs are garbage, and the bytes of live tensors in the process equal
  those before the run (ComfyUI's cache then holds this run's outputs in place of the previous run's).
"""
from __future__ import annotations

import gc
import weakref

import torch

from devkit.comfy_runtime import pack_module
from devkit.graph import Graph
from tests.zimage.zimage_graphs import load_family, train, training_set

RANK = 16  # large enough that a leaked adapter or optimizer state would stand out from measurement noise



def live_tensor_bytes() -> int:
    """Bytes of the distinct tensor storages reachable as Python objects (CPU run: this is the process's tensors)."""
    gc.collect()
    seen, total = set(), 0
    for obj in gc.get_objects():
        try:
            if not isinstance(obj, torch.Tensor) or obj.is_meta:
                continue
            storage = obj.untyped_storage()
            key = (storage.data_ptr(), storage.nbytes(), str(obj.device))
        except (RuntimeError, NotImplementedError, ReferenceError):
            continue
        if key not in seen:
            seen.add(key)
            total += key[1]
    return total


def training_graph(folder: str, seed: int) -> tuple[dict, str]:
    g = Graph()
    loader = load_family(g)
    trained = train(g, loader, training_set(g, loader, folder), steps=2, rank=RANK, alpha=2.0 * RANK, seed=seed)
    g.node("LossGraphNode", loss=trained.out(2), filename_prefix="memory")
    return g.to_api(), trained.node_id


def test_training_asks_model_management_for_its_memory(comfy, concept_folder, monkeypatch):
    # `from` imports: a plain `import comfy.x` would rebind the `comfy` fixture's name inside this function.
    from comfy import model_management, sampler_helpers
    from comfy.model_base import BaseModel

    requests = []
    real_load = model_management.load_models_gpu

    def recording_load(models, *args, **kwargs):
        if kwargs.get("memory_required") and all(isinstance(m.model, BaseModel) for m in models):
            [model] = models  # the tiny training items are 80x48 px: latents [1, 16, 6, 10]
            requests.append({"memory_required": kwargs["memory_required"],
                             "force_full_load": kwargs.get("force_full_load", False),
                             "one_forward": sampler_helpers.estimate_memory(model, [1, 16, 6, 10], {})[0]})
        return real_load(models, *args, **kwargs)

    monkeypatch.setattr(model_management, "load_models_gpu", recording_load)
    graph, _ = training_graph(concept_folder, seed=101)
    run = comfy.run(graph)
    assert run.success, run.error
    full_loads = [r for r in requests if r["force_full_load"]]
    assert len(full_loads) == 1, f"DOPSDTrain should ask once for the memory of a full load: {requests}"
    [request] = full_loads
    assert request["force_full_load"] and request["memory_required"] > request["one_forward"] > 0, request
    print(f"DOPSDTrain asked for {request['memory_required'] / 2**20:.2f} MiB "
          f"(one forward: {request['one_forward'] / 2**20:.2f} MiB), full load")


def test_vlm_teacher_is_freed_after_encoding(comfy, concept_folder, monkeypatch):
    encoder_class = pack_module("nodes.teacher_vlm").VLMTeacherEncoder
    real_build = encoder_class.build.__func__
    built = []

    def recording_build(cls, *args, **kwargs):
        encoder = real_build(cls, *args, **kwargs)
        built.append((weakref.ref(encoder.model), sum(p.numel() * p.element_size() for p in encoder.model.parameters())))
        return encoder

    monkeypatch.setattr(encoder_class, "build", classmethod(recording_build))
    g = Graph()
    loader = load_family(g)
    # A prompt placeholder unique to this test, so the teacher context is encoded now, not taken from the cache.
    dataset_pairs = training_set(g, loader, concept_folder)
    [dataset] = [n for n in g.nodes.values() if n["class_type"] == "DOPSDDatasetFromFolder"]
    dataset["inputs"]["trigger_word"] = "vlm-freed-check"
    g.node("LossGraphNode", loss=train(g, loader, dataset_pairs, steps=2).out(2), filename_prefix="memory_vlm")
    run = comfy.run(g.to_api())
    assert run.success, run.error
    assert built, "the VLM teacher was never built"
    gc.collect()
    assert all(ref() is None for ref, _ in built), "the VLM teacher is still referenced after encoding"
    print(f"VLM teacher freed after encoding ({sum(size for _, size in built) / 2**20:.2f} MiB of weights)")


def test_no_training_tensors_stay_referenced_after_training(comfy, concept_folder, monkeypatch):
    training = pack_module("nodes.training")
    trainer_class = training.Trainer
    real_init = trainer_class.__init__
    state = {}

    def recording_init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        params = list(self.adapters.student_parameters())
        state["refs"] = [weakref.ref(self), weakref.ref(self.optimizer), weakref.ref(self.adapters),
                         *(weakref.ref(p) for p in params)]
        state["adapter_bytes"] = sum(p.numel() * p.element_size() for p in params)

    warm, _ = training_graph(concept_folder, seed=1)
    assert comfy.run(warm).success  # models loaded, training set encoded and cached, earlier outputs cached
    before = live_tensor_bytes()
    monkeypatch.setattr(trainer_class, "__init__", recording_init)
    graph, train_id = training_graph(concept_folder, seed=2)  # only DOPSDTrain and its loss graph re-run
    run = comfy.run(graph)
    assert run.success, run.error
    monkeypatch.undo()
    after = live_tensor_bytes()
    alive = [ref() for ref in state["refs"] if ref() is not None]
    assert not alive, f"still referenced after DOPSDTrain returned: {[type(o).__name__ for o in alive][:5]}"
    # One step of AdamW keeps 2 moments per parameter; a leaked student + teacher + optimizer would be ~4x this.
    leak_threshold = state["adapter_bytes"] // 2
    print(f"live tensors before {before / 2**20:.2f} MiB, after {after / 2**20:.2f} MiB "
          f"(difference {after - before:+d} bytes; student adapter {state['adapter_bytes']} bytes)")
    assert after - before < leak_threshold, (before, after, state["adapter_bytes"])
