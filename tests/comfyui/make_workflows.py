"""Writes the example workflows (`example_workflows/*.json`, ComfyUI's UI format 0.4) from the nodes' own
declarations, so their inputs, outputs and widget values are the classes'. Run after changing a node's inputs:
`python tests/comfyui/make_workflows.py`; the tests run the files written."""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
OUT = ROOT / "example_workflows"

# (id, type, position, widget values over the defaults)
SOURCES = [
    (1, "LoadImage", (40, 40), {"image": "reference.png"}),
    (2, "LoadVideo", (40, 420), {"file": "driving.mp4"}),
    (3, "GetVideoComponents", (360, 420), {}),
    (4, "SVDAnimateLoad", (360, 40), {}),
]
SAVE = {"filename_prefix": "svd-animate/animation", "format": "mp4", "codec": "auto"}

WORKFLOWS = {
    "animate.json": (
        [*SOURCES, (5, "SVDAnimate", (720, 40), {}), (6, "CreateVideo", (1100, 40), {}),
         (7, "SaveVideo", (1400, 40), SAVE)],
        [(4, "model", 5, "model"), (1, "IMAGE", 5, "reference"), (2, "VIDEO", 3, "video"),
         (3, "images", 5, "driving"), (3, "fps", 5, "frame_rate"), (5, "frames", 6, "images"),
         (5, "fps", 6, "fps"), (6, "VIDEO", 7, "video")]),
    "poses.json": (
        [*SOURCES, (5, "SVDAnimatePoses", (720, 40), {}), (6, "CreateVideo", (1100, 40), {}),
         (7, "SaveVideo", (1400, 40), {**SAVE, "filename_prefix": "svd-animate/poses"})],
        [(4, "model", 5, "model"), (1, "IMAGE", 5, "reference"), (2, "VIDEO", 3, "video"),
         (3, "images", 5, "driving"), (3, "fps", 5, "frame_rate"), (5, "skeletons", 6, "images"),
         (5, "fps", 6, "fps"), (6, "VIDEO", 7, "video")]),
    "fast.json": (
        [*SOURCES, (5, "SVDAnimatePoses", (720, 40), {}), (6, "SVDAnimateSample", (1040, 40), {"fast": True}),
         (7, "SVDAnimateDecode", (1360, 40), {}), (8, "CreateVideo", (1660, 40), {}),
         (9, "SaveVideo", (1960, 40), {**SAVE, "filename_prefix": "svd-animate/fast"})],
        [(4, "model", 5, "model"), (1, "IMAGE", 5, "reference"), (2, "VIDEO", 3, "video"),
         (3, "images", 5, "driving"), (3, "fps", 5, "frame_rate"), (4, "model", 6, "model"),
         (5, "poses", 6, "poses"), (4, "model", 7, "model"), (6, "LATENT", 7, "latent"), (7, "frames", 8, "images"),
         (5, "fps", 8, "fps"), (8, "VIDEO", 9, "video")]),
}


def workflow(mappings: dict, nodes: list, links: list) -> dict:
    from runner import declared_inputs, input_type, is_widget, output_names, widget_default

    by_id = {node_id: mappings[kind] for node_id, kind, _, _ in nodes}
    link_rows = []
    for link_id, (origin, output, target, name) in enumerate(links, 1):
        slot = list(output_names(by_id[origin])).index(output)
        link_rows.append([link_id, origin, slot, target, name, by_id[origin].RETURN_TYPES[slot]])
    documents = []
    for order, (node_id, kind, position, widgets) in enumerate(nodes):
        cls, inputs, values = by_id[node_id], [], []
        for name, spec in declared_inputs(cls).items():
            link = next((row for row in link_rows if row[3] == node_id and row[4] == name), None)
            if is_widget(spec):
                values.append(widgets.get(name, widget_default(spec)))
                if len(spec) > 1 and spec[1].get("control_after_generate"):
                    values.append("fixed")
                if link is not None:
                    inputs.append({"name": name, "type": input_type(spec), "widget": {"name": name}, "link": link[0]})
            else:
                inputs.append({"name": name, "type": input_type(spec), "link": link[0] if link else None})
        for row in link_rows:
            if row[3] == node_id and isinstance(row[4], str):
                row[4] = next(index for index, entry in enumerate(inputs) if entry["name"] == row[4])
        outputs = [{"name": name, "type": kind_, "slot_index": slot,
                    "links": [row[0] for row in link_rows if row[1] == node_id and row[2] == slot] or None}
                   for slot, (name, kind_) in enumerate(zip(output_names(cls), cls.RETURN_TYPES))]
        documents.append({"id": node_id, "type": kind, "pos": list(position), "size": [300, 120 + 24 * len(values)],
                          "flags": {}, "order": order, "mode": 0, "inputs": inputs, "outputs": outputs,
                          "properties": {"Node name for S&R": kind}, "widgets_values": values})
    return {"last_node_id": max(by_id), "last_link_id": len(link_rows), "nodes": documents, "links": link_rows,
            "groups": [], "config": {}, "extra": {}, "version": 0.4}


def main() -> None:
    sys.path[:0] = [str(HERE), str(ROOT)]
    import folder_paths

    with tempfile.TemporaryDirectory() as base:
        folder_paths.use_base_path(base)
        for name in ("input", "temp", "output"):
            Path(base, name).mkdir()
        Path(base, "input", "reference.png").touch()
        Path(base, "input", "driving.mp4").touch()
        import core_nodes
        from svd_animate.comfy.nodes import NODE_CLASS_MAPPINGS

        mappings = {**core_nodes.NODE_CLASS_MAPPINGS, **NODE_CLASS_MAPPINGS}
        OUT.mkdir(exist_ok=True)
        for name, (nodes, links) in WORKFLOWS.items():
            (OUT / name).write_text(json.dumps(workflow(mappings, nodes, links), indent=1) + "\n")
            print(OUT / name)


if __name__ == "__main__":
    main()
