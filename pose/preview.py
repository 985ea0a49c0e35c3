"""Preview video: source frame | skeleton (| skeleton over the reference when aligned)."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import cv2
import numpy as np
from tqdm.auto import tqdm

from svd_common.video import VideoWriter, iter_frames

from .extract import ExtractSettings
from .render import draw_pose
from .skeleton import PoseSequence

PREVIEW_HEIGHT = 640
REFERENCE_GAIN = 0.45


def _fit_height(image: np.ndarray, height: int) -> np.ndarray:
    width = max(2, round(image.shape[1] * height / image.shape[0]))
    return cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA)


def write_preview(path, video, poses: PoseSequence, settings: ExtractSettings,
                  reference: np.ndarray | None = None, height: int = PREVIEW_HEIGHT, progress: bool = True,
                  on_frame: Callable[[int, int], None] | None = None) -> Path:
    """Stream the source frames again and write the panels side by side, atomically. `on_frame(done, total)`
    is called after each frame written."""
    height = min(height, poses.height) // 2 * 2
    pose_width = max(2, round(poses.width * height / poses.height))
    dimmed = None
    if reference is not None:
        dimmed = (cv2.resize(reference, (pose_width, height), interpolation=cv2.INTER_AREA) * REFERENCE_GAIN)
    by_index = {int(i): t for t, i in enumerate(poses.frame_index)}
    frames = iter_frames(video, settings.stride, settings.max_frames, settings.start, settings.end)
    with VideoWriter(path, fps=poses.fps) as writer:
        for index, rgb in tqdm(frames, total=len(poses), desc="preview", unit="frame", disable=not progress,
                               leave=False):
            if index not in by_index:
                continue
            skeleton = draw_pose(poses.frame(by_index[index]), height, pose_width)
            panels = [_fit_height(rgb, height), skeleton]
            if dimmed is not None:
                panels.append(np.maximum(dimmed, skeleton).astype(np.uint8))
            writer.write(np.concatenate(panels, axis=1))
            if on_frame is not None:
                on_frame(writer.frames_written, len(poses))
    return Path(path)
