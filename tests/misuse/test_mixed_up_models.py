"""Training sets made for another model: wired to the wrong MODEL, or built with another model's VAE or teacher
context. Each is refused by the node that meets it, naming the mix-up and the fix, before any training state exists
(without the checks these failed deep inside the model with "mat1 and mat2 shapes cannot be multiplied" or
KeyError 'pooled_output')."""
from __future__ import annotations

import pytest
import torch

from devkit.tiny_vlm import MATCHING_VISION_FILE
from devkit.comfy_runtime import pack_module
from devkit.graph import Graph
from tests.klein.klein_graphs import TRAIN_DEFAULTS, dataset, load_klein, reference_teacher
from tests.node_errors import assert_node_error
from tests.zimage.zimage_graphs import load_family


def train_on(g: Graph, model_loader, pairs) -> None:
    trained = g.node("DOPSDTrain", model=model_loader.out(0), training_set=pairs, training_sigmas=model_loader.out(4),
                     **TRAIN_DEFAULTS)
    g.node("PreviewAny", source=trained.out(1))


def klein_set_on_zimage(g: Graph, concept_folder: str, klein_folder: str) -> str:
    zimage, klein = load_family(g), load_klein(g)
    train_on(g, zimage, reference_teacher(g, klein, dataset(g, klein_folder)))
    return "DOPSDTrain"


def zimage_vae_in_klein_teacher(g: Graph, concept_folder: str, klein_folder: str) -> str:
    zimage, klein = load_family(g), load_klein(g)
    pairs = g.node("DOPSDTeacherContextReference", clip=klein.out(1), vae=zimage.out(2),
                   dataset=dataset(g, klein_folder), instruction="Keep the subject.")
    preview = g.node("DOPSDRolloutPreview", model=klein.out(0), vae=klein.out(2), training_set=pairs,
                     sigmas=klein.out(4), image_index=0, prompt_variant=0, seed=0)
    g.node("PreviewImage", images=preview)
    return "DOPSDRolloutPreview"


def zimage_vlm_teacher_on_klein(g: Graph, concept_folder: str, klein_folder: str) -> str:
    zimage, klein = load_family(g), load_klein(g)
    pairs = g.node("DOPSDTeacherContextVLM", clip=zimage.out(1), vae=klein.out(2), dataset=dataset(g, concept_folder),
                   vision_weights=MATCHING_VISION_FILE.split("/", 1)[1])
    train_on(g, klein, pairs)
    return "DOPSDTrain"


@pytest.mark.parametrize("mix_up, fragment", [
    (klein_set_on_zimage, "encoded into 128-channel latents, but this MODEL works on 16-channel latents"),
    (zimage_vae_in_klein_teacher, "encoded into 16-channel latents, but this MODEL works on 128-channel latents"),
    # 0.3.75 reports the missing klein text features as a KeyError, 0.33 as a shape mismatch.
    (zimage_vlm_teacher_on_klein, "cannot read the training set's conditioning ("),
], ids=lambda value: getattr(value, "__name__", ""))
def test_training_set_made_for_another_model_is_refused_with_the_fix(comfy, concept_folder, klein_concept_folder,
                                                                     user_files, mix_up, fragment):
    g = Graph()
    node = mix_up(g, concept_folder, klein_concept_folder)
    assert_node_error(comfy.run(g.to_api()), node, fragment, "from this MODEL's own loader")


def test_other_model_errors_become_the_mix_up_message_but_out_of_memory_passes_through(comfy):
    bridge, errors = pack_module("nodes.model_bridge"), pack_module("nodes.errors")
    with pytest.raises(errors.DOPSDInputError, match=r"^DOPSDTrain: the MODEL cannot read the training set's "
                                                     r"conditioning \(RuntimeError: mat1 and mat2 .*probably.* "
                                                     r"How to fix: build the training set with the CLIP and VAE"):
        with bridge.explain_unreadable_conditioning("DOPSDTrain"):
            raise RuntimeError("mat1 and mat2 shapes cannot be multiplied (6x512 and 64x256)")
    for out_of_memory in (torch.cuda.OutOfMemoryError("CUDA out of memory"),
                          RuntimeError("MPS backend out of memory (MPS allocated: 17.00 GB)")):
        with pytest.raises(type(out_of_memory), match="out of memory"):
            with bridge.explain_unreadable_conditioning("DOPSDTrain"):
                raise out_of_memory
