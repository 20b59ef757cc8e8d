"""UI-format workflows (what users open, share and the template browser lists) <-> API-format graphs.

POST /prompt takes the API format; the web UI converts on Queue. Headless runs do the same conversion here:
widget values map, in order, onto a node's widget inputs as /object_info lists them; a widget with
`control_after_generate` (seeds) occupies one extra slot (the "fixed/randomize" choice); the web UI also gives one
to an INT input named `seed` or `noise_seed` that does not say `control_after_generate` either way. Frontend-only nodes
(notes) and muted or bypassed nodes are left out, as the UI does. Widgets the file has no value for (inputs a newer
ComfyUI added to a stock node, e.g. ImageScaleToTotalPixels.resolution_steps in 0.33) take their default, as the UI
gives a node it configures from an older file.
"""
from __future__ import annotations

from typing import Any, Callable

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
FRONTEND_ONLY = {"Note", "MarkdownNote", "PrimitiveNode", "Reroute"}
MODE_ALWAYS = 0

InputSpec = list[tuple[str, Any, dict]]  # (name, type, options), in /object_info order


SEED_NAMES = ("seed", "noise_seed")


def is_widget(input_type) -> bool:
    return isinstance(input_type, list) or input_type in WIDGET_TYPES


def has_control_widget(name: str, input_type, options: dict) -> bool:
    """Whether the web UI adds a 'control after generate' widget after this one. The frontend's rule (1.32.9,
    useIntWidget): `spec.control_after_generate ?? ["seed", "noise_seed"].includes(spec.name)` for INT inputs."""
    if "control_after_generate" in options:
        return bool(options["control_after_generate"])
    return input_type == "INT" and name in SEED_NAMES


def input_spec_from_object_info(info: dict) -> InputSpec:
    """One node's entry of /object_info -> its inputs in order."""
    spec = []
    for section in ("required", "optional"):
        inputs = info["input"].get(section, {})
        for name in info.get("input_order", {}).get(section, list(inputs)):
            input_type, *rest = inputs[name]
            spec.append((name, input_type, rest[0] if rest else {}))
    return spec


def widget_default(input_type, options: dict):
    """The value the web UI gives a new widget: the input's default, else a combo's first option."""
    if "default" in options:
        return options["default"]
    if isinstance(input_type, list) and input_type:
        return input_type[0]
    if input_type == "COMBO" and options.get("options"):
        return options["options"][0]
    return None


def to_api(workflow: dict, input_spec: Callable[[str], InputSpec]) -> dict[str, dict]:
    """Convert a UI-format workflow into the API-format graph the web UI would queue."""
    links = {link[0]: link for link in workflow.get("links", [])}
    graph = {}
    for node in workflow["nodes"]:
        if node["type"] in FRONTEND_ONLY or node.get("mode", MODE_ALWAYS) != MODE_ALWAYS:
            continue
        linked = {i["name"]: links[i["link"]] for i in node.get("inputs", []) if i.get("link") is not None}
        values = list(node.get("widgets_values", []))
        inputs = {}
        for name, input_type, options in input_spec(node["type"]):
            if name in linked:
                _, from_node, from_slot, *_ = linked[name]
                inputs[name] = [str(from_node), from_slot]
                if is_widget(input_type) and values:
                    values.pop(0)  # a widget turned into a socket keeps its slot
                    if has_control_widget(name, input_type, options) and values:
                        values.pop(0)
            elif is_widget(input_type):
                if not values:
                    default = widget_default(input_type, options)
                    if default is not None:
                        inputs[name] = default
                    continue
                inputs[name] = values.pop(0)
                if has_control_widget(name, input_type, options) and values:
                    values.pop(0)
        graph[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return graph
