"""Overlapping windows over the frame axis and the weights that fuse them. Pure functions.

Planning follows the published sliding window (ControlNeXt-SVD-v2): starts 0, L-O, 2(L-O), ...
while the start is below N-O, a window running past the end clamped to start at N-L, L capped at N.
Fusion: `ramp` (our default) weighs each frame by its distance from its window's edges, so a seam
blends smoothly; `uniform` is the published plain mean. With `drop_first=True` (published) every
window after the first gives no weight to its position 0, the slot fed the reference pose.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from svd_common.errors import InvalidValue

FUSION_MODES = ("ramp", "uniform")


def plan_windows(num_frames: int, window: int, overlap: int) -> list[tuple[int, int]]:
    """`(start, end)` pairs (end exclusive) covering `range(num_frames)`."""
    if num_frames < 1:
        raise InvalidValue(f"need at least one frame, got {num_frames}")
    if window < 1:
        raise InvalidValue(f"window must be at least 1, got {window}")
    if not 0 <= overlap < window:
        raise InvalidValue(f"overlap must be in [0, window), got {overlap} for window {window}")
    window = min(window, num_frames)
    overlap = min(overlap, window - 1)
    starts, start = [], 0
    while True:
        starts.append(min(start, num_frames - window))
        if start + window >= num_frames:
            break
        start += window - overlap
    return [(s, s + window) for s in dict.fromkeys(starts)]


def position_weights(length: int, mode: str = "ramp") -> np.ndarray:
    """Unnormalised weight of each position inside one window."""
    if mode == "uniform":
        return np.ones(length)
    if mode == "ramp":
        positions = np.arange(length)
        return np.minimum(positions + 1, length - positions).astype(np.float64)
    raise InvalidValue(f"unknown fusion mode {mode!r}; choose {' or '.join(FUSION_MODES)}")


def fusion_weights(windows: list[tuple[int, int]], num_frames: int, mode: str = "ramp",
                   drop_first: bool = False) -> list[np.ndarray]:
    """One weight vector per window; for every frame the weights of the windows covering it sum to 1.

    A dropped first slot that no other window covers (overlap 0) keeps its weight: it is the only
    estimate of that frame (the published code would divide by zero there).
    """
    raw = [position_weights(end - start, mode) for start, end in windows]
    total = np.zeros(num_frames)
    for (start, end), weights in zip(windows, raw):
        total[start:end] += weights
    if drop_first:
        for (start, _), weights in list(zip(windows, raw))[1:]:
            if total[start] > weights[0]:
                total[start] -= weights[0]
                weights[0] = 0.0
    if (total <= 0).any():
        missing = np.flatnonzero(total <= 0).tolist()
        raise InvalidValue(f"frames {missing} are covered by no window")
    return [weights / total[start:end] for (start, end), weights in zip(windows, raw)]


@dataclass(frozen=True)
class WindowPlan:
    """The windows of one video and each one's fusion weights: what the sampling loop iterates over."""

    windows: list[tuple[int, int]]
    weights: list[np.ndarray]

    @classmethod
    def make(cls, num_frames: int, window: int | None, overlap: int = 0, fusion: str = "ramp",
             drop_first: bool = False) -> "WindowPlan":
        """`window=None`: one window over the whole video."""
        windows = plan_windows(num_frames, window or num_frames, overlap)
        return cls(windows, fusion_weights(windows, num_frames, fusion, drop_first))

    @property
    def length(self) -> int:
        """Frames per window (all windows have the same length)."""
        start, end = self.windows[0]
        return end - start

    def __len__(self) -> int:
        return len(self.windows)
