"""How many frames fit: the memory that grows with video length, checked before any work starts.

A window's UNet work does not depend on the video's length; what does is held for the whole video:
the rendered pose frames (uint8, host), the side-by-side copy when asked for, and the latents
(video latents, fused latents and the window being stepped, on the device). A run whose
length-dependent memory would take more than half of what is free is refused with the longest
length that fits, instead of being killed by the OOM killer an hour later.
"""

from __future__ import annotations

import dataclasses

import psutil
import torch

from svd_common.errors import ResourceError

SHARE_FOR_FRAMES = 0.5  # the rest is left to the models and one window's activations
LATENT_COPIES = 3  # latents, fused latents, and the window slice being stepped


@dataclasses.dataclass(frozen=True)
class FrameCost:
    host: int  # bytes per frame in RAM
    device: int  # bytes per frame on the device (0 when the device is the CPU: counted in `host`)


def frame_cost(width: int, height: int, dtype_bytes: int, device: str, side_by_side: bool = False) -> FrameCost:
    pose_frame = width * height * 3
    host = pose_frame * (2 if side_by_side else 1)
    latents = LATENT_COPIES * 4 * (width // 8) * (height // 8) * dtype_bytes
    if torch.device(device).type == "cpu":
        return FrameCost(host + latents, 0)
    return FrameCost(host, latents)


def free_memory(device: str) -> tuple[int, int]:
    """(free host bytes, free device bytes); device bytes are 0 for the CPU."""
    host = psutil.virtual_memory().available
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        # Blocks PyTorch's caching allocator holds but no tensor uses (the sampling's activations, once
        # sampling is over) are free to the next allocation, though the driver counts them as used.
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return host, free + cached
    return host, 0


def max_frames_that_fit(cost: FrameCost, free_host: int, free_device: int) -> int:
    limits = [int(free_host * SHARE_FOR_FRAMES) // cost.host]
    if cost.device:
        limits.append(int(free_device * SHARE_FOR_FRAMES) // cost.device)
    return min(limits)


def check_frames_fit(num_frames: int, width: int, height: int, dtype: torch.dtype, device: str,
                     side_by_side: bool = False, free: tuple[int, int] | None = None) -> None:
    """Refuse, in one line naming the longest length that fits, a video too long for this machine."""
    cost = frame_cost(width, height, torch.finfo(dtype).bits // 8, device, side_by_side)
    free_host, free_device = free if free is not None else free_memory(device)
    limit = max_frames_that_fit(cost, free_host, free_device)
    if num_frames > limit:
        need = num_frames * (cost.host + cost.device) / 2**30
        raise ResourceError(f"{num_frames} frames at {width}x{height} need about {need:.1f} GiB held for the whole "
                         f"video, more than {device} has free; at most {limit} frames fit here: use --max-frames "
                         f"{max(limit, 1)}, a larger --stride or a smaller size")


# Decoding one more frame per chunk with the full SVD temporal VAE holds about 2.25 GiB at 576x1024 in fp32
# (bench/memory.py, live tensors counted on the full-size VAE; 1.13 GiB in fp16); 2.33 keeps a 4 % margin.
# It scales with the pixels and the dtype's size: 0.25 GiB at 256x256, as measured in RSS on a CPU
# (shared/compat/diffusers_svd.md: 2.77 - 1.28 GiB for chunks of 8 vs 2).
DECODE_BYTES_PER_PIXEL_FP32 = 2.33 * 2**30 / (576 * 1024)
MAX_DECODE_CHUNK = 16
# The default decode chunk: fixed, because the temporal decoder mixes the frames of a chunk, so the chunk size
# changes the pixels and the same seed must give the same video whatever else the machine is doing. 8 frames
# decode at 576x1024 fp16 in 13.2 GiB (bench/memory.py): a 16 GB card.
DEFAULT_DECODE_CHUNK = 8


def decode_chunk_for(free_bytes: int, width: int, height: int, dtype_bytes: int, share: float = 0.5) -> int:
    """The largest decode chunk whose working memory fits in `share` of `free_bytes` (1 to 16 frames):
    bigger chunks are not faster on a CPU, but use the GPU better."""
    per_frame = DECODE_BYTES_PER_PIXEL_FP32 * width * height * dtype_bytes / 4
    return int(max(1, min(MAX_DECODE_CHUNK, free_bytes * share // per_frame)))
