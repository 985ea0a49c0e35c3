"""Skeleton images in the DWPose/OpenPose convention the published SVD pose weights were trained on.

Facts (see shared/compat/pose_formats.md): 17 limbs as filled ellipses (half-width 4) on a canvas
whose short side is 2160 px, limb colour x score product, limbs skipped under score 0.3, the limb
layer then x0.6; joints as radius-4 dots; 20 hand bones as 2-px HSV-rainbow lines and radius-4 hand
dots; 68 face dots of radius 3; canvas resized to the target with OpenCV's default (bilinear).
The published code draws the palette into a canvas it treats as BGR and converts to RGB at the end;
we write the swapped colours directly into an RGB canvas, which gives the same pixels.

Two exact shortcuts make it fast: limbs overwrite each other and the background is zero, so drawing
each limb with its colour already x0.6 equals scaling the whole canvas afterwards; and no colour
conversion pass is needed.
"""

from __future__ import annotations

import colorsys
import math
from concurrent.futures import ThreadPoolExecutor
from typing import Iterable, Iterator

import cv2
import numpy as np

from .skeleton import PoseSequence

WORKING_SHORT_SIDE = 2160
STICK_HALF_WIDTH = 4
BODY_THRESHOLD = 0.3
LIMB_LAYER_GAIN = 0.6
EPS = 0.01

# Limbs as 0-based OpenPose-18 joint pairs, in drawing order.
LIMBS = tuple((a - 1, b - 1) for a, b in (
    (2, 3), (2, 6), (3, 4), (4, 5), (6, 7), (7, 8), (2, 9), (9, 10), (10, 11), (2, 12), (12, 13),
    (13, 14), (2, 1), (1, 15), (15, 17), (1, 16), (16, 18),
))
# The palette as the published code writes it into its BGR-treated canvas.
PALETTE = (
    (255, 0, 0), (255, 85, 0), (255, 170, 0), (255, 255, 0), (170, 255, 0), (85, 255, 0), (0, 255, 0),
    (0, 255, 85), (0, 255, 170), (0, 255, 255), (0, 170, 255), (0, 85, 255), (0, 0, 255), (85, 0, 255),
    (170, 0, 255), (255, 0, 255), (255, 0, 170), (255, 0, 85),
)
HAND_EDGES = (
    (0, 1), (1, 2), (2, 3), (3, 4), (0, 5), (5, 6), (6, 7), (7, 8), (0, 9), (9, 10), (10, 11), (11, 12),
    (0, 13), (13, 14), (14, 15), (15, 16), (0, 17), (17, 18), (18, 19), (19, 20),
)
HAND_EDGE_RGB = tuple(colorsys.hsv_to_rgb(i / len(HAND_EDGES), 1.0, 1.0) for i in range(len(HAND_EDGES)))


def output_rgb(bgr_colour) -> tuple:
    """The RGB colour that a colour written into the published BGR canvas ends up as."""
    return tuple(bgr_colour[::-1])


def _saturate(value: float) -> int:
    return min(int(value), 255)


def working_size(height: int, width: int, short_side: int = WORKING_SHORT_SIDE) -> tuple[int, int]:
    scale = short_side / min(height, width) if min(height, width) != short_side else 1
    return int(height * scale), int(width * scale)


def draw_body(canvas: np.ndarray, body: np.ndarray, score: np.ndarray) -> None:
    height, width = canvas.shape[:2]
    for (j0, j1), colour in zip(LIMBS, PALETTE):
        s0, s1 = score[j0], score[j1]
        if s0 < BODY_THRESHOLD or s1 < BODY_THRESHOLD or np.isnan(body[[j0, j1]]).any():
            continue
        xs = body[[j0, j1], 0] * float(width)
        ys = body[[j0, j1], 1] * float(height)
        length = math.hypot(xs[0] - xs[1], ys[0] - ys[1])
        angle = math.degrees(math.atan2(ys[0] - ys[1], xs[0] - xs[1]))
        polygon = cv2.ellipse2Poly((int(xs.mean()), int(ys.mean())), (int(length / 2), STICK_HALF_WIDTH),
                                   int(angle), 0, 360, 1)
        limb = [int(_saturate(c * s0 * s1) * LIMB_LAYER_GAIN) for c in output_rgb(colour)]
        cv2.fillConvexPoly(canvas, polygon, limb)
    for joint, colour in enumerate(PALETTE):
        s = score[joint]
        if not s > BODY_THRESHOLD or np.isnan(body[joint]).any():
            continue
        centre = (int(body[joint, 0] * width), int(body[joint, 1] * height))
        cv2.circle(canvas, centre, 4, [_saturate(c * s) for c in output_rgb(colour)], thickness=-1)


def draw_hands(canvas: np.ndarray, hands: np.ndarray, scores: np.ndarray) -> None:
    height, width = canvas.shape[:2]
    for points, score in zip(hands, scores):
        present = ~np.isnan(points).any(axis=1)
        pixels = np.zeros((len(points), 2), np.int64)
        pixels[present] = (points[present] * (width, height)).astype(np.int64)
        for (a, b), rgb in zip(HAND_EDGES, HAND_EDGE_RGB):
            if not (present[a] and present[b]) or not (pixels[[a, b]] > EPS).all():
                continue
            gain = int(score[a] * score[b] * 255)
            cv2.line(canvas, tuple(map(int, pixels[a])), tuple(map(int, pixels[b])),
                     [c * gain for c in output_rgb(rgb)], thickness=2)
        for (x, y), ok, s in zip(pixels, present, score):
            if ok and x > EPS and y > EPS:
                cv2.circle(canvas, (int(x), int(y)), 4, output_rgb((0, 0, int(s * 255))), thickness=-1)


def draw_face(canvas: np.ndarray, face: np.ndarray, score: np.ndarray) -> None:
    height, width = canvas.shape[:2]
    for point, s in zip(face, score):
        if np.isnan(point).any():
            continue
        x, y = int(point[0] * width), int(point[1] * height)
        if x > EPS and y > EPS:
            grey = int(s * 255)
            cv2.circle(canvas, (x, y), 3, (grey, grey, grey), thickness=-1)


def draw_pose(frame: dict, height: int, width: int, short_side: int = WORKING_SHORT_SIDE) -> np.ndarray:
    """One frame's pose (`PoseSequence.frame(t)`) as an RGB uint8 image of `height` x `width`."""
    canvas = np.zeros((*working_size(height, width, short_side), 3), np.uint8)
    draw_body(canvas, frame["body"], frame["body_score"])
    draw_hands(canvas, frame["hands"], frame["hands_score"])
    draw_face(canvas, frame["face"], frame["face_score"])
    if canvas.shape[:2] == (height, width):
        return canvas
    return cv2.resize(canvas, (width, height))


def render_sequence(seq: PoseSequence, height: int | None = None, width: int | None = None,
                    workers: int = 2) -> Iterator[np.ndarray]:
    """Skeleton images for every frame, in order, drawn on `workers` threads (OpenCV frees the GIL)."""
    height = height or seq.height
    width = width or seq.width
    frames: Iterable[int] = range(len(seq))
    if workers <= 1:
        for t in frames:
            yield draw_pose(seq.frame(t), height, width)
        return
    with ThreadPoolExecutor(workers) as pool:
        # Bounded look-ahead keeps memory flat for long sequences.
        pending = []
        for t in frames:
            pending.append(pool.submit(draw_pose, seq.frame(t), height, width))
            if len(pending) >= 2 * workers:
                yield pending.pop(0).result()
        for future in pending:
            yield future.result()
