"""Stand-in for ComfyUI's `folder_paths.py` (Comfy-Org/ComfyUI 0.38.1, commit 1df2885): the names our nodes and
the core-node stand-ins use, with the real signatures and behaviour (a KeyError for an unknown folder name; a new
name made by `add_model_folder_path` with no extensions). ComfyUI sets `base_path` to its folder; tests call
`use_base_path` (not in ComfyUI) to put it in a temporary one."""

from __future__ import annotations

import os

supported_pt_extensions: set[str] = {".ckpt", ".pt", ".pt2", ".bin", ".pth", ".safetensors", ".pkl", ".sft"}
folder_names_and_paths: dict[str, tuple[list[str], set[str]]] = {}
base_path = models_dir = output_directory = temp_directory = input_directory = ""


def use_base_path(path: str) -> None:
    """Test only: ComfyUI's folders under `path`, as ComfyUI lays them out under its own."""
    global base_path, models_dir, output_directory, temp_directory, input_directory
    base_path = str(path)
    models_dir = os.path.join(base_path, "models")
    output_directory, temp_directory, input_directory = (os.path.join(base_path, name)
                                                         for name in ("output", "temp", "input"))
    folder_names_and_paths.clear()
    folder_names_and_paths["checkpoints"] = ([os.path.join(models_dir, "checkpoints")], supported_pt_extensions)
    folder_names_and_paths["diffusers"] = ([os.path.join(models_dir, "diffusers")], ["folder"])
    folder_names_and_paths["custom_nodes"] = ([os.path.join(base_path, "custom_nodes")], set())


def map_legacy(folder_name: str) -> str:
    return {"unet": "diffusion_models", "clip": "text_encoders"}.get(folder_name, folder_name)


def get_output_directory() -> str:
    return output_directory


def get_temp_directory() -> str:
    return temp_directory


def get_input_directory() -> str:
    return input_directory


def get_annotated_filepath(name: str, default_dir: str | None = None) -> str:
    return os.path.join(default_dir or get_input_directory(), name)


def add_model_folder_path(folder_name: str, full_folder_path: str, is_default: bool = False) -> None:
    folder_name = map_legacy(folder_name)
    if folder_name not in folder_names_and_paths:
        folder_names_and_paths[folder_name] = ([full_folder_path], set())
        return
    paths = folder_names_and_paths[folder_name][0]
    if full_folder_path in paths:
        if is_default:
            paths.remove(full_folder_path)
            paths.insert(0, full_folder_path)
    elif is_default:
        paths.insert(0, full_folder_path)
    else:
        paths.append(full_folder_path)


def get_folder_paths(folder_name: str) -> list[str]:
    return folder_names_and_paths[map_legacy(folder_name)][0][:]
