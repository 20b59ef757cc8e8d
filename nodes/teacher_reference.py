"""Editing-branch teacher contexts (FLUX.2-klein, or any model that accepts reference latents).

The teacher sees the target image the way an edit model sees its input images: VAE-encoded and attached to the
conditioning as reference latents (ComfyUI's ReferenceLatent mechanism), plus an instruction appended to the
prompt that tells the model what to do with it. The student sees what it will see at inference.

* Concept tuning: student = the prompt; teacher = the prompt + an instruction to keep the reference's subject,
  background and composition + the target as the reference.
* Edit tuning: student = the source images as references + the edit instruction; teacher = the sources and the
  target as the LAST reference + the instruction + "the last image is the expected result".
"""
from __future__ import annotations

from comfy_api.latest import io

from .comfy_compat import with_reference_latents
from .training_set import TRAINING_SET, EncodedItem, EncodedPair, encode_image, encode_prompt
from .dataset import DATASET, DatasetItem
from .errors import node_error

# The authors' instructions, verbatim: model inputs their published results depend on.
DEFAULT_REFERENCE_INSTRUCTION = (
    "Make the main subject (facial/ip details), background, and overall composition consistent with the reference "
    "image."
)
DEFAULT_EDIT_INSTRUCTION = (
    "Note that the last image is the output image I expect to be. Your output must be as similar as the last "
    "reference image, based on the first reference image and the editing instructions."
)


def append_instruction(prompt: str, instruction: str) -> str:
    """`prompt`, a space and `instruction`, as the authors join them; the prompt alone for an empty instruction."""
    return f"{prompt} {instruction}" if instruction.strip() else prompt


def teacher_schema(node_id: str, display_name: str, description: str, dataset_tooltip: str, instruction: str,
                   instruction_tooltip: str) -> io.Schema:
    """Both klein teacher nodes take the same inputs; they differ in the dataset layout and the instruction."""
    return io.Schema(
        node_id=node_id,
        display_name=display_name,
        category="D-OPSD",
        description=description,
        inputs=[
            io.Clip.Input("clip", tooltip="The model's text encoder (klein: qwen_3_4b / qwen_3_8b, type flux2)."),
            io.Vae.Input("vae", tooltip="The MODEL's own VAE (same loader): encodes the targets (and edit sources) "
                                        "into the latents attached as references and trained toward."),
            DATASET.Input("dataset", tooltip=dataset_tooltip),
            io.String.Input("instruction", multiline=True, default=instruction, tooltip=instruction_tooltip),
        ],
        outputs=[TRAINING_SET.Output(display_name="training_set")],
    )


class DOPSDTeacherContextReference(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return teacher_schema(
            "DOPSDTeacherContextReference",
            "Teacher Context: Reference Image (D-OPSD, FLUX.2-klein)",
            "Editing-branch teacher for concept LoRAs: the teacher gets the prompt with an appended instruction plus "
            "the target image as a reference latent (as the ReferenceLatent node attaches it); the student gets the "
            "prompt alone. For FLUX.2-klein, or any model that accepts reference latents.",
            dataset_tooltip="Image–text pairs (not edit triples).",
            instruction=DEFAULT_REFERENCE_INSTRUCTION,
            instruction_tooltip="Appended to every prompt on the teacher side only. Empty: the prompt alone.",
        )

    @classmethod
    def execute(cls, clip, vae, dataset, instruction) -> io.NodeOutput:
        require_items(cls, dataset, edit=False)
        items = []
        for item in dataset:
            latent = encode_image(vae, item.image)
            pairs = tuple(
                EncodedPair(
                    prompt=prompt,
                    student=encode_prompt(clip, prompt),
                    teacher=with_reference_latents(encode_prompt(clip, append_instruction(prompt, instruction)), [latent]),
                )
                for prompt in item.prompts
            )
            items.append(EncodedItem(name=item.name, image=item.image, latent=latent, pairs=pairs))
        return io.NodeOutput(items)


class DOPSDTeacherContextEdit(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return teacher_schema(
            "DOPSDTeacherContextEdit",
            "Teacher Context: Edit Tuning (D-OPSD, FLUX.2-klein)",
            "Edit tuning on (source images, instruction, target) triples. Student: the sources as reference latents "
            "+ the instruction, as at inference. Teacher: the sources and the target as the last reference + the "
            "instruction with an appended note that the last image is the expected result.",
            dataset_tooltip="Edit triples: a folder whose metadata.jsonl lists sources and target.",
            instruction=DEFAULT_EDIT_INSTRUCTION,
            instruction_tooltip="Appended to every edit instruction on the teacher side only. Empty: nothing.",
        )

    @classmethod
    def execute(cls, clip, vae, dataset, instruction) -> io.NodeOutput:
        require_items(cls, dataset, edit=True)
        items = []
        for item in dataset:
            sources = [encode_image(vae, source) for source in item.sources]
            target = encode_image(vae, item.image)
            pairs = tuple(
                EncodedPair(
                    prompt=prompt,
                    student=with_reference_latents(encode_prompt(clip, prompt), sources),
                    teacher=with_reference_latents(encode_prompt(clip, append_instruction(prompt, instruction)),
                                                   [*sources, target]),
                )
                for prompt in item.prompts
            )
            items.append(EncodedItem(name=item.name, image=item.image, latent=target, pairs=pairs))
        return io.NodeOutput(items)


def require_items(node, dataset: list[DatasetItem], edit: bool) -> None:
    if not dataset:
        raise node_error(node, "the dataset is empty", "connect a dataset node with at least one item")
    wrong = [item.name for item in dataset if item.is_edit != edit]
    if wrong and edit:
        raise node_error(node, f"{len(wrong)} item(s) have no source images ({', '.join(wrong[:5])})",
                         'list them in metadata.jsonl as {"sources": [...], "target": "...", "prompt": "..."}, '
                         "or use Teacher Context: Reference Image for plain image–text pairs")
    if wrong:
        raise node_error(node, f"{len(wrong)} item(s) are edit triples with source images ({', '.join(wrong[:5])})",
                         "use Teacher Context: Edit Tuning for them, or give plain image–text pairs")
