"""Stand-ins for the ComfyUI core nodes the example workflows use, with their real names, inputs and outputs: Load
Image (`nodes.py`), Load Video, Get Video Components, Create Video and Save Video (`comfy_extras/nodes_video.py`,
V3 schemas, Comfy-Org/ComfyUI commit 39b885f), written as V1 nodes. Frames are read as ComfyUI reads them (PIL,
EXIF turned, RGB, / 255; PyAV rgb24 / 255). Save Video writes with svd-animate's `VideoWriter`, whose file depends
on the frames and the rate only, so a test compares it with the CLI's byte for byte (ComfyUI's own encoder settings
differ). Save Video's `format` is a plain combo here where ComfyUI's is a dynamic one with the codec nested under it:
the three values a workflow saves for it (prefix, format, codec) are the same."""

from __future__ import annotations

import dataclasses
import os
from fractions import Fraction

import av
import folder_paths
import numpy as np
import torch
from PIL import Image, ImageOps

from svd_common.video import VideoWriter


class LoadImage:
    RETURN_TYPES = ("IMAGE", "MASK")
    FUNCTION = "load_image"
    CATEGORY = "image"

    @classmethod
    def INPUT_TYPES(cls):
        folder = folder_paths.get_input_directory()
        files = [name for name in os.listdir(folder) if os.path.isfile(os.path.join(folder, name))]
        return {"required": {"image": (sorted(files), {"image_upload": True})}}

    def load_image(self, image):
        with Image.open(folder_paths.get_annotated_filepath(image)) as opened:
            rgb = ImageOps.exif_transpose(opened).convert("RGB")
        pixels = torch.from_numpy(np.array(rgb).astype(np.float32) / 255.0)[None,]
        return pixels, torch.zeros((1, 64, 64), dtype=torch.float32)


@dataclasses.dataclass
class Video:
    """What ComfyUI's VIDEO carries: a file (VideoFromFile) or components (VideoFromComponents)."""

    path: str | None = None
    images: torch.Tensor | None = None
    frame_rate: Fraction | None = None


class LoadVideo:
    RETURN_TYPES = ("VIDEO",)
    FUNCTION = "execute"
    CATEGORY = "video"

    @classmethod
    def INPUT_TYPES(cls):
        folder = folder_paths.get_input_directory()
        files = [name for name in os.listdir(folder) if name.endswith((".mp4", ".mov", ".webm", ".mkv"))]
        return {"required": {"file": (sorted(files), {"video_upload": True})}}

    def execute(self, file):
        return (Video(path=folder_paths.get_annotated_filepath(file)),)


class GetVideoComponents:
    RETURN_TYPES = ("IMAGE", "AUDIO", "FLOAT", "COMBO", "COMBO")
    RETURN_NAMES = ("images", "audio", "fps", "bit_depth", "color_space")
    FUNCTION = "execute"
    CATEGORY = "video"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"video": ("VIDEO",)}}

    def execute(self, video):
        with av.open(video.path) as container:
            stream = container.streams.video[0]
            frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(stream)]
            rate = stream.average_rate
        images = torch.from_numpy(np.stack(frames).astype(np.float32) / 255.0)
        return images, None, float(rate), 8, "sRGB"


class CreateVideo:
    RETURN_TYPES = ("VIDEO",)
    FUNCTION = "execute"
    CATEGORY = "video"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"images": ("IMAGE",), "fps": ("FLOAT", {"default": 30.0, "min": 1.0, "max": 120.0,
                                                                     "step": 1.0})},
                "optional": {"audio": ("AUDIO",)}}

    def execute(self, images, fps, audio=None):
        return (Video(images=images, frame_rate=Fraction(fps)),)


class SaveVideo:
    RETURN_TYPES = ("VIDEO",)
    RETURN_NAMES = ("video",)
    FUNCTION = "execute"
    OUTPUT_NODE = True
    CATEGORY = "video"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"video": ("VIDEO",), "filename_prefix": ("STRING", {"default": "video/ComfyUI"}),
                             "format": (["auto", "mp4", "mkv", "webm"],)},
                "optional": {"codec": (["auto", "h264", "av1"],)}}

    def execute(self, video, filename_prefix, format, codec="auto"):
        suffix = ".webm" if format == "webm" else f".{format if format != 'auto' else 'mp4'}"
        path = os.path.join(folder_paths.get_output_directory(), f"{filename_prefix}_00001_{suffix}")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        frames = (video.images.clamp(0, 1) * 255).round().to(torch.uint8).numpy()
        with VideoWriter(path, fps=float(video.frame_rate)) as writer:
            for frame in frames:
                writer.write(frame)
        return {"ui": {"images": [{"filename": os.path.basename(path), "subfolder": "", "type": "output"}]},
                "result": (video,)}


NODE_CLASS_MAPPINGS = {"LoadImage": LoadImage, "LoadVideo": LoadVideo, "GetVideoComponents": GetVideoComponents,
                       "CreateVideo": CreateVideo, "SaveVideo": SaveVideo}
