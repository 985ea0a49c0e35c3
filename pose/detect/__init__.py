"""Pose backends behind one interface: `dwpose`, `mediapipe`, and `auto` (DWPose, fetched from the hub
when needed, else MediaPipe with a warning)."""

from __future__ import annotations

import logging

from svd_common.errors import InputError

from .base import PoseDetector

logger = logging.getLogger(__name__)

DETECTORS = ("auto", "dwpose", "mediapipe")

FALLBACK_WARNING = ("DWPose unavailable (%s); using MediaPipe, whose skeletons differ from the DWPose ones the "
                    "published ControlNeXt-SVD weights were trained on: expect weaker pose control "
                    "(pass --dwpose-dir or run once online to use DWPose)")


def load_detector(name: str = "auto", dwpose_dir=None, providers=None) -> PoseDetector:
    """Build a detector by name; `detector.name` ("dwpose" or "mediapipe") tells which one `auto` chose.

    `auto` prefers DWPose because the published weights learnt from its skeletons: it downloads the two
    files when they are not here, and falls back to MediaPipe with one warning only when that is
    impossible (HF_HUB_OFFLINE, hub unreachable: both decided within seconds). `dwpose` raises instead
    of falling back; `mediapipe` never touches the network.
    """
    if name not in DETECTORS:
        raise InputError(f"unknown detector {name!r}; choose one of {', '.join(DETECTORS)}")
    if name in ("auto", "dwpose"):
        from .dwpose import DWPoseDetector, WeightsUnavailable, find_weights

        try:
            found = find_weights(dwpose_dir, download=True)
        except WeightsUnavailable as e:
            if name == "dwpose":
                raise
            logger.warning(FALLBACK_WARNING, e.reason)
        else:
            logger.info("pose detector: DWPose (%s, %s)", *found)
            return DWPoseDetector(*found, providers=providers)
    from .mediapipe import MediaPipeDetector

    return MediaPipeDetector()


__all__ = ["DETECTORS", "PoseDetector", "load_detector"]
