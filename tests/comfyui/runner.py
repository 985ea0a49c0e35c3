"""A workflow runner that follows ComfyUI's contract (Comfy-Org/ComfyUI 0.38.1), for tests without ComfyUI:

- `load_custom_node`: a pack folder imported as `nodes.load_custom_node` does (its `__init__.py` as a module named by
  its path, `.` as `_x_`; the folder not on `sys.path`), its `NODE_CLASS_MAPPINGS` read;
- `prompt_from_workflow`: a UI workflow (format 0.4: nodes, links) turned into the API prompt as the front end does
  (muted and bypassed nodes left out; widget values taken in `INPUT_TYPES` order, the extra value after a
  `control_after_generate` input skipped, a widget without a value kept at its default, values beyond the widgets
  ignored (an upload button's); a linked widget's link used), checking, more strictly than the front end, that each
  node's inputs and outputs are the ones its class declares (`INPUT_TYPES`, `RETURN_TYPES`, `RETURN_NAMES`) and each
  link's type is its origin's output type and its target's input type: the shipped workflows must match the nodes;
- `validate_prompt`: `execution.validate_inputs`'s checks: required inputs, links (any `[node, slot]`) and their
  types (`validate_node_input`: equal, `*`, or overlapping comma-separated unions), widget values coerced and checked
  against min, max and the combo's values, at least one output node;
- `execute`: the output nodes and what they need, each node's `FUNCTION` called with keyword arguments on a new
  instance under `torch.inference_mode()` (as `execution.execute_async`), its tuple (or `{"result": ...}`) kept per
  node, and reused by a later prompt for a node with the same inputs, as a ComfyUI server reuses its outputs.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import torch

WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")
MUTED, BYPASSED = 2, 4  # a node's `mode`: left out of the prompt


class WorkflowError(Exception):
    pass


def load_custom_node(folder: Path):
    name = str(folder).replace(".", "_x_")
    spec = importlib.util.spec_from_file_location(name, folder / "__init__.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def declared_inputs(cls) -> dict:
    types = cls.INPUT_TYPES()
    return {**types.get("required", {}), **types.get("optional", {})}


def input_type(spec) -> str:
    return "COMBO" if isinstance(spec[0], list) else spec[0]


def is_widget(spec) -> bool:
    return input_type(spec) in WIDGET_TYPES


def output_names(cls) -> tuple:
    return getattr(cls, "RETURN_NAMES", cls.RETURN_TYPES)


def prompt_from_workflow(workflow: dict, mappings: dict) -> dict:
    links = {link[0]: link for link in workflow["links"]}
    nodes = {node["id"]: node for node in workflow["nodes"]}
    prompt = {}
    for node in workflow["nodes"]:
        if node.get("mode", 0) in (MUTED, BYPASSED):
            continue
        cls = mappings.get(node["type"])
        if cls is None:
            raise WorkflowError(f"node {node['id']}: unknown type {node['type']}")
        declared = declared_inputs(cls)
        outputs = [(output["name"], output["type"]) for output in node.get("outputs", [])]
        if outputs != list(zip(output_names(cls), cls.RETURN_TYPES)):
            raise WorkflowError(f"node {node['id']} ({node['type']}): outputs {outputs} are not the class's")
        linked = {}
        for entry in node.get("inputs", []):
            spec = declared.get(entry["name"])
            if spec is None or input_type(spec) != entry["type"]:
                raise WorkflowError(f"node {node['id']} ({node['type']}): input {entry['name']} {entry['type']} is "
                                    "not declared so")
            if entry.get("link") is not None:
                link = links[entry["link"]]
                origin = mappings[nodes[link[1]]["type"]]
                if not link[5] == origin.RETURN_TYPES[link[2]] == entry["type"]:
                    raise WorkflowError(f"link {link[0]}: type {link[5]} is not {origin.RETURN_TYPES[link[2]]} -> "
                                        f"{entry['type']}")
                if (link[3], link[4]) != (node["id"], node.get("inputs").index(entry)):
                    raise WorkflowError(f"link {link[0]}: its target is not node {node['id']}'s {entry['name']}")
                linked[entry["name"]] = [str(link[1]), link[2]]
        missing = [name for name, spec in declared.items() if not is_widget(spec) and name not in linked
                   and name in cls.INPUT_TYPES().get("required", {})]
        if missing:
            raise WorkflowError(f"node {node['id']} ({node['type']}): {', '.join(missing)} not connected")
        values, widgets, missing = iter(node.get("widgets_values", [])), {}, object()
        for name, spec in declared.items():
            if is_widget(spec):
                value = next(values, missing)
                widgets[name] = widget_default(spec) if value is missing else value
                if len(spec) > 1 and spec[1].get("control_after_generate"):
                    next(values, None)
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": {**widgets, **linked}}
    return prompt


def widget_default(spec):
    options = spec[1] if len(spec) > 1 else {}
    return options.get("default", spec[0][0] if isinstance(spec[0], list) else None)


def validate_node_input(received_type: str, input_type: str) -> bool:
    if received_type == input_type or "*" in (received_type, input_type):
        return True
    return bool(set(received_type.split(",")) & set(input_type.split(",")))


def validate_prompt(prompt: dict, mappings: dict) -> None:
    if not any(getattr(mappings[node["class_type"]], "OUTPUT_NODE", False) for node in prompt.values()):
        raise WorkflowError("prompt_no_outputs")
    for node_id, node in prompt.items():
        cls = mappings[node["class_type"]]
        required = cls.INPUT_TYPES().get("required", {})
        for name, spec in declared_inputs(cls).items():
            value = node["inputs"].get(name)
            if value is None:
                if name in required:
                    raise WorkflowError(f"node {node_id}: required_input_missing {name}")
                continue
            if isinstance(value, list):
                if len(value) != 2:
                    raise WorkflowError(f"node {node_id}: bad_linked_input {name}")
                received = mappings[prompt[value[0]]["class_type"]].RETURN_TYPES[value[1]]
                if not validate_node_input(received, input_type(spec)):
                    raise WorkflowError(f"node {node_id}: return_type_mismatch {name}: {received} -> {spec[0]}")
                continue
            node["inputs"][name] = checked_widget(node_id, name, spec, value)


def checked_widget(node_id: str, name: str, spec, value):
    kind, options = input_type(spec), (spec[1] if len(spec) > 1 else {})
    if kind == "COMBO":
        if value not in spec[0]:
            raise WorkflowError(f"node {node_id}: value_not_in_list {name}: {value!r}")
        return value
    try:
        value = {"INT": int, "FLOAT": float, "STRING": str, "BOOLEAN": bool}[kind](value)
    except (TypeError, ValueError):
        raise WorkflowError(f"node {node_id}: invalid_input_type {name}: {value!r}") from None
    if "min" in options and value < options["min"]:
        raise WorkflowError(f"node {node_id}: value_smaller_than_min {name}: {value}")
    if "max" in options and value > options["max"]:
        raise WorkflowError(f"node {node_id}: value_bigger_than_max {name}: {value}")
    return value


def execute(prompt: dict, mappings: dict, cache: dict | None = None) -> dict:
    """Every output node and what it needs, run; the results by node id. `cache` (kept between prompts, as a
    ComfyUI server keeps its outputs) gives a node whose class and inputs, its linked nodes' included, are those of
    a node already run its outputs without running it again."""
    results, signatures = {}, {}
    cache = {} if cache is None else cache

    def signature(node_id: str):
        if node_id not in signatures:
            node = prompt[node_id]
            signatures[node_id] = (node["class_type"], tuple(sorted(
                (name, (signature(value[0]), value[1]) if isinstance(value, list) else repr(value))
                for name, value in node["inputs"].items())))
        return signatures[node_id]

    def run(node_id: str):
        if node_id not in results and signature(node_id) in cache:
            results[node_id] = cache[signature(node_id)]
        if node_id not in results:
            node = prompt[node_id]
            cls = mappings[node["class_type"]]
            inputs = {name: run(value[0])[value[1]] if isinstance(value, list) else value
                      for name, value in node["inputs"].items()}
            returned = getattr(cls(), cls.FUNCTION)(**inputs)
            results[node_id] = cache[signature(node_id)] = tuple(returned["result"] if isinstance(returned, dict)
                                                                 else returned)
        return results[node_id]

    with torch.inference_mode():
        for node_id, node in prompt.items():
            if getattr(mappings[node["class_type"]], "OUTPUT_NODE", False):
                run(node_id)
    return results


def run_workflow(workflow: dict, mappings: dict, widgets: dict | None = None, cache: dict | None = None) -> dict:
    """A UI workflow checked, turned into a prompt, its widget values changed where `widgets` says ({node type:
    {input: value}}), validated and executed (with `cache`, see `execute`)."""
    prompt = prompt_from_workflow(workflow, mappings)
    for node in prompt.values():
        node["inputs"].update((widgets or {}).get(node["class_type"], {}))
    validate_prompt(prompt, mappings)
    return execute(prompt, mappings, cache)
