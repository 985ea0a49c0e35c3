"""Retarget driving poses onto the reference person. Pure functions on `PoseSequence`s.

`fit_linear` + `apply_linear` is the published method (MimicMotion / ControlNeXt-SVD-v2): one
least-squares line for y over every frame and every reference-visible keypoint, the same pixel
scale on x, and one map `p * a + b` for body, hands and face. It only rescales and moves the
dancer, so a character with shorter legs or a bigger head still gets the dancer's proportions.

`retarget_bones` follows it with a bone-length retarget: every bone keeps the driving motion's
direction (and its foreshortening relative to the dancer's typical length), takes the reference's
length, and the hands and face move and scale with their wrist and head.
"""

from __future__ import annotations

import numpy as np

from svd_common.errors import InvalidValue, NoPersonError

from .skeleton import PoseSequence

VISIBLE = 0.3
# OpenPose-18 joints the published fit uses: nose, neck, shoulders, hips, knees, ankles, eyes, ears.
FIT_JOINTS = (0, 1, 2, 5, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17)
# Kinematic tree rooted at the neck, parents before children.
BONES = (
    (1, 0), (0, 14), (14, 16), (0, 15), (15, 17),
    (1, 2), (2, 3), (3, 4), (1, 5), (5, 6), (6, 7),
    (1, 8), (8, 9), (9, 10), (1, 11), (11, 12), (12, 13),
)
# The same bone on the other side, used when the reference shows only one of the pair.
MIRROR = {(2, 3): (5, 6), (3, 4): (6, 7), (8, 9): (11, 12), (9, 10): (12, 13), (1, 2): (1, 5),
          (1, 8): (1, 11), (0, 14): (0, 15), (14, 16): (15, 17)}
MIRROR.update({v: k for k, v in list(MIRROR.items())})
HAND_WRIST_JOINT = (7, 4)  # hands[0] is the left hand (left wrist 7), hands[1] the right (4)
HAND_FOREARM = ((6, 7), (3, 4))
HEAD_BONES = ((1, 0), (0, 14), (0, 15))


def reference_fit_points(ref: PoseSequence, threshold: float = VISIBLE) -> np.ndarray:
    """The FIT_JOINTS visible in the reference's first frame (indices)."""
    score = ref.body_score[0]
    joints = [j for j in FIT_JOINTS if score[j] > threshold and not np.isnan(ref.body[0, j]).any()]
    if not joints:
        raise NoPersonError("the reference image shows no usable body keypoints")
    return np.asarray(joints)


def fit_linear(driving: PoseSequence, ref: PoseSequence, threshold: float | None = VISIBLE):
    """The published least-squares alignment: returns `(a, b)`, each (2,), so that `p * a + b` maps.

    y: a straight-line fit from driving y to reference y over all detected (not filled-in) frames and
    all reference-visible FIT_JOINTS. x: `a_x = a_y * (fw/fh) * (H/W)` keeps pixels square between the
    driving frame (fw x fh) and the reference (W x H); `b_x` is the mean residual. The published code
    also fits driving points the detector was unsure of; `threshold` (default 0.3) leaves those out,
    `threshold=None` keeps them as published.
    """
    joints = reference_fit_points(ref)
    ref_points = ref.body[0, joints]
    frames = ~driving.filled
    drv = driving.body[frames][:, joints]  # (T', J, 2)
    keep = ~np.isnan(drv).any(axis=-1)
    if threshold is not None:
        keep &= driving.body_score[frames][:, joints] > threshold
    if keep.sum() < 2:
        raise NoPersonError("too few driving keypoints match the reference to fit an alignment")
    target = np.broadcast_to(ref_points, drv.shape)
    dy, ry = drv[..., 1][keep].astype(np.float64), target[..., 1][keep].astype(np.float64)
    dx, rx = drv[..., 0][keep].astype(np.float64), target[..., 0][keep].astype(np.float64)
    if np.ptp(dy) == 0:
        raise NoPersonError("the driving keypoints do not span any height; cannot fit an alignment")
    a_y, b_y = np.polyfit(dy, ry, 1)
    a_x = a_y * (driving.width / driving.height) * (ref.height / ref.width)
    b_x = np.mean(rx - a_x * dx)
    return np.array([a_x, a_y]), np.array([b_x, b_y])


def apply_linear(seq: PoseSequence, a, b, width: int, height: int) -> PoseSequence:
    """`p * a + b` on body, hands and face; the result lives in a `width` x `height` frame."""
    a = np.asarray(a, np.float32)
    b = np.asarray(b, np.float32)
    return seq.replace(body=seq.body * a + b, hands=seq.hands * a + b, face=seq.face * a + b,
                       width=width, height=height)


def align_linear(driving: PoseSequence, ref: PoseSequence, threshold: float | None = VISIBLE):
    a, b = fit_linear(driving, ref, threshold)
    aligned = apply_linear(driving, a, b, ref.width, ref.height)
    aligned.meta = {**driving.meta, "align": {"method": "ls", "a": a.tolist(), "b": b.tolist()}}
    return aligned


def _to_pixels(points: np.ndarray, width: int, height: int) -> np.ndarray:
    return points.astype(np.float64) * (width, height)


def bone_ratios(driving_px: np.ndarray, driving_score: np.ndarray, ref_px: np.ndarray,
                ref_score: np.ndarray, threshold: float = VISIBLE) -> dict[tuple[int, int], float]:
    """Reference length / typical (median) driving length for every bone, both in the same pixels.

    A bone the reference does not show borrows its mirror's ratio, else the median of all ratios.
    """
    ratios = {}
    for parent, child in BONES:
        ok = (driving_score[:, parent] > threshold) & (driving_score[:, child] > threshold)
        lengths = np.linalg.norm(driving_px[ok, child] - driving_px[ok, parent], axis=-1)
        lengths = lengths[np.isfinite(lengths) & (lengths > 0)]
        ref_ok = ref_score[parent] > threshold and ref_score[child] > threshold
        ref_len = np.linalg.norm(ref_px[child] - ref_px[parent]) if ref_ok else np.nan
        if len(lengths) and np.isfinite(ref_len) and ref_len > 0:
            ratios[(parent, child)] = float(ref_len / np.median(lengths))
    known = list(ratios.values())
    fallback = float(np.median(known)) if known else 1.0
    for bone in BONES:
        if bone not in ratios:
            ratios[bone] = ratios.get(MIRROR.get(bone), fallback)
    return ratios


def retarget_bones(driving_px: np.ndarray, ratios: dict[tuple[int, int], float]) -> np.ndarray:
    """New body joint positions (T, 18, 2): the root (neck) stays, every bone is rescaled by its ratio.

    A joint whose parent is missing (NaN) keeps its own position.
    """
    out = driving_px.copy()
    for parent, child in BONES:
        vector = driving_px[:, child] - driving_px[:, parent]
        moved = out[:, parent] + ratios[(parent, child)] * vector
        out[:, child] = np.where(np.isnan(moved), driving_px[:, child], moved)
    return out


def _move_and_scale(points: np.ndarray, old_anchor: np.ndarray, new_anchor: np.ndarray, scale) -> np.ndarray:
    """Points (T, N, 2) translated with their anchor (T, 2) and scaled about it."""
    moved = new_anchor[:, None] + np.asarray(scale).reshape(-1, 1, 1) * (points - old_anchor[:, None])
    return np.where(np.isnan(new_anchor[:, None]) | np.isnan(old_anchor[:, None]), points, moved)


def align_bones(driving: PoseSequence, ref: PoseSequence, fit_threshold: float | None = VISIBLE,
                threshold: float = VISIBLE) -> PoseSequence:
    """The published alignment, then each bone rescaled to the reference's length (bones from
    keypoints above `threshold`)."""
    linear = align_linear(driving, ref, fit_threshold)
    w, h = ref.width, ref.height
    body = _to_pixels(linear.body, w, h)
    ref_body = _to_pixels(ref.body[0], w, h)
    ratios = bone_ratios(body, linear.body_score, ref_body, ref.body_score[0], threshold)
    new_body = retarget_bones(body, ratios)

    hands = _to_pixels(linear.hands, w, h)
    for side, (wrist, forearm) in enumerate(zip(HAND_WRIST_JOINT, HAND_FOREARM)):
        hands[:, side] = _move_and_scale(hands[:, side], body[:, wrist], new_body[:, wrist], ratios[forearm])
    head_scale = float(np.mean([ratios[b] for b in HEAD_BONES]))
    face = _move_and_scale(_to_pixels(linear.face, w, h), body[:, 0], new_body[:, 0], head_scale)

    aligned = linear.replace(body=new_body / (w, h), hands=hands / (w, h), face=face / (w, h))
    aligned.meta = {**linear.meta, "align": {**linear.meta["align"], "method": "bones",
                                             "bone_ratios": {f"{p}-{c}": r for (p, c), r in ratios.items()}}}
    return aligned


ALIGN_METHODS = {"ls": align_linear, "bones": align_bones}


def align(driving: PoseSequence, ref: PoseSequence, method: str = "ls",
          fit_threshold: float | None = VISIBLE) -> PoseSequence:
    """`fit_threshold=None` fits every driving keypoint whatever its score, as published
    (ControlNeXt-SVD-v2 `dwpose/preprocess.py`, `get_video_pose`)."""
    if method == "none":
        return driving
    if method not in ALIGN_METHODS:
        raise InvalidValue(f"unknown alignment {method!r}; choose ls, bones or none")
    return ALIGN_METHODS[method](driving, ref, fit_threshold)
