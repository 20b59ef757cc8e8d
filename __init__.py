"""D-OPSD for ComfyUI: on-policy self-distillation fine-tuning for few-step image models.

ComfyUI loads this package from custom_nodes/ and calls `comfy_entrypoint` (the V3 extension API).
"""
from comfy_api.latest import ComfyExtension, io

from .nodes import NODES


class DOPSDExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return list(NODES)


async def comfy_entrypoint() -> DOPSDExtension:
    return DOPSDExtension()
