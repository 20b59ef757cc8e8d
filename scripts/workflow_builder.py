"""Renders a short description of a workflow (groups of nodes, their widget values and links) as the UI-format
JSON the web UI itself saves: widget order, socket types and output names come from the real node classes, one
MarkdownNote per group explains it, and groups are laid out in columns so nothing overlaps on the canvas."""
from __future__ import annotations

import uuid
from dataclasses import dataclass, field

from devkit.ui_workflow import has_control_widget, is_widget

# Wide enough for the longest node title ("Teacher Context: Reference Image (D-OPSD, FLUX.2-klein)"): the web UI
# widens a node to its title, which would push it out of its group.
NODE_WIDTH, COLUMN_GAP, NODE_GAP, GROUP_GAP = 440, 60, 40, 80
TITLE_HEIGHT, SLOT_HEIGHT, WIDGET_HEIGHT, NOTE_HEIGHT = 40, 22, 26, 220
MULTILINE_ROWS = 4  # a multiline text box is drawn about four widget rows tall
IMAGE_UPLOAD_HEIGHT = 240  # Load Image's upload button and image preview
GROUP_PADDING, GROUP_TITLE = 20, 50
MUTED = 2


@dataclass
class Node:
    key: str
    type: str
    widgets: dict = field(default_factory=dict)
    links: dict[str, tuple[str, int]] = field(default_factory=dict)
    title: str | None = None
    mode: int = 0


@dataclass
class Group:
    title: str
    note: str
    nodes: list[Node]
    column: int
    order_in_column: int = 0  # groups sharing a column are stacked top to bottom in this order


@dataclass
class Workflow:
    file: str
    groups: list[Group]


def widget_values(node: Node, classes) -> list:
    """Every widget's value in order; a widget fed by a link keeps its value and slot, as the web UI saves it."""
    input_types = classes[node.type].INPUT_TYPES()
    values = []
    for section in ("required", "optional"):
        for name, (input_type, *rest) in input_types.get(section, {}).items():
            options = rest[0] if rest else {}
            if not is_widget(input_type):
                continue
            values.append(node.widgets[name] if name in node.widgets else options.get("default"))
            if has_control_widget(name, input_type, options):
                values.append("fixed")
    unknown = set(node.widgets) - {n for s in input_types.values() for n in s}
    if unknown:
        raise ValueError(f"{node.key}: {node.type} has no inputs {sorted(unknown)}")
    return values


def widgets_height(node: Node, classes, values: list) -> int:
    """The height the canvas draws the node's widget `values` at: one row each, more for text boxes and image
    uploads."""
    input_types = classes[node.type].INPUT_TYPES()
    options = [rest[0] for section in ("required", "optional") for name, (_, *rest) in input_types.get(section, {}).items()
               if name not in node.links and rest]
    multiline = sum(1 for o in options if o.get("multiline"))
    uploads = sum(1 for o in options if o.get("image_upload"))
    return (WIDGET_HEIGHT * (len(values) + (MULTILINE_ROWS - 1) * multiline)
            + IMAGE_UPLOAD_HEIGHT * uploads)


def socket_types(node_type: str, classes) -> dict[str, str]:
    input_types = classes[node_type].INPUT_TYPES()
    return {name: spec[0] for section in ("required", "optional") for name, spec in input_types.get(section, {}).items()}


def build(workflow: Workflow, classes) -> dict:
    all_nodes = [n for g in workflow.groups for n in g.nodes]
    ids = {n.key: i for i, n in enumerate(all_nodes, start=1)}
    links = []  # [id, from_node, from_slot, to_node, to_slot, type], as the UI saves them
    for node in all_nodes:
        types = socket_types(node.type, classes)
        for slot, (name, (source, source_slot)) in enumerate(node.links.items()):
            links.append([len(links) + 1, ids[source], source_slot, ids[node.key], slot, types[name]])
    nodes, groups = [], []
    column_bottoms: dict[int, float] = {}
    for group in sorted(workflow.groups, key=lambda g: g.order_in_column):
        x = group.column * (NODE_WIDTH + 2 * GROUP_PADDING + COLUMN_GAP)
        top = column_bottoms[group.column] + GROUP_GAP if group.column in column_bottoms else 0.0
        y = top + GROUP_TITLE
        nodes.append({"id": len(all_nodes) + len(groups) + 1, "type": "MarkdownNote", "pos": [x + GROUP_PADDING, y],
                      "size": [NODE_WIDTH, NOTE_HEIGHT], "flags": {}, "order": 0, "mode": 0, "inputs": [],
                      "outputs": [], "properties": {}, "widgets_values": [group.note],
                      "color": "#432", "bgcolor": "#653"})
        y += NOTE_HEIGHT + NODE_GAP
        for node in group.nodes:
            cls = classes[node.type]
            values = widget_values(node, classes)
            node_id = ids[node.key]
            node_inputs = [{"name": list(node.links)[link[4]], "type": link[5], "link": link[0]}
                           for link in links if link[3] == node_id]
            for socket in node_inputs:
                if is_widget(socket["type"]):
                    socket["widget"] = {"name": socket["name"]}
            output_names = getattr(cls, "RETURN_NAMES", None) or cls.RETURN_TYPES
            node_outputs = [{"name": output_names[i], "type": t, "slot_index": i,
                             "links": [l[0] for l in links if l[1] == node_id and l[2] == i]}
                            for i, t in enumerate(cls.RETURN_TYPES)]
            # As LiteGraph sizes a node: input and output sockets side by side, then one row per widget.
            height = TITLE_HEIGHT + SLOT_HEIGHT * max(len(node_inputs), len(node_outputs)) + widgets_height(node, classes, values)
            entry = {"id": node_id, "type": node.type, "pos": [x + GROUP_PADDING, y], "size": [NODE_WIDTH, height],
                     "flags": {}, "order": node_id, "mode": node.mode, "inputs": node_inputs, "outputs": node_outputs,
                     "properties": {"Node name for S&R": node.type}, "widgets_values": values}
            if node.title:
                entry["title"] = node.title
            nodes.append(entry)
            y += height + NODE_GAP
        column_bottoms[group.column] = y
        groups.append({"id": len(groups) + 1, "title": group.title,
                       "bounding": [x, top, NODE_WIDTH + 2 * GROUP_PADDING, y - top],
                       "color": "#3f789e", "font_size": 22, "flags": {}})
    # The web UI validates workflows and warns unless "id" is a UUID; a name-based one keeps the files reproducible.
    workflow_id = str(uuid.uuid5(uuid.NAMESPACE_URL, "comfyui-dopsd/workflows/" + workflow.file))
    return {"id": workflow_id, "revision": 0, "last_node_id": len(nodes),
            "last_link_id": len(links), "nodes": nodes, "links": links, "groups": groups, "config": {},
            "extra": {"ds": {"scale": 0.6, "offset": [40, 40]}}, "version": 0.4}
