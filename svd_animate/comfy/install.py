"""`svd-animate comfyui COMFYUI_DIR`: the nodes of this installed svd-animate added to a ComfyUI folder, for a pip
user (a clone of the repository in `custom_nodes` needs nothing). ComfyUI loads custom nodes from the folders in
`custom_nodes` only (no Python entry points), so this writes `custom_nodes/svd-animate/`: an `__init__.py` that
imports the installed nodes, and the example workflows. Written whole or not at all; run again, it replaces its own
folder and refuses any other."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from svd_common.atomic import publish_folder
from svd_common.errors import InputError

FOLDER = "svd-animate"
MARKER = "written by `svd-animate comfyui`"
LOADER = '''"""svd-animate's ComfyUI nodes, from the svd-animate installed in ComfyUI's Python (written by `svd-animate comfyui`;
`pip install -U svd-animate` updates them, run `svd-animate comfyui` again for the example workflows)."""

from svd_animate.comfy.nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS  # noqa: F401
'''


def example_workflows() -> Path:
    """The example workflows: inside the package when installed (pyproject.toml maps them there), the repository's
    `example_workflows/` in a checkout."""
    installed = Path(__file__).resolve().parent / "example_workflows"
    return installed if installed.is_dir() else Path(__file__).resolve().parents[2] / "example_workflows"


def written_here(folder: Path) -> bool:
    loader = folder / "__init__.py"
    return loader.is_file() and MARKER in loader.read_text(errors="replace")


def install(comfyui) -> Path:
    comfyui = Path(comfyui)
    custom_nodes = comfyui / "custom_nodes"
    if not custom_nodes.is_dir():
        raise InputError(f"{comfyui}: no custom_nodes folder in it (give the ComfyUI folder, the one with main.py)")
    target = custom_nodes / FOLDER
    if target.exists() and not written_here(target):
        raise InputError(f"{target}: already there and not written by `svd-animate comfyui` (a clone of the "
                         "repository loads the nodes itself); remove it first to replace it")
    # Work names end in .disabled, which ComfyUI does not load, so an interrupted run leaves no second pack behind.
    work = Path(tempfile.mkdtemp(prefix=f".{FOLDER}.", suffix=".disabled", dir=custom_nodes))
    old = custom_nodes / f".{FOLDER}.old.disabled"
    try:
        (work / "__init__.py").write_text(LOADER)
        shutil.copytree(example_workflows(), work / "example_workflows",
                        ignore=shutil.ignore_patterns("__pycache__", "__init__.py"))
        shutil.rmtree(old, ignore_errors=True)
        if target.exists():
            target.rename(old)
        publish_folder(work, target)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target
