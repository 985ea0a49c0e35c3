"""The guidance policy of one call: SVD's frame-wise classifier-free guidance, limited to a σ interval.

SVD guides each frame of a window with its own scale, rising linearly from `min_scale` on the first frame to
`max_scale` on the last (diffusers' `StableVideoDiffusionPipeline`; the published ControlNeXt-SVD-v2 pipeline,
`pipeline/pipeline_stable_video_diffusion_controlnext.py`, "7. Prepare guidance scale", does the same per window).
Limited-interval guidance (Kynkäänniemi et al. 2024) runs the unconditional half only for σ in (low, high].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def guidance_applies(sigma: float, interval: tuple[float, float] | None) -> bool:
    """Limited-interval guidance: guide only for σ in (low, high]; None: every step."""
    return interval is None or interval[0] < sigma <= interval[1]


@dataclass(frozen=True)
class GuidancePolicy:
    """Whether a call guides at all (decided once from the scales, never by asking a device tensor), which steps
    it guides, and each frame's scale."""

    min_scale: float = 1.0
    max_scale: float = 3.0
    interval: tuple[float, float] | None = None

    @property
    def enabled(self) -> bool:
        """The doubled [unconditional, conditional] batch is prepared: some frame's scale is above 1."""
        return max(self.min_scale, self.max_scale) > 1

    def guides(self, sigma: float) -> bool:
        """Whether the step at noise level `sigma` runs the unconditional half too."""
        return self.enabled and guidance_applies(sigma, self.interval)

    def frame_scales(self, length: int, ndim: int, device=None, dtype=None) -> torch.Tensor:
        """The scale of each of a window's `length` frames, shaped (1, length, 1, ...) to broadcast over latents
        of `ndim` dimensions."""
        scales = torch.linspace(self.min_scale, self.max_scale, length, device=device, dtype=dtype)
        return scales.view(1, length, *[1] * (ndim - 2))
