"""Write the vision tower of a Qwen3-VL-4B-Instruct checkpoint into one small file for the Z-Image VLM teacher.

    python scripts/extract_qwen3vl_vision.py /path/to/Qwen3-VL-4B-Instruct ComfyUI/models/clip_vision/qwen3_vl_4b_instruct_vision.safetensors

The folder is the release as published (config.json and *.safetensors shards); only the `model.visual.*`
tensors are kept (about 0.8 GB in bf16), with the vision config in the file header.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import save_file

VISION_PREFIX = "model.visual."


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint_dir", type=Path)
    parser.add_argument("output", type=Path)
    args = parser.parse_args()
    tensors = {}
    for shard in sorted(args.checkpoint_dir.glob("*.safetensors")):
        with safe_open(str(shard), framework="pt") as f:
            for key in f.keys():
                if key.startswith(VISION_PREFIX):
                    tensors[key] = f.get_tensor(key)
    if not tensors:
        raise SystemExit(f"no '{VISION_PREFIX}*' tensors in {args.checkpoint_dir}/*.safetensors")
    config = json.loads((args.checkpoint_dir / "config.json").read_text())["vision_config"]
    args.output.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(args.output), metadata={"config": json.dumps(config)})
    print(f"wrote {len(tensors)} tensors to {args.output}")


if __name__ == "__main__":
    main()
