"""The real ComfyUI runtime booted inside this Python process, executing API-format graphs.

ComfyUI keeps process-wide state (argument parsing, folder_paths, the node registry), so one runtime
exists per process; `ComfyRuntime.boot` returns it.
"""
from __future__ import annotations

import asyncio
import copy
import inspect
import itertools
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .paths import PACK_DIR_NAME, comfy_flags, comfyui_dir


def pack_module(name: str):
    """A module of the pack as ComfyUI imported it, e.g. "nodes.training" (custom nodes are registered under their
    path, not under the names this repository's own imports use)."""
    root = next(key for key in sys.modules if key.endswith(PACK_DIR_NAME))
    return sys.modules[f"{root}.{name}"]


@dataclass
class RecordingServer:
    """What PromptExecutor needs of ComfyUI's PromptServer; it records the messages sent to the UI."""

    client_id: str | None = None
    last_node_id: str | None = None
    last_prompt_id: str | None = None
    sockets_metadata: dict = field(default_factory=dict)
    messages: list[tuple[str, Any]] = field(default_factory=list)

    def send_sync(self, event, data, sid=None):
        self.messages.append((event, data))

    def send_progress_text(self, text, node_id, sid=None):
        """What nodes call as PromptServer.instance to show text on themselves (e.g. Get Image Size)."""
        self.messages.append(("progress_text", {"node": node_id, "text": text}))

    def queue_updated(self):
        pass


@dataclass
class GraphRun:
    """The result of one executed graph."""

    prompt_id: str
    success: bool
    ui_outputs: dict[str, Any]
    status_messages: list[tuple[str, dict]]
    node_errors: dict[str, Any]
    validation_error: dict | None
    runtime: "ComfyRuntime"

    @property
    def error(self) -> dict | None:
        """The execution_error message (node_id, node_type, exception_message, ...) if execution failed."""
        for event, data in self.status_messages:
            if event in ("execution_error", "execution_interrupted"):
                return {"event": event, **data}
        return None

    def output(self, node_id: str) -> list:
        """The Python values a node returned (from the executor's output cache)."""
        cached = self.runtime.executor.caches.outputs.get(str(node_id))
        if inspect.isawaitable(cached):  # ComfyUI 0.33's caches are async
            cached = asyncio.run(cached)
        if cached is None:
            raise KeyError(f"node {node_id} has no cached output")
        values = cached.outputs if hasattr(cached, "outputs") else cached
        return [v[0] if isinstance(v, list) and len(v) == 1 else v for v in values]


def executor_cache_args(execution) -> dict:
    """The `cache_args` this ComfyUI's PromptExecutor reads (main.py's prompt_worker passes them): "lru" and "ram"
    in 0.3.75; 0.33 also reads "ram_inactive" (the RAM-pressure cache's headroom for inactive outputs) and fails
    with KeyError without it. Zeros: with the CLASSIC cache none of them limits anything."""
    args = {"lru": 0, "ram": 0}
    if "ram_inactive" in inspect.getsource(execution.PromptExecutor):
        args["ram_inactive"] = 0
    return args


class ComfyRuntime:
    _instance: "ComfyRuntime | None" = None

    def __init__(self, base: Path):
        self.base = base
        self.comfy_dir = comfyui_dir()
        # ComfyUI's own modules (nodes, utils, server, execution) must win over same-named ones elsewhere on
        # sys.path — this repository has a `nodes/` package of its own.
        sys.path.insert(0, str(self.comfy_dir))
        sys.argv = ["main.py", *comfy_flags(base)]
        import comfy.options

        comfy.options.enable_args_parsing()
        import comfy.cli_args  # noqa: F401  (parses sys.argv)
        import utils.extra_config  # noqa: F401  must precede `import nodes` (see TESTING.md)
        import folder_paths
        import nodes
        import execution
        import comfy.utils
        import comfy.model_management

        folder_paths.add_model_folder_path("loras", str(base / "models" / "loras"))
        self.folder_paths = folder_paths
        self.nodes = nodes
        self.execution = execution
        self.server = RecordingServer()
        import server

        server.PromptServer.instance = self.server  # nodes reach the UI through it; no HTTP server runs here
        self.interrupt_at_progress: int | None = None
        comfy.utils.set_progress_bar_global_hook(self._progress_hook)
        self.import_errors = asyncio.run(self._init_nodes())
        self.executor = execution.PromptExecutor(
            self.server, cache_type=execution.CacheType.CLASSIC, cache_args=executor_cache_args(execution)
        )
        self._ids = itertools.count()

    async def _init_nodes(self):
        return await self.nodes.init_extra_nodes(init_custom_nodes=True, init_api_nodes=False)

    def _progress_hook(self, value, total, preview_image, prompt_id=None, node_id=None):
        import comfy.model_management

        # ComfyUI's own hook raises here on an interrupt request; keep that behaviour.
        comfy.model_management.throw_exception_if_processing_interrupted()
        self.server.send_sync("progress", {"value": value, "max": total, "node": node_id})
        if self.interrupt_at_progress is not None and value >= self.interrupt_at_progress:
            # What the UI's Cancel button does: POST /interrupt sets this flag.
            self.interrupt_at_progress = None
            self.nodes.interrupt_processing(True)

    @classmethod
    def boot(cls, base: Path) -> "ComfyRuntime":
        if cls._instance is None:
            cls._instance = cls(base)
        elif cls._instance.base != base:
            raise RuntimeError("ComfyUI is already booted in this process with another base directory")
        return cls._instance

    def run(self, graph: dict[str, dict], client_id: str | None = None,
            interrupt_at_progress: int | None = None) -> GraphRun:
        """Validate and execute an API-format graph the way ComfyUI's prompt worker does.

        `interrupt_at_progress`: press Cancel (ComfyUI's interrupt flag) when a node first reports that progress
        value; the request belongs to this run only and never carries over to the next one.

        With a `client_id` (what the web UI sends), ComfyUI also reports every node it executes ('executing'
        messages in `self.server.messages`); nodes answered from its cache are not among them.
        The graph is copied first, as the server parses a fresh one per request: ComfyUI writes the
        `fingerprint_inputs` results into the graph it runs, and a reused dict would keep them stale."""
        graph = copy.deepcopy(graph)
        prompt_id = f"test-{next(self._ids)}-{uuid.uuid4().hex[:6]}"
        self.server.messages.clear()
        valid, error, outputs, node_errors = asyncio.run(self.execution.validate_prompt(prompt_id, graph, None))
        if not valid:
            return GraphRun(prompt_id, False, {}, [], node_errors, error, self)
        self.server.last_prompt_id = prompt_id
        self.interrupt_at_progress = interrupt_at_progress
        try:
            self.executor.execute(graph, prompt_id, {"client_id": client_id} if client_id else {}, outputs)
        finally:
            self.interrupt_at_progress = None
            self.nodes.interrupt_processing(False)
        return GraphRun(
            prompt_id,
            self.executor.success,
            self.executor.history_result.get("outputs", {}),
            list(self.executor.status_messages),
            node_errors,
            None,
            self,
        )

    def node_class(self, class_type: str):
        return self.nodes.NODE_CLASS_MAPPINGS[class_type]

    def object_info(self, class_type: str) -> dict:
        """The node's /object_info entry, computed as the server computes it."""
        cls = self.node_class(class_type)
        if hasattr(cls, "GET_NODE_INFO_V1"):
            return cls.GET_NODE_INFO_V1()
        inputs = cls.INPUT_TYPES()
        return {"input": inputs, "input_order": {k: list(v) for k, v in inputs.items()}}
