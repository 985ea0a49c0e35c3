"""ComfyUI's `IMAGE` batches (B, H, W, C float 0-1) to and from the files and uint8 frames the job works on.

A ComfyUI image holds uint8 pixels divided by 255 (its image and video loaders make them so), so rounding x * 255
gives them back exactly; files are named by their content, so the same frames are written once (and the pose cache,
keyed by the file's content, finds them again).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from svd_common.atomic import publish
from svd_common.errors import InputError
from svd_common.video import write_lossless_clip


def pixels(images: torch.Tensor, name: str) -> np.ndarray:
    """An `IMAGE` batch as RGB uint8 (B, H, W, 3); an alpha channel is left out."""
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[-1] not in (3, 4):
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise InputError(f"{name}: expected ComfyUI images (batch, height, width, 3), got {shape}")
    if not len(images):
        raise InputError(f"{name}: no images")
    return (images[..., :3].float().clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()


def content_name(frames: np.ndarray, *extra) -> str:
    digest = hashlib.sha256(np.ascontiguousarray(frames).data)
    digest.update(repr((frames.shape, *extra)).encode())
    return digest.hexdigest()[:32]


def image_file(reference: torch.Tensor, folder: Path) -> Path:
    """The reference (a batch of one) as a PNG in `folder`."""
    frames = pixels(reference, "reference")
    if len(frames) != 1:
        raise InputError(f"reference: one image expected, got a batch of {len(frames)}")
    path = folder / f"reference-{content_name(frames)}.png"
    if not path.is_file():
        tmp = path.with_name(f".{path.name}.part")
        Image.fromarray(frames[0]).save(tmp, format="PNG")
        publish(tmp, path)
    return path


def clip_file(driving: torch.Tensor, frame_rate: float, folder: Path) -> Path:
    """The driving frames as a lossless clip at `frame_rate` in `folder`."""
    if not frame_rate > 0:
        raise InputError(f"frame_rate must be above 0, got {frame_rate}")
    frames = pixels(driving, "driving")
    path = folder / f"driving-{content_name(frames, float(frame_rate))}.mkv"
    return path if path.is_file() else write_lossless_clip(frames, frame_rate, path)


def images_from_frames(frames, count: int, device) -> torch.Tensor:
    """`count` RGB uint8 frames (an array or an iterator of (H, W, 3) ones) as an `IMAGE` batch on `device`, filled
    as they come (the frames are never all held twice)."""
    images = None
    for index, frame in enumerate(frames):
        if images is None:
            images = torch.empty((count, *frame.shape), dtype=torch.float32, device=device)
        images[index] = torch.from_numpy(np.asarray(frame)).to(device=device, dtype=torch.float32) / 255
    return images
