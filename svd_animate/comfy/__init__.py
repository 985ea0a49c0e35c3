"""svd-animate in ComfyUI: the nodes (`nodes.py`, imported by ComfyUI only: they need its `folder_paths` and `comfy`
modules), their inputs made from the option definitions (`inputs.py`), `IMAGE` batches to and from files
(`frames.py`), and `svd-animate comfyui`, which adds the nodes to a ComfyUI folder (`install.py`).

ComfyUI reaches the nodes through the repository's `__init__.py` (a clone in `custom_nodes`, or the registry's copy)
or through the folder `svd-animate comfyui` writes there."""
