"""MediaPipe Holistic (0.10.x, models inside the wheel): the offline backend.

Mapped to the DWPose/OpenPose layout: pose-33 -> OpenPose-18 (neck = mean of the shoulders), the
two 21-point hands (same point order as COCO-WholeBody; holistic's "left" hand is the person's
left, checked on a real frame), and 68 iBUG-style face points picked from the 468-point mesh.

Scores: body joints use MediaPipe's visibility; hand and face points get 1.0 when the hand or face
was found (MediaPipe gives no per-point confidence for them) and are missing (NaN, 0) otherwise.
Holistic follows a single person, so there is no person choice to make.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import warnings

import numpy as np

from svd_common.errors import InputError

from .base import PoseDetector, empty_pose

# OpenPose-18 index <- MediaPipe pose-33 index (None: neck, the mean of the shoulders 11 and 12).
OPENPOSE_FROM_MEDIAPIPE = (0, None, 12, 14, 16, 11, 13, 15, 24, 26, 28, 23, 25, 27, 5, 2, 8, 7)

# iBUG-68 point <- face-mesh index. Exact counterparts for eye corners, mouth corners, nose tip and
# brow ends; the jaw (0-16) follows the mesh's silhouette ring, which runs slightly outside the
# iBUG jawline at the temples (0, 16), and the nostril points (31-35) are the nearest mesh points.
FACE68_FROM_MESH = (
    162, 234, 93, 58, 172, 136, 149, 148, 152, 377, 378, 365, 397, 288, 323, 454, 389,  # jaw 0-16
    71, 63, 105, 66, 107, 336, 296, 334, 293, 301,  # brows 17-26
    168, 197, 5, 4, 75, 97, 2, 326, 305,  # nose 27-35
    33, 160, 158, 133, 153, 144, 362, 385, 387, 263, 373, 380,  # eyes 36-47
    61, 39, 37, 0, 267, 269, 291, 405, 314, 17, 84, 181,  # outer lips 48-59
    78, 82, 13, 312, 308, 317, 14, 87,  # inner lips 60-67
)


# What MediaPipe's C++ side (glog, TFLite) prints on stderr on every run, bypassing Python: dropped, so that
# a run's own messages, an error above all, are not buried under them. Anything else it prints is kept.
NATIVE_NOISE = ("inference_feedback_manager", "Created TensorFlow Lite XNNPACK delegate",
                "All log messages before absl::InitializeLog()", "gl_context", "landmark_projection_calculator")


@contextlib.contextmanager
def native_noise_filtered():
    """Route file descriptor 2 to a temporary file while MediaPipe works, then replay its lines minus
    NATIVE_NOISE. (A Python-level redirect cannot catch C++ writes to the descriptor itself.)"""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no usable stderr: nothing to filter
        yield
        return
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            kept = [line for line in sink.read().decode(errors="replace").splitlines()
                    if line.strip() and not any(noise in line for noise in NATIVE_NOISE)]
            if kept:
                print("\n".join(kept), file=sys.stderr)


def _import_mediapipe():
    os.environ.setdefault("GLOG_minloglevel", "2")
    # mediapipe 0.10.x calls a protobuf API that protobuf 4.25 marks deprecated on every frame.
    warnings.filterwarnings("ignore", message="SymbolDatabase.GetPrototype", category=UserWarning)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import mediapipe as mp
    if not hasattr(mp, "solutions"):
        raise InputError(f"mediapipe {getattr(mp, '__version__', '?')} has no Holistic solution with bundled models; "
                         "install mediapipe==0.10.14 or use --detector dwpose")
    return mp


def _xy(landmarks) -> np.ndarray:
    return np.array([(p.x, p.y) for p in landmarks.landmark], np.float32)


def holistic_to_openpose(pose_xy, visibility, left_hand=None, right_hand=None, face_mesh=None) -> dict:
    """Arrays from MediaPipe Holistic -> our frame layout. Pure, so the mapping is testable."""
    pose = empty_pose()
    pose_xy = np.asarray(pose_xy, np.float32)
    visibility = np.clip(np.asarray(visibility, np.float32), 0.0, 1.0)
    for op_index, mp_index in enumerate(OPENPOSE_FROM_MEDIAPIPE):
        if mp_index is None:
            pose["body"][op_index] = (pose_xy[11] + pose_xy[12]) / 2
            pose["body_score"][op_index] = min(visibility[11], visibility[12])
        else:
            pose["body"][op_index] = pose_xy[mp_index]
            pose["body_score"][op_index] = visibility[mp_index]
    for side, hand in enumerate((left_hand, right_hand)):
        if hand is not None:
            pose["hands"][side] = hand
            pose["hands_score"][side] = 1.0
    if face_mesh is not None:
        pose["face"][:] = np.asarray(face_mesh, np.float32)[list(FACE68_FROM_MESH)]
        pose["face_score"][:] = 1.0
    return pose


class MediaPipeDetector(PoseDetector):
    name = "mediapipe"

    def __init__(self, model_complexity: int = 1, min_detection_confidence: float = 0.5):
        self.model_complexity = model_complexity
        self.min_detection_confidence = min_detection_confidence
        self._mp = _import_mediapipe()
        self._video = None
        self._still = None

    def settings(self) -> dict:
        return {"model_complexity": self.model_complexity, "min_detection_confidence": self.min_detection_confidence,
                "mediapipe": self._mp.__version__}

    def _holistic(self, static: bool):
        with native_noise_filtered():
            return self._mp.solutions.holistic.Holistic(
                static_image_mode=static, model_complexity=self.model_complexity,
                min_detection_confidence=self.min_detection_confidence)

    def _run(self, holistic, image: np.ndarray):
        with native_noise_filtered():
            result = holistic.process(np.ascontiguousarray(image))
        if result.pose_landmarks is None:
            return None
        visibility = [p.visibility for p in result.pose_landmarks.landmark]
        hands = [_xy(h) if h is not None else None for h in (result.left_hand_landmarks, result.right_hand_landmarks)]
        face = _xy(result.face_landmarks) if result.face_landmarks is not None else None
        return holistic_to_openpose(_xy(result.pose_landmarks), visibility, *hands, face)

    def detect(self, image: np.ndarray):
        """A frame of a video: tracking mode, so call `reset()` between videos."""
        if self._video is None:
            self._video = self._holistic(static=False)
        return self._run(self._video, image)

    def detect_image(self, image: np.ndarray):
        if self._still is None:
            self._still = self._holistic(static=True)
        return self._run(self._still, image)

    def reset(self) -> None:
        if self._video is not None:
            self._video.close()
            self._video = None

    def close(self) -> None:
        self.reset()
        if self._still is not None:
            self._still.close()
            self._still = None
