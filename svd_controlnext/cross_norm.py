"""Cross normalisation (ControlNeXt): control features take the statistics of the UNet features.

Published formula: per sample, over (C, H, W), with torch's unbiased std and the statistics of the
control taken at its own resolution, before resizing:
    c' = (c - mean(c)) / (std(c) + eps) * std(s) + mean(s),   then adaptive average pooling to s's size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

EPS = 1e-5


def cross_normalize(control: torch.Tensor, target: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """`control` (N, C, h, w) normalised to `target`'s (N, C, H, W) statistics and resized to (H, W)."""
    if control.shape[0] != target.shape[0] or control.shape[1] != target.shape[1]:
        raise ValueError(f"control {tuple(control.shape)} and target {tuple(target.shape)} differ in batch or channels")
    dims = (1, 2, 3)
    control_mean = control.mean(dim=dims, keepdim=True)
    control_std = control.std(dim=dims, keepdim=True)
    target_mean = target.mean(dim=dims, keepdim=True)
    target_std = target.std(dim=dims, keepdim=True)
    normalised = (control - control_mean) / (control_std + eps) * target_std + target_mean
    if normalised.shape[-2:] != target.shape[-2:]:
        normalised = F.adaptive_avg_pool2d(normalised, target.shape[-2:])
    return normalised
