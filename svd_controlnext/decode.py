"""Chunked temporal-VAE decoding that streams frames out as they are decoded.

Only one chunk of decoded frames exists at a time, so peak memory depends on the chunk size, not on
the video's length. The chunks are what diffusers' `decode_latents` decodes (each chunk an
independent clip for the temporal decoder), so the pixels equal the pipeline's for the same chunk size.
"""

from __future__ import annotations

import inspect
from typing import Iterator

import numpy as np
import torch
from tqdm.auto import tqdm


def unscaled_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """The VAE's own latents (what its decoder takes; ComfyUI's `LATENT`), (F, 4, h, w) on the VAE's device, from
    the pipeline's (1, F, 4, h, w) or (F, 4, h, w), which are scaled by the VAE's scaling factor."""
    latents = latents.flatten(0, 1) if latents.ndim == 5 else latents
    return latents.to(device=vae.device, dtype=vae.dtype) * (1 / vae.config.scaling_factor)


def iter_decoded_chunks(vae, latents: torch.Tensor, chunk_size: int = 8, progress: bool = False,
                        scaled: bool = True) -> Iterator[torch.Tensor]:
    """Latents (1, F, 4, h, w) or (F, 4, h, w), as the pipeline returns them with `output_type="latent"` (or, with
    `scaled=False`, as `unscaled_latents` gives them), -> RGB uint8 frames (n, H, W, 3) on the VAE's device, one
    chunk of n <= chunk_size frames at a time."""
    if chunk_size < 1:
        raise ValueError(f"decode chunk size must be at least 1, got {chunk_size}")
    if scaled:
        latents = unscaled_latents(vae, latents)
    else:
        latents = (latents.flatten(0, 1) if latents.ndim == 5 else latents).to(device=vae.device, dtype=vae.dtype)
    takes_num_frames = "num_frames" in inspect.signature(vae.forward).parameters
    for start in tqdm(range(0, len(latents), chunk_size), desc="decode", unit="chunk", disable=not progress,
                      leave=False):
        chunk = latents[start:start + chunk_size]
        extra = {"num_frames": len(chunk)} if takes_num_frames else {}
        with torch.no_grad():
            pixels = vae.decode(chunk, **extra).sample.float()
        frames = ((pixels / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1)
        del pixels
        yield frames


def iter_decoded_frames(vae, latents: torch.Tensor, chunk_size: int = 8, progress: bool = False,
                        scaled: bool = True) -> Iterator[np.ndarray]:
    """The frames of `iter_decoded_chunks` as RGB uint8 arrays (H, W, 3) in host memory, one at a time."""
    for frames in iter_decoded_chunks(vae, latents, chunk_size, progress, scaled):
        yield from frames.cpu().numpy()
