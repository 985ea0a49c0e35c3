"""The torch device a run asks for: checked when the run is set up, named in one line when it cannot be used.

Without this a typo or a missing accelerator surfaces deep inside torch (`Torch not compiled with CUDA enabled`, a
RuntimeError for `banana`, "at most 0 frames fit" for `mps` on Linux).
"""

from __future__ import annotations

import torch

from .errors import InputError


def default_device() -> str:
    """cuda when torch sees a GPU, else cpu."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def available_devices() -> list[str]:
    """The devices this machine's torch can run on, as `--device` spells them."""
    devices = ["cpu"]
    if torch.cuda.is_available():
        devices += ["cuda"] + [f"cuda:{index}" for index in range(torch.cuda.device_count())]
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        devices.append("mps")
    if hasattr(torch, "xpu") and torch.xpu.is_available():
        devices += ["xpu"] + [f"xpu:{index}" for index in range(torch.xpu.device_count())]
    return devices


def check_device(name: str | None) -> str:
    """`name` (None: the default device) when this machine can use it; else one line naming the devices it has."""
    if name is None:
        return default_device()
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError, TypeError):
        device = None
    available = available_devices()
    if device is not None and (device.type == "cpu" or str(device) in available):
        return name
    have = ", ".join(available)
    if device is None:
        raise InputError(f"--device {name}: not a device name (this machine has: {have})")
    raise InputError(f"--device {name}: not available on this machine (it has: {have})")
