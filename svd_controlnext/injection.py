"""Add control features into diffusers' `UNetSpatioTemporalConditionModel` without copying its forward.

A diffusers hook (`ModelHook` in the block's `HookRegistry`, the system DeepCache uses too), attached by
`apply_control(unet, ControlConfig(...))` at the site the encoder's config names:
- `down_blocks.0`: after the first down block, its main-path output becomes
  `hidden + cross_normalize(control, hidden) * strength * scale`, out of place, so the skip tensor that
  block saved (the same object) stays untouched: the published ControlNeXt-SVD-v2 layout
  (`models/unet_spatio_temporal_condition_controlnext.py`, where `conditional_controls` is added to `sample`
  after the first down block).
- `mid_block`: the same, before the mid block, on its `hidden_states` input.

Under classifier-free guidance the UNet batch is [uncond, cond]; control features given for the
conditional frames only are added to the second half, the unconditional half is left as it is
(what the published code gets by zeroing half of a doubled encoder batch, at half the work).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from diffusers.hooks import HookRegistry, ModelHook

from .cross_norm import cross_normalize
from .encoder import INJECTION_SITES

CONTROL_HOOK = "svd_controlnext_control"


@dataclass(frozen=True)
class ControlConfig:
    """Where the control enters the UNet and its fixed factor (the published weights expect 0.2 at `down_blocks.0`)."""

    site: str = "down_blocks.0"
    strength: float = 0.2

    def __post_init__(self):
        if self.site not in INJECTION_SITES:
            raise ValueError(f"unknown injection site {self.site!r}; choose one of {INJECTION_SITES}")


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


def site_module(unet, site: str) -> torch.nn.Module:
    return unet.down_blocks[0] if site == "down_blocks.0" else unet.mid_block


class ControlInjector:
    """The control hook of one UNet and its state: `set()` gives it the features for the next UNet call(s).

    The hook stays registered between calls (inactive when cleared), so a `torch.compile`d UNet is not traced
    again for every step or video. `ControlInjector(unet, site, strength)` registers it; `apply_control` also
    returns the one already there.
    """

    def __init__(self, unet, site: str = "down_blocks.0", strength: float = 0.2):
        self.config = ControlConfig(site, strength)
        self.control = None
        self.scale = 0.0
        self._module = site_module(unet, site)
        hook = _AfterBlock(self) if site == "down_blocks.0" else _BeforeBlock(self)
        HookRegistry.check_if_exists_or_initialize(self._module).register_hook(hook, CONTROL_HOOK)

    @property
    def site(self) -> str:
        return self.config.site

    @property
    def active(self) -> bool:
        return self.control is not None and self.scale != 0.0

    def set(self, control: torch.Tensor | None, scale: float = 1.0) -> None:
        self.control, self.scale = control, float(scale)

    def clear(self) -> None:
        self.set(None, 0.0)

    def remove(self) -> None:
        """Take this hook off its block (a hook registered there since by another injector stays)."""
        self.clear()
        registry = HookRegistry.check_if_exists_or_initialize(self._module)
        hook = registry.get_hook(CONTROL_HOOK)
        if hook is not None and hook.injector is self:
            registry.remove_hook(CONTROL_HOOK, recurse=False)

    def add_to(self, sample: torch.Tensor) -> torch.Tensor:
        return add_control(sample, self.control, self.config.strength * self.scale)


def find_control(unet, site: str) -> ControlInjector | None:
    """The control hook registered at `site`, if any."""
    hook = HookRegistry.check_if_exists_or_initialize(site_module(unet, site)).get_hook(CONTROL_HOOK)
    return None if hook is None else hook.injector


def apply_control(unet, config: ControlConfig) -> ControlInjector:
    """The UNet's control hook at `config.site`: the one already registered there (by a training loop, say), or
    a new one. One hook per model, as in diffusers' `apply_…` functions."""
    injector = find_control(unet, config.site)
    if injector is None:
        return ControlInjector(unet, config.site, config.strength)
    if injector.config != config:
        raise ValueError(f"the UNet already has a control hook with {injector.config}, not {config}")
    return injector


class _ControlHook(ModelHook):
    def __init__(self, injector: ControlInjector):
        super().__init__()
        self.injector = injector


class _AfterBlock(_ControlHook):
    """`down_blocks.0`: the control added to the main-path output; the skips are returned as they are."""

    def post_forward(self, module, output):
        if not self.injector.active:
            return output
        hidden, skips = output
        return self.injector.add_to(hidden), skips


class _BeforeBlock(_ControlHook):
    """`mid_block`: the control added to the `hidden_states` input (the UNet passes it by keyword)."""

    def pre_forward(self, module, *args, **kwargs):
        if self.injector.active:
            kwargs = {**kwargs, "hidden_states": self.injector.add_to(kwargs["hidden_states"])}
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
