"""Pose backends behind one interface: `dwpose`, `mediapipe`, and `auto` (DWPose when its
weights are available here, otherwise MediaPipe)."""

from __future__ import annotations

import logging

from ..errors import InputError
from .base import PoseDetector

logger = logging.getLogger(__name__)

DETECTORS = ("auto", "dwpose", "mediapipe")


def load_detector(name: str = "auto", dwpose_dir=None, providers=None) -> PoseDetector:
    """Build a detector by name. `auto` never downloads: it takes DWPose only when the two ONNX
    files are in `dwpose_dir`, $SVD_ANIMATE_DWPOSE_DIR or the hub cache, and says which it chose."""
    if name not in DETECTORS:
        raise InputError(f"unknown detector {name!r}; choose one of {', '.join(DETECTORS)}")
    if name in ("auto", "dwpose"):
        from .dwpose import DWPoseDetector, find_weights

        found = find_weights(dwpose_dir, download=name == "dwpose")
        if found is not None:
            logger.info("pose detector: DWPose (%s, %s)", *found)
            return DWPoseDetector(*found, providers=providers)
        if name == "dwpose":
            raise InputError("DWPose weights not found; pass --dwpose-dir or use --detector mediapipe")
        logger.info("pose detector: MediaPipe (DWPose weights not found here; pass --dwpose-dir to use DWPose)")
    from .mediapipe import MediaPipeDetector

    return MediaPipeDetector()


__all__ = ["DETECTORS", "PoseDetector", "load_detector"]
