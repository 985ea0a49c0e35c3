"""ComfyUI's entry to this repository cloned into `ComfyUI/custom_nodes/` (or installed there from the registry): the
nodes of `svd_animate/comfy/`. Anywhere else (pytest collecting the checkout, a tool walking it) it does nothing:
ComfyUI has imported `folder_paths` before it loads any custom node, and nothing else here does.

A clone is not installed, so its folder goes on `sys.path` for our packages, unless svd-animate is installed in
ComfyUI's Python already (that one is used)."""

import importlib.util
import sys
from pathlib import Path

if "folder_paths" in sys.modules:
    if importlib.util.find_spec("svd_animate") is None:
        sys.path.append(str(Path(__file__).resolve().parent))
    from svd_animate.comfy.nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS  # noqa: F401
