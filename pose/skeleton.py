"""`PoseSequence`: per-frame whole-body keypoints and their versioned `.npz` format.

Coordinates are normalised to the frame (x / width, y / height). A point the detector did not
return at all is NaN with score 0; a point it returned with low confidence keeps its coordinates
and its score, so renderers and the alignment decide with their own thresholds (as published).
Hands: index 0 is the person's left hand, 1 the right (COCO-WholeBody order).
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import zipfile
from pathlib import Path

import numpy as np

from svd_common.atomic import publish
from svd_common.errors import InputError

FORMAT_NAME = "svd-animate.pose"
FORMAT_VERSION = 1

NUM_BODY = 18
NUM_HAND = 21
NUM_FACE = 68

BODY_NAMES = (
    "nose", "neck", "right_shoulder", "right_elbow", "right_wrist", "left_shoulder", "left_elbow",
    "left_wrist", "right_hip", "right_knee", "right_ankle", "left_hip", "left_knee", "left_ankle",
    "right_eye", "left_eye", "right_ear", "left_ear",
)

# Trailing shape of each per-frame array (after the T axis).
ARRAY_SHAPES = {
    "body": (NUM_BODY, 2),
    "body_score": (NUM_BODY,),
    "hands": (2, NUM_HAND, 2),
    "hands_score": (2, NUM_HAND),
    "face": (NUM_FACE, 2),
    "face_score": (NUM_FACE,),
}
POINT_ARRAYS = ("body", "hands", "face")


@dataclasses.dataclass
class PoseSequence:
    """Whole-body poses of one person over T frames, normalised to a `width` x `height` frame."""

    body: np.ndarray
    body_score: np.ndarray
    hands: np.ndarray
    hands_score: np.ndarray
    face: np.ndarray
    face_score: np.ndarray
    width: int
    height: int
    fps: float
    # Source frame index of each pose and whether it was filled in (no person found in that frame).
    frame_index: np.ndarray | None = None
    filled: np.ndarray | None = None
    meta: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        for name in ARRAY_SHAPES:
            setattr(self, name, np.asarray(getattr(self, name), dtype=np.float32))
        t = len(self.body)
        self.frame_index = (
            np.arange(t, dtype=np.int64) if self.frame_index is None else np.asarray(self.frame_index, np.int64)
        )
        self.filled = np.zeros(t, bool) if self.filled is None else np.asarray(self.filled, bool)
        self.width, self.height, self.fps = int(self.width), int(self.height), float(self.fps)
        problem = _shape_problem(self)
        if problem:
            raise ValueError(f"invalid PoseSequence: {problem}")

    @classmethod
    def empty(cls, num_frames: int, width: int, height: int, fps: float) -> "PoseSequence":
        """All points missing (NaN coordinates, score 0)."""
        arrays = {}
        for name, shape in ARRAY_SHAPES.items():
            fill = np.nan if name in POINT_ARRAYS else 0.0
            arrays[name] = np.full((num_frames, *shape), fill, np.float32)
        return cls(**arrays, width=width, height=height, fps=fps)

    def __len__(self) -> int:
        return len(self.body)

    @property
    def num_frames(self) -> int:
        return len(self.body)

    @property
    def num_filled(self) -> int:
        return int(self.filled.sum())

    def arrays(self) -> dict[str, np.ndarray]:
        return {name: getattr(self, name) for name in ARRAY_SHAPES}

    def replace(self, **changes) -> "PoseSequence":
        return dataclasses.replace(self, **changes)

    def select(self, indices) -> "PoseSequence":
        """A sub-sequence (slice, index array or boolean mask) along the frame axis."""
        picked = {name: array[indices] for name, array in self.arrays().items()}
        return self.replace(**picked, frame_index=self.frame_index[indices], filled=self.filled[indices])

    def frame(self, t: int) -> dict[str, np.ndarray]:
        return {name: array[t] for name, array in self.arrays().items()}

    @classmethod
    def stack(cls, frames: list[dict[str, np.ndarray]], width: int, height: int, fps: float, **kwargs):
        arrays = {name: np.stack([f[name] for f in frames]) for name in ARRAY_SHAPES}
        return cls(**arrays, width=width, height=height, fps=fps, **kwargs)

    # ---- file format -------------------------------------------------------------------------

    def save(self, path) -> Path:
        """Write the `.npz` atomically: a temporary file in the same folder, then a rename."""
        path = Path(path)
        header = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "width": self.width,
                  "height": self.height, "fps": self.fps, "meta": self.meta}
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(f, header=np.array(json.dumps(header)), frame_index=self.frame_index,
                         filled=self.filled, **self.arrays())
            publish(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path

    @classmethod
    def load(cls, path) -> "PoseSequence":
        """Read and validate a file written by `save`; anything else raises `InputError`."""
        path = Path(path)
        if not path.is_file():
            raise InputError(f"{path}: no such pose file")
        try:
            with np.load(path, allow_pickle=False) as data:
                contents = {key: data[key] for key in data.files}
        except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
            raise InputError(f"{path}: not a readable pose file ({e})") from None
        try:
            header = json.loads(str(contents.pop("header")))
        except (KeyError, ValueError):
            raise InputError(f"{path}: not an svd-animate pose file (no header)") from None
        if not isinstance(header, dict) or header.get("format") != FORMAT_NAME:
            raise InputError(f"{path}: not an svd-animate pose file")
        if header.get("version") != FORMAT_VERSION:
            raise InputError(
                f"{path}: pose format version {header.get('version')} is not supported "
                f"(this svd-animate reads version {FORMAT_VERSION}); extract the poses again"
            )
        missing = [k for k in (*ARRAY_SHAPES, "frame_index", "filled") if k not in contents]
        if missing:
            raise InputError(f"{path}: corrupt pose file, missing {', '.join(missing)}")
        try:
            seq = cls(**{k: contents[k] for k in ARRAY_SHAPES}, frame_index=contents["frame_index"],
                      filled=contents["filled"], width=header["width"], height=header["height"],
                      fps=header["fps"], meta=header.get("meta") or {})
        except (KeyError, TypeError, ValueError) as e:
            raise InputError(f"{path}: corrupt pose file ({e})") from None
        return seq


def _shape_problem(seq: PoseSequence) -> str | None:
    t = len(seq.body)
    for name, shape in ARRAY_SHAPES.items():
        array = getattr(seq, name)
        if array.shape != (t, *shape):
            return f"{name} has shape {array.shape}, expected {(t, *shape)}"
        if name not in POINT_ARRAYS and not np.all((array >= 0) & np.isfinite(array)):
            return f"{name} holds negative or non-finite scores"
    if seq.frame_index.shape != (t,) or seq.filled.shape != (t,):
        return "frame_index/filled do not have one entry per frame"
    if seq.width <= 0 or seq.height <= 0:
        return f"frame size {seq.width}x{seq.height} is not positive"
    if not (np.isfinite(seq.fps) and seq.fps > 0):
        return f"fps {seq.fps} is not positive"
    return None
