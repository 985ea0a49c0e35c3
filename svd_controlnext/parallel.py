"""Window-parallel sampling: one video's windows shared among the processes of a `torch.distributed` group.

Within a denoising step the windows are independent until their predictions are fused. Each process runs the pose
encoder and the UNet on its own windows, a contiguous block (`assign_windows`), so neighbouring windows on one
process still share their overlap's control features; DeepCache keeps its per-window features on that process too.
The weighted predictions are summed over the processes by one `all_reduce` of the fused prediction (fp32, frames x
4 x h x w x 4 bytes per step), and every process takes the same scheduler step on the same latents: the noise comes
from the same seeded generator on each.

Exactness: the pose encoder's rounding depends on the frames it encodes together, so a process whose first window
overlaps another process's window encodes the overlap in the batches one process does (`shared_control_batches`:
one extra encoder call per step). A frame that at most two windows cover (overlap <= window / 2: every preset) has
at most two non-zero terms in the sum, and adding zeros, or two numbers in either order, is exact; so the fused
prediction is one process's bit for bit. A frame under three windows or more is summed in another order than one
process's: equal up to float rounding. (An all_gather of each window's contribution, added in window order, would
be exact always, at about windows x window length / frames times the traffic.)

Decoding is shared too: the chunks (one process's boundaries, so the same pixels) are dealt round-robin; in each
round every process decodes one chunk and process 0 gathers them in order, so it streams the frames to its writer
holding at most one chunk per process.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np
import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from svd_common.errors import UserError

from .decode import iter_decoded_chunks


def assign_windows(num_windows: int, world_size: int) -> list[range]:
    """Each process's windows: contiguous blocks in window order, sizes differing by at most one (the first larger);
    a process beyond the number of windows gets none."""
    if world_size < 1:
        raise ValueError(f"need at least one process, got {world_size}")
    size, extra = divmod(num_windows, world_size)
    starts = [rank * size + min(rank, extra) for rank in range(world_size + 1)]
    return [range(starts[rank], starts[rank + 1]) for rank in range(world_size)]


def window_frames(start: int, end: int, reference_first: bool) -> list[int]:
    """The pose frames a window feeds the encoder: its own, pose frame 0 first after the first window when the
    published layout puts the reference pose in every window."""
    frames = list(range(start, end))
    if reference_first and start > 0:
        frames[0] = 0
    return frames


def control_batches(windows: list[tuple[int, int]], reference_first: bool) -> list[list[int]]:
    """The frames one process encodes at each window of a step: those the window before did not have."""
    batches, previous = [], set()
    for start, end in windows:
        frames = window_frames(start, end, reference_first)
        batches.append([frame for frame in frames if frame not in previous])
        previous = set(frames)
    return batches


def shared_control_batches(windows: list[tuple[int, int]], first: int, reference_first: bool) -> list[list[int]]:
    """The batches in which one process encodes the frames that window `first` shares with the window before it.
    A process whose windows start at `first` encodes these (the encoder's float rounding depends on the batch), so
    its control features are one process's bit for bit."""
    batches = control_batches(windows, reference_first)
    shared = set(window_frames(*windows[first - 1], reference_first)) & set(
        window_frames(*windows[first], reference_first))
    sources = {max(k for k in range(first) if frame in batches[k]) for frame in shared}
    return [batches[k] for k in sorted(sources)]


@dataclass(frozen=True)
class WindowParallel:
    """This process's place in the group that shares one video: its `rank` among `world_size` processes of `group`
    (None: the default group, already initialised)."""

    rank: int
    world_size: int
    group: Any = None

    @property
    def is_main(self) -> bool:
        """Process 0: the one that extracts the poses and writes the video."""
        return self.rank == 0

    def windows(self, num_windows: int) -> range:
        """The indices of this process's windows."""
        return assign_windows(num_windows, self.world_size)[self.rank]

    def fuse(self, prediction: torch.Tensor) -> torch.Tensor:
        """The fused prediction of the whole video, in place, from each process's weighted windows."""
        dist.all_reduce(prediction, group=self.group)
        return prediction

    def from_main(self, make: Callable[[], Any]) -> Any:
        """`make()` run on process 0 and its result (or its `UserError`) on every process: for work that must happen
        once (the pose extraction fills the cache) or would differ between processes (a drawn seed)."""
        message = [None, None]
        if self.is_main:
            try:
                message[0] = make()
            except UserError as error:
                message[1] = error
        dist.broadcast_object_list(message, src=self._main_rank(), group=self.group)
        if message[1] is not None:
            raise message[1]
        return message[0]

    def _main_rank(self) -> int:
        """Process 0 of the group, as torch.distributed's collectives name it (by its rank in the world)."""
        return 0 if self.group is None else dist.get_global_rank(self.group, 0)

    def decoded_frames(self, vae, latents: torch.Tensor, chunk_size: int, progress: bool = False
                       ) -> Iterator[np.ndarray]:
        """The video's RGB uint8 frames (H, W, 3) in order on process 0, nothing on the others; every process
        decodes its chunks (round-robin) and must consume the iterator."""
        latents = latents.flatten(0, 1) if latents.ndim == 5 else latents
        starts = range(0, len(latents), chunk_size)
        for first in tqdm(range(0, len(starts), self.world_size), desc="decode", unit="round",
                          disable=not (progress and self.is_main), leave=False):
            mine = None
            if first + self.rank < len(starts):
                start = starts[first + self.rank]
                chunk = latents[start:start + chunk_size]
                mine = next(iter_decoded_chunks(vae, chunk, chunk_size)).cpu().numpy()
            gathered = [None] * self.world_size if self.is_main else None
            dist.gather_object(mine, gathered, dst=self._main_rank(), group=self.group)
            for frames in gathered or ():
                if frames is not None:
                    yield from frames
