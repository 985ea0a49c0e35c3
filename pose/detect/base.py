"""The one small interface every pose backend implements, and box tracking shared by them."""

from __future__ import annotations

import abc

import numpy as np

from ..skeleton import ARRAY_SHAPES, POINT_ARRAYS


def empty_pose() -> dict[str, np.ndarray]:
    """One frame with every point missing (NaN, score 0), in `PoseSequence.frame` layout."""
    return {name: np.full(shape, np.nan if name in POINT_ARRAYS else 0.0, np.float32)
            for name, shape in ARRAY_SHAPES.items()}


class PoseDetector(abc.ABC):
    """Turns RGB images into one person's whole-body pose, following that person across a video.

    `detect` returns the tracked person's pose (normalised coordinates, `PoseSequence.frame` layout)
    or None when nobody is found. `reset` starts a new video (forgets the tracked person).
    """

    name: str = "base"
    people_seen: int | None = None  # people found by the last `detect` (None: the backend sees one person only)

    @abc.abstractmethod
    def settings(self) -> dict:
        """Everything that changes the output, for the pose cache key."""

    @abc.abstractmethod
    def detect(self, image: np.ndarray) -> dict[str, np.ndarray] | None:
        ...

    def detect_image(self, image: np.ndarray) -> dict[str, np.ndarray] | None:
        """A single still image (no tracking from earlier frames)."""
        self.reset()
        try:
            return self.detect(image)
        finally:
            self.reset()

    def reset(self) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


def box_area(boxes: np.ndarray) -> np.ndarray:
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    return np.clip(boxes[:, 2] - boxes[:, 0], 0, None) * np.clip(boxes[:, 3] - boxes[:, 1], 0, None)


def box_iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    x0 = np.maximum(box[0], boxes[:, 0])
    y0 = np.maximum(box[1], boxes[:, 1])
    x1 = np.minimum(box[2], boxes[:, 2])
    y1 = np.minimum(box[3], boxes[:, 3])
    inter = np.clip(x1 - x0, 0, None) * np.clip(y1 - y0, 0, None)
    union = box_area(box)[0] + box_area(boxes) - inter
    return np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0)


def choose_box(boxes: np.ndarray, previous: np.ndarray | None) -> int | None:
    """Which person to follow: the largest box at first, then the one overlapping the previous most
    (nearest centre when none overlaps), so the subject is kept when another person walks in."""
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    if len(boxes) == 0:
        return None
    if previous is None:
        return int(np.argmax(box_area(boxes)))
    overlap = box_iou(np.asarray(previous, np.float64), boxes)
    if overlap.max() > 0:
        return int(np.argmax(overlap))
    centres = (boxes[:, :2] + boxes[:, 2:]) / 2
    previous_centre = (np.asarray(previous[:2]) + np.asarray(previous[2:])) / 2
    return int(np.argmin(np.linalg.norm(centres - previous_centre, axis=1)))
