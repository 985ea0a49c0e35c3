"""DeepCache for the SVD UNet (Ma, Fang and Wang, CVPR 2024): on most steps recompute only the shallowest blocks and
reuse the deep features of the last full step, through diffusers' hooks (the UNet's forward is not copied).

The deep features change little between neighbouring steps. A full step runs every block and keeps the output of
the second-to-last up block; a cached step runs `conv_in`, `down_blocks[0]`, the last up block and `conv_out` on
that kept feature, while the blocks in between return placeholders without computing. The split is the one the
UNet's skip connections allow at block level: the last up block takes its skips from `conv_in` and `down_blocks[0]`,
which always run. On the full-size SVD-XT UNet a cached step costs about 31% of a full one (FLOPs).

None of diffusers' own cache hooks fits this UNet (FirstBlockCache, MagCache, TaylorSeer and FasterCache look for
transformer blocks; pyramid attention broadcast caches attention outputs only), so the hooks are ours, on
diffusers' `ModelHook` / `HookRegistry`.

The control enters at `down_blocks[0]`'s output (or the mid block's input), whose only consumer is a block skipped on
cached steps: there the control acts through the kept deep feature of the last full step only, so the pose
encoder need not run on cached steps.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers.hooks import HookRegistry, ModelHook

HOOK_NAME = "svd_animate_deep_cache"


@dataclass(frozen=True)
class DeepCacheConfig:
    """`interval`: the deep blocks run every `interval` steps (the first step of a call is always a full one)."""

    interval: int = 2

    def __post_init__(self):
        if self.interval < 1:
            raise ValueError(f"cache interval must be at least 1, got {self.interval}")


def reuses_feature(step: int, interval: int, kept_rows: int | None, rows: int) -> bool:
    """The cache policy: a call reuses the kept deep feature on a step that is not a full one, when a feature was
    kept for its window and covers its `rows` (batch x frames): a guided full step's feature serves an unguided step
    through its conditional half; the other way round needs a full step."""
    return step % interval != 0 and kept_rows in (rows, 2 * rows)


class DeepCache:
    """The state the hooks read: whether the next UNet call reuses a kept feature (`reuse`, and the feature itself,
    `current`), and the feature a full call kept (`latest`). Features are kept per window (windows hold different
    frames) by `prepare`, outside the UNet, so a compiled UNet sees only a flag and tensors: it is traced once per
    kind of call (full or cached, guided or not), never per window or step."""

    def __init__(self, config: DeepCacheConfig):
        self.start(config)

    def start(self, config: DeepCacheConfig) -> None:
        """A new sampling call: nothing kept yet."""
        self.config = config
        self.enabled = True
        self.features: dict[object, torch.Tensor] = {}
        self.reuse = False
        self.current: torch.Tensor | None = None
        self.latest: torch.Tensor | None = None
        self.key = None
        self.cached_steps = 0

    def prepare(self, key, step: int, rows: int) -> bool:
        """Before the UNet call for window `key` at `step` on a batch of `rows`: returns whether it is cached."""
        self._keep_latest()
        kept = self.features.get(key)
        self.key = key
        self.reuse = reuses_feature(step, self.config.interval, None if kept is None else kept.shape[0], rows)
        self.current = (kept if kept.shape[0] == rows else kept[rows:]) if self.reuse else None  # [uncond, cond]
        self.cached_steps += self.reuse
        return self.reuse

    def finish(self) -> None:
        """The call is over: the hooks pass through (and keep nothing) until the next `start`."""
        self.start(self.config)
        self.enabled = False

    def _keep_latest(self) -> None:
        if self.latest is not None:
            self.features[self.key] = self.latest
            self.latest = None


def apply_deep_cache(unet, config: DeepCacheConfig) -> DeepCache:
    """DeepCache's hooks on the UNet's blocks, registered once per UNet and kept (between calls they pass through):
    registering hooks replaces the blocks' forwards, which a compiled UNet would have to trace again. Returns the
    state, started for a new call, that the sampling loop prepares each UNet call with (`finish` it after)."""
    keep = HookRegistry.check_if_exists_or_initialize(unet.up_blocks[-2]).get_hook(HOOK_NAME)
    if keep is not None:
        keep.cache.start(config)
        return keep.cache
    cache = DeepCache(config)
    down, up = unet.down_blocks, unet.up_blocks
    for block in down[1:]:
        skips = len(block.resnets) + (1 if getattr(block, "downsamplers", None) else 0)
        _register(block, _Skip(cache, skips))
    _register(unet.mid_block, _Skip(cache, None))
    for block in up[:-2]:
        _register(block, _Skip(cache, None))
    _register(up[-2], _Keep(cache))
    return cache


def remove_deep_cache(unet) -> None:
    HookRegistry.check_if_exists_or_initialize(unet).remove_hook(HOOK_NAME, recurse=True)


def _register(module, hook: ModelHook) -> None:
    HookRegistry.check_if_exists_or_initialize(module).register_hook(hook, HOOK_NAME)


class _Skip(ModelHook):
    """A deep block: computes on full steps; on cached steps returns its input as a placeholder of the shape the
    UNet's forward expects (a down block: the hidden state and one skip per resnet and downsampler, which only
    skipped up blocks consume)."""

    def __init__(self, cache: DeepCache, skips: int | None):
        super().__init__()
        self.cache, self.skips = cache, skips

    def new_forward(self, module, *args, **kwargs):
        if not self.cache.reuse:
            return self.fn_ref.original_forward(*args, **kwargs)
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        return hidden if self.skips is None else (hidden, (hidden,) * self.skips)


class _Keep(ModelHook):
    """The second-to-last up block: keeps its output on full steps, returns the kept one on cached steps."""

    def __init__(self, cache: DeepCache):
        super().__init__()
        self.cache = cache

    def new_forward(self, module, *args, **kwargs):
        if self.cache.reuse:
            return self.cache.current
        output = self.fn_ref.original_forward(*args, **kwargs)
        if self.cache.enabled:
            self.cache.latest = output
        return output
