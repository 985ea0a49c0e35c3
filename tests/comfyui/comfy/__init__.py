"""Stand-in for ComfyUI's `comfy` package: the two modules the nodes use (`model_management`, `utils`)."""
