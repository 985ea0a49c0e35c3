"""The reference image framed to the output size, and poses mapped into that frame. Pure functions.

Both framings resize the reference to cover W x H, keeping its aspect ratio, and centre-crop it.
- `crop_reference` (our default): PIL bicubic with antialiasing, sizes rounded. Downscaling a large
  photo without a low-pass filter aliases (moire on fabric, jagged edges), and the model sees those
  pixels through CLIP and the VAE latent of every frame.
- `crop_reference_published`: the published pixels (ControlNeXt-SVD-v2 `utils/pre_process.py`,
  `preprocess`): sizes with `math.ceil`, torchvision `resize(uint8 tensor, antialias=None)` and
  `center_crop`. On a tensor, `antialias=None` means no antialiasing in every torchvision release
  that has the argument (`_functional_tensor.resize`: "if antialias is None: antialias = False"):
  bilinear, `align_corners=False`, computed in float32 and rounded back to uint8. `center_crop`
  puts the crop at `int(round((size - crop) / 2))`.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from pose.align import apply_linear
from pose.skeleton import PoseSequence


def cover_crop(width: int, height: int, target_w: int, target_h: int) -> tuple[float, int, int]:
    """Scale and top-left offset that make a `width` x `height` image cover the target, centred."""
    scale = max(target_w / width, target_h / height)
    return scale, (round(width * scale) - target_w) // 2, (round(height * scale) - target_h) // 2


def crop_reference(image: np.ndarray, target_w: int, target_h: int) -> np.ndarray:
    """Our framing: antialiased bicubic cover-resize, then the centre crop of `cover_crop`."""
    scale, left, top = cover_crop(image.shape[1], image.shape[0], target_w, target_h)
    size = (round(image.shape[1] * scale), round(image.shape[0] * scale))
    resized = np.asarray(Image.fromarray(image).resize(size, Image.BICUBIC))
    return resized[top:top + target_h, left:left + target_w]


def published_cover_size(width: int, height: int, target_w: int, target_h: int) -> tuple[int, int]:
    """(height, width) the published `preprocess` resizes to: the matching side exact, the other ceil'ed."""
    h_w_ratio = float(height) / float(width)
    if h_w_ratio < target_h / target_w:
        return target_h, math.ceil(target_h / h_w_ratio)
    return math.ceil(target_w * h_w_ratio), target_w


def crop_reference_published(image: np.ndarray, target_w: int, target_h: int) -> np.ndarray:
    """The published framing, pixel for pixel (see the module docstring)."""
    new_h, new_w = published_cover_size(image.shape[1], image.shape[0], target_w, target_h)
    pixels = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float()
    if (new_h, new_w) != tuple(image.shape[:2]):
        pixels = F.interpolate(pixels, size=(new_h, new_w), mode="bilinear", align_corners=False, antialias=False)
    resized = pixels.round().to(torch.uint8)[0].permute(1, 2, 0).numpy()
    top = int(round((new_h - target_h) / 2.0))
    left = int(round((new_w - target_w) / 2.0))
    return np.ascontiguousarray(resized[top:top + target_h, left:left + target_w])


def crop_poses(seq: PoseSequence, target_w: int, target_h: int, published: bool = False) -> PoseSequence:
    """Poses normalised to the uncropped frame -> normalised to the cover-cropped target frame, with the
    geometry of `crop_reference` (or of `crop_reference_published`), so they stay on the image."""
    if (seq.width, seq.height) == (target_w, target_h):
        return seq
    if published:
        new_h, new_w = published_cover_size(seq.width, seq.height, target_w, target_h)
        left, top = int(round((new_w - target_w) / 2.0)), int(round((new_h - target_h) / 2.0))
    else:
        scale, left, top = cover_crop(seq.width, seq.height, target_w, target_h)
        new_w, new_h = seq.width * scale, seq.height * scale
    a = (new_w / target_w, new_h / target_h)
    b = (-left / target_w, -top / target_h)
    return apply_linear(seq, a, b, target_w, target_h)
