"""Dataset nodes: image–text pairs from a folder under ComfyUI's input directory, or from IMAGE + text in the graph."""
from __future__ import annotations

import codecs
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import folder_paths
import numpy as np
import torch
from comfy_api.latest import io
from PIL import Image, ImageOps, UnidentifiedImageError

from ..dopsd_core.buckets import bucket_size, center_crop_box
from .errors import node_error
from .node_text import report

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
CAPTION_SUFFIX = ".txt"
METADATA_FILE = "metadata.jsonl"
# Windows editors in Western locales save "ANSI" text in this code page; other bytes that are not UTF-8 are refused.
FALLBACK_ENCODING, FALLBACK_ENCODING_NAME = "cp1252", "Windows-1252"
CAPTION_BLOCK_SEPARATOR = "---"
DATASET = io.Custom("DOPSD_DATASET")


@dataclass(frozen=True)
class DatasetItem:
    name: str
    image: torch.Tensor  # [1, H, W, 3] in 0..1, already at its bucket size; for an edit triple, the target
    prompts: tuple[str, ...]  # prompt variants (edit instructions for a triple); one is drawn per training step
    sources: tuple[torch.Tensor, ...] = ()  # an edit triple's source images, each [1, h, w, 3] at its own bucket

    @property
    def is_edit(self) -> bool:
        return bool(self.sources)


@dataclass(frozen=True)
class Record:
    """One metadata line or caption file: the (target) image, an edit's source images, the prompt variants."""

    image: Path
    prompts: tuple[str, ...]
    sources: tuple[Path, ...] = ()


def apply_trigger(prompt: str, placeholder: str, trigger_word: str) -> str:
    return prompt.replace(placeholder, trigger_word) if placeholder and trigger_word else prompt


def caption_variants(text: str) -> tuple[str, ...]:
    return tuple(line.strip() for line in text.splitlines() if line.strip())


def to_bucket(image: Image.Image, megapixels: float, multiple: int) -> torch.Tensor:
    image = ImageOps.exif_transpose(image).convert("RGB")
    width, height = bucket_size(image.width, image.height, int(megapixels * 1_000_000), multiple)
    image = image.crop(center_crop_box(image.width, image.height, width, height)).resize((width, height), Image.LANCZOS)
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0)[None]


def read_text(path: Path, node) -> tuple[str, str | None]:
    """A caption or metadata file's text, and the encoding named when it was not UTF-8: UTF-8 with or without BOM,
    UTF-16 with BOM, else Windows-1252 (reported, so that a wrong guess never passes unnoticed)."""
    data = path.read_bytes()
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return data.decode("utf-16"), None
    if b"\x00" not in data:  # NUL bytes are valid UTF-8, but in a caption they mean UTF-16 without a BOM
        try:
            return data.decode("utf-8-sig"), None
        except UnicodeDecodeError:
            try:
                return data.decode(FALLBACK_ENCODING), FALLBACK_ENCODING_NAME
            except UnicodeDecodeError:
                pass
    raise node_error(node, f"cannot tell the text encoding of '{path.name}'",
                     "save it as UTF-8 (in Notepad: Save As, Encoding 'UTF-8')")


def resolve_dataset_folder(folder: str, allow_outside_input: bool, node) -> Path:
    input_dir = Path(folder_paths.get_input_directory()).resolve()
    path = Path(folder).expanduser()
    path = (path if path.is_absolute() else input_dir / path).resolve()
    if not allow_outside_input and path != input_dir and input_dir not in path.parents:
        raise node_error(node, f"the folder '{folder}' is outside ComfyUI's input folder ({input_dir})",
                         "move the images under ComfyUI/input, or enable allow_outside_input")
    if not path.is_dir():
        raise node_error(node, f"the folder '{path}' does not exist",
                         f"create it under {input_dir} with images and same-name .txt captions")
    return path


METADATA_FORMATS = (
    'write one JSON object per line: {"image": "a.png", "prompt": "..."} or {"image": "a.png", "prompts": '
    '["...", "..."]}; for edit tuning {"sources": ["a.png", ...], "target": "b.png", "prompt": "..."}'
)


def parse_record(folder: Path, record: dict, number: int, node) -> Record:
    """One metadata.jsonl line: an image-text pair ("image") or an edit triple ("sources" + "target")."""
    if not isinstance(record, dict):
        raise node_error(node, f"{METADATA_FILE} line {number} is not a JSON object", METADATA_FORMATS)
    prompts = record.get("prompts") or [record.get("prompt")]
    if isinstance(prompts, str):
        prompts = [prompts]
    if not isinstance(prompts, list) or not all(p is None or isinstance(p, str) for p in prompts):
        raise node_error(node, f"{METADATA_FILE} line {number}: 'prompts' must be a list of strings", METADATA_FORMATS)
    if "target" in record or "sources" in record:
        sources = record.get("sources")
        if isinstance(sources, str):
            sources = [sources]
        if not sources or not isinstance(sources, list) or not isinstance(record.get("target"), str) \
                or not all(isinstance(name, str) for name in sources):
            raise node_error(node, f"{METADATA_FILE} line {number}: an edit triple needs 'sources' (a list of "
                                   "one or more image names) and 'target' (one image name)", METADATA_FORMATS)
        names = [*sources, record["target"]]
    elif isinstance(record.get("image"), str):
        names = [record["image"]]
    else:
        raise node_error(node, f"{METADATA_FILE} line {number} names no image", METADATA_FORMATS)
    for name in names:
        if not (folder / name).is_file():
            raise node_error(node, f"{METADATA_FILE} line {number} names '{name}', which is not in {folder}",
                             "fix the file name or add the image")
    paths = [folder / name for name in names]
    return Record(image=paths[-1], prompts=tuple(p.strip() for p in prompts if p and p.strip()),
                  sources=tuple(paths[:-1]))


def read_records(folder: Path, node) -> list[Record]:
    """The folder's records from metadata.jsonl if present, else images with same-name .txt captions."""
    metadata = folder / METADATA_FILE
    if metadata.is_file():
        records = []
        text, encoding = read_text(metadata, node)
        if encoding:
            report(node, f"{METADATA_FILE} is not UTF-8; read it as {encoding}")
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise node_error(node, f"{METADATA_FILE} line {number} is not valid JSON ({err})",
                                 METADATA_FORMATS) from err
            records.append(parse_record(folder, record, number, node))
    else:
        images = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        missing = [p.name for p in images if not p.with_suffix(CAPTION_SUFFIX).is_file()]
        if missing:
            raise node_error(node, f"{len(missing)} image(s) have no caption file: {', '.join(missing[:5])}",
                             "add a .txt file with the same name next to each image (one prompt variant per line)")
        records, not_utf8 = [], []
        for image in images:
            caption = image.with_suffix(CAPTION_SUFFIX)
            text, encoding = read_text(caption, node)
            records.append(Record(image, caption_variants(text)))
            if encoding:
                not_utf8.append(caption.name)
        notices = unused_files_notice(folder, images)
        if not_utf8:
            notices.append(f"read {len(not_utf8)} caption(s) that are not UTF-8 as {FALLBACK_ENCODING_NAME}: "
                           f"{names(not_utf8)}")
        if notices:
            report(node, "; ".join(notices))
    if not records:
        raise node_error(node, f"no images found in {folder}",
                         f"add {', '.join(IMAGE_SUFFIXES)} images with same-name .txt captions, or a {METADATA_FILE}")
    empty = [record.image.name for record in records if not record.prompts]
    if empty:
        raise node_error(node, f"empty caption for: {', '.join(empty[:5])}", "write at least one prompt per image")
    return records


def names(files: list[str], shown: int = 5) -> str:
    return ", ".join(files[:shown]) + (f" and {len(files) - shown} more" if len(files) > shown else "")


def unused_files_notice(folder: Path, images: list[Path]) -> list[str]:
    """What in the folder is not part of the dataset, so a misnamed caption or an unsupported image is noticed:
    captions without an image, and files of other types (hidden files and folders are passed over silently)."""
    used = {p.name for p in images} | {p.with_suffix(CAPTION_SUFFIX).name for p in images}
    unused = sorted(p.name for p in folder.iterdir() if p.name not in used and not p.name.startswith("."))
    orphans = [name for name in unused if name.endswith(CAPTION_SUFFIX)]
    others = [name for name in unused if not name.endswith(CAPTION_SUFFIX)]
    notices = []
    if orphans:
        notices.append(f"{len(orphans)} caption(s) without an image were not used: {names(orphans)}")
    if others:
        kinds = "/".join(suffix.lstrip(".") for suffix in IMAGE_SUFFIXES)
        notices.append(f"{len(others)} file(s) or folder(s) that are not {kinds} images were not used: {names(others)}")
    return notices


def load_image(path: Path, node) -> Image.Image:
    try:
        with Image.open(path) as image:
            image.load()
            return image.copy()
    except (UnidentifiedImageError, OSError) as err:
        raise node_error(node, f"cannot read the image '{path.name}' ({err})",
                         "re-export it as PNG or JPEG, or remove it and its caption") from err


def folder_fingerprint(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            stat = path.stat()
            digest.update(f"{path.relative_to(folder)}:{stat.st_size}:{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def caption_and_bucket_inputs() -> list:
    return [
        io.String.Input("trigger_word", default="",
                        tooltip="Replaces the placeholder in every caption (e.g. 'sks fox'); empty keeps the placeholder."),
        io.String.Input("placeholder", default="[trigger]", tooltip="The concept placeholder written in the captions."),
        io.Float.Input("megapixels", default=1.0, min=0.001, max=4.0, step=0.001,
                       tooltip="Target pixel count of the aspect-ratio buckets (the authors used ~1 MP)."),
        io.Int.Input("bucket_multiple", default=64, min=16, max=256, step=16,
                     tooltip="Bucket sides are multiples of this (VAE downscale × patch size, or more)."),
    ]


class DOPSDDatasetFromFolder(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DOPSDDatasetFromFolder",
            display_name="Dataset from Folder (D-OPSD)",
            category="D-OPSD",
            description=(
                "Image–text pairs from a folder under ComfyUI/input: images with same-name .txt captions (one prompt "
                f"variant per line), or a {METADATA_FILE} with image and prompt(s) fields. For edit tuning, "
                f"{METADATA_FILE} lines with sources (a list of images), target and prompt(s) (the edit instructions)."
            ),
            inputs=[
                io.String.Input("folder", default="dopsd/my_concept", tooltip="Relative to ComfyUI's input folder."),
                *caption_and_bucket_inputs(),
                io.Boolean.Input("allow_outside_input", default=False,
                                 tooltip="Allow a folder outside ComfyUI's input folder (absolute path)."),
            ],
            outputs=[DATASET.Output(display_name="dataset")],
        )

    @classmethod
    def fingerprint_inputs(cls, folder, allow_outside_input, **_):
        # Re-run (and retrain downstream) when files in the folder change, not only when the inputs do.
        try:
            return folder_fingerprint(resolve_dataset_folder(folder, allow_outside_input, cls))
        except ValueError:
            return float("nan")  # never equal: the error is reported by execute

    @classmethod
    def execute(cls, folder, trigger_word, placeholder, megapixels, bucket_multiple, allow_outside_input) -> io.NodeOutput:
        path = resolve_dataset_folder(folder, allow_outside_input, cls)
        bucket = lambda image_path: to_bucket(load_image(image_path, cls), megapixels, bucket_multiple)  # noqa: E731
        items = [
            DatasetItem(
                name=record.image.name,
                image=bucket(record.image),
                prompts=tuple(apply_trigger(p, placeholder, trigger_word) for p in record.prompts),
                sources=tuple(bucket(source) for source in record.sources),
            )
            for record in read_records(path, cls)
        ]
        return io.NodeOutput(items)


class DOPSDDatasetFromImages(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DOPSDDatasetFromImages",
            display_name="Dataset from Images (D-OPSD)",
            category="D-OPSD",
            description=(
                "Image–text pairs from an IMAGE batch wired in the graph. Captions: one prompt variant per line; "
                f"separate the captions of different images with a line '{CAPTION_BLOCK_SEPARATOR}' (one block = "
                "shared by all images)."
            ),
            inputs=[
                io.Image.Input("images", tooltip="The training images, as a batch (e.g. from Load Image nodes joined "
                                                 "with Batch Images)."),
                io.String.Input("captions", multiline=True, default="a photo of [trigger]",
                                tooltip="Prompt variants, one per line, shared by every image; the placeholder "
                                        "marks where the trigger word goes."),
                *caption_and_bucket_inputs(),
            ],
            outputs=[DATASET.Output(display_name="dataset")],
        )

    @classmethod
    def execute(cls, images, captions, trigger_word, placeholder, megapixels, bucket_multiple) -> io.NodeOutput:
        blocks = [caption_variants(b) for b in captions.split(f"\n{CAPTION_BLOCK_SEPARATOR}\n")]
        blocks = [b for b in blocks if b]
        if not blocks:
            raise node_error(cls, "the captions are empty", "write at least one prompt")
        if len(blocks) not in (1, images.shape[0]):
            raise node_error(cls, f"{images.shape[0]} images but {len(blocks)} caption blocks",
                             f"give one block per image, separated by '{CAPTION_BLOCK_SEPARATOR}' lines, or a single block for all")
        items = []
        for index, image in enumerate(images):
            pil = Image.fromarray((image[..., :3].clamp(0, 1).cpu().numpy() * 255).round().astype(np.uint8))
            prompts = blocks[index if len(blocks) > 1 else 0]
            items.append(DatasetItem(name=f"image_{index:03d}", image=to_bucket(pil, megapixels, bucket_multiple),
                                     prompts=tuple(apply_trigger(p, placeholder, trigger_word) for p in prompts)))
        return io.NodeOutput(items)
