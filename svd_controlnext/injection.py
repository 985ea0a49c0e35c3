"""Add control features into diffusers' `UNetSpatioTemporalConditionModel` without copying its forward.

Sites (the encoder's config says which):
- `down_blocks.0`: a forward hook on the first down block replaces its main-path output with
  `hidden + cross_normalize(control, hidden) * strength * scale`, out of place, so the skip tensor that
  block saved (the same object) stays untouched: the published ControlNeXt-SVD-v2 layout.
- `mid_block`: a keyword pre-hook does the same to the mid block's input.

Under classifier-free guidance the UNet batch is [uncond, cond]; control features given for the
conditional frames only are added to the second half, the unconditional half is left as it is
(what the published code gets by zeroing half of a doubled encoder batch, at half the work).
"""

from __future__ import annotations

import contextlib

import torch

from .cross_norm import cross_normalize
from .encoder import INJECTION_SITES


def add_control(sample: torch.Tensor, control: torch.Tensor, factor: float) -> torch.Tensor:
    """`sample` plus the cross-normalised control, on all rows or on the conditional (second) half."""
    rows, control_rows = sample.shape[0], control.shape[0]
    control = control.to(device=sample.device, dtype=sample.dtype)
    if rows == control_rows:
        return sample + cross_normalize(control, sample) * factor
    if rows == 2 * control_rows:
        uncond, cond = sample[:control_rows], sample[control_rows:]
        return torch.cat([uncond, cond + cross_normalize(control, cond) * factor])
    raise ValueError(f"control features for {control_rows} frames do not fit a UNet batch of {rows} frames")


class ControlInjector:
    """A hook registered once; `set()` gives it the features for the next UNet call(s).

    Registering once (rather than per step) keeps `torch.compile`d UNets from re-tracing every step.
    """

    def __init__(self, unet, site: str = "down_blocks.0", strength: float = 0.2):
        if site not in INJECTION_SITES:
            raise ValueError(f"unknown injection site {site!r}; choose one of {INJECTION_SITES}")
        self.site = site
        self.strength = strength
        self.control = None
        self.scale = 0.0
        if site == "down_blocks.0":
            self._handle = unet.down_blocks[0].register_forward_hook(self._after_down_block)
        else:
            self._handle = unet.mid_block.register_forward_pre_hook(self._before_mid_block, with_kwargs=True)

    def set(self, control: torch.Tensor | None, scale: float = 1.0) -> None:
        self.control, self.scale = control, float(scale)

    def clear(self) -> None:
        self.set(None, 0.0)

    def remove(self) -> None:
        self.clear()
        self._handle.remove()

    @property
    def active(self) -> bool:
        return self.control is not None and self.scale != 0.0

    def _after_down_block(self, module, args, output):
        if not self.active:
            return None
        hidden, skips = output
        return add_control(hidden, self.control, self.strength * self.scale), skips

    def _before_mid_block(self, module, args, kwargs):
        if not self.active:
            return None
        kwargs = dict(kwargs)
        kwargs["hidden_states"] = add_control(kwargs["hidden_states"], self.control, self.strength * self.scale)
        return args, kwargs


@contextlib.contextmanager
def inject_control(unet, control: torch.Tensor, scale: float = 1.0, site: str = "down_blocks.0",
                   strength: float = 0.2):
    """`with inject_control(unet, features, scale=...): unet(...)` adds the control for the calls inside."""
    injector = ControlInjector(unet, site, strength)
    injector.set(control, scale)
    try:
        yield injector
    finally:
        injector.remove()
