import colorsys
import math

import cv2
import numpy as np
import pytest

from pose.render import LIMBS, PALETTE, draw_pose, render_sequence, working_size
from pose.skeleton import PoseSequence
from tests.helpers import make_pose


def published_reference(pose, height, width):
    """The published drawing written plainly from the facts in pose_formats.md: BGR-treated canvas,
    limbs, whole canvas x0.6, joints, hands, face, resize, BGR->RGB. Our fast path must equal it."""
    scale = 2160 / min(height, width) if min(height, width) != 2160 else 1
    canvas = np.zeros((int(height * scale), int(width * scale), 3), np.uint8)
    ch, cw = canvas.shape[:2]
    body, score = pose["body"], pose["body_score"]
    for (a, b), colour in zip(LIMBS, PALETTE):
        if score[a] < 0.3 or score[b] < 0.3:
            continue
        x, y = body[[a, b], 0] * cw, body[[a, b], 1] * ch
        length = ((x[0] - x[1]) ** 2 + (y[0] - y[1]) ** 2) ** 0.5
        angle = math.degrees(math.atan2(y[0] - y[1], x[0] - x[1]))
        poly = cv2.ellipse2Poly((int(x.mean()), int(y.mean())), (int(length / 2), 4), int(angle), 0, 360, 1)
        cv2.fillConvexPoly(canvas, poly, [int(c * score[a] * score[b]) for c in colour])
    canvas = (canvas * 0.6).astype(np.uint8)
    for j, colour in enumerate(PALETTE):
        if score[j] > 0.3:
            cv2.circle(canvas, (int(body[j, 0] * cw), int(body[j, 1] * ch)), 4,
                       [int(c * score[j]) for c in colour], thickness=-1)
    edges = [(0, 1), (1, 2), (2, 3), (3, 4), (0, 5), (5, 6), (6, 7), (7, 8), (0, 9), (9, 10), (10, 11), (11, 12),
             (0, 13), (13, 14), (14, 15), (15, 16), (0, 17), (17, 18), (18, 19), (19, 20)]
    for peaks, scores in zip(pose["hands"], pose["hands_score"]):
        for i, (a, b) in enumerate(edges):
            x1, y1 = int(peaks[a, 0] * cw), int(peaks[a, 1] * ch)
            x2, y2 = int(peaks[b, 0] * cw), int(peaks[b, 1] * ch)
            gain = int(scores[a] * scores[b] * 255)
            if x1 > 0.01 and y1 > 0.01 and x2 > 0.01 and y2 > 0.01:
                cv2.line(canvas, (x1, y1), (x2, y2), np.array(colorsys.hsv_to_rgb(i / 20, 1, 1)) * gain, thickness=2)
        for (x, y), s in zip(peaks, scores):
            x, y = int(x * cw), int(y * ch)
            if x > 0.01 and y > 0.01:
                cv2.circle(canvas, (x, y), 4, (0, 0, int(s * 255)), thickness=-1)
    for (x, y), s in zip(pose["face"], pose["face_score"]):
        x, y = int(x * cw), int(y * ch)
        if x > 0.01 and y > 0.01:
            cv2.circle(canvas, (x, y), 3, (int(s * 255),) * 3, thickness=-1)
    return cv2.cvtColor(cv2.resize(canvas, (width, height)), cv2.COLOR_BGR2RGB)


def random_pose(seed):
    rng = np.random.default_rng(seed)
    pose = make_pose({j: rng.uniform(0.15, 0.85, 2) for j in range(18)})
    pose["body_score"][:] = rng.uniform(0.1, 1.0, 18)
    pose["hands"][:] = rng.uniform(0.2, 0.8, (2, 21, 2))
    pose["hands_score"][:] = rng.uniform(0.0, 1.0, (2, 21))
    pose["face"][:] = rng.uniform(0.3, 0.6, (68, 2))
    pose["face_score"][:] = rng.uniform(0.0, 1.0, 68)
    return pose


@pytest.mark.parametrize("height, width", [(1024, 576), (576, 1024), (512, 512), (2160, 3840)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_equals_published_drawing(height, width, seed):
    pose = random_pose(seed)
    np.testing.assert_array_equal(draw_pose(pose, height, width), published_reference(pose, height, width))


def test_working_size():
    assert working_size(1024, 576) == (3840, 2160)
    assert working_size(576, 1024) == (2160, 3840)
    assert working_size(2160, 2160) == (2160, 2160)


def test_limb_and_joint_pixels_at_working_size():
    # At 2160x2160 nothing is resized, so pixels are exactly what was drawn.
    pose = make_pose({1: (0.5, 0.25), 2: (0.5, 0.75)})  # neck above the right shoulder, vertical limb
    image = draw_pose(pose, 2160, 2160)
    # Limb 0 joins neck and right shoulder; palette (255, 0, 0) lands as blue in RGB, x0.6 = 153.
    assert image[1080, 1080].tolist() == [0, 0, 153]
    assert image[1080, 1080 + 3].tolist() == [0, 0, 153]  # inside the half-width of 4
    assert image[1080, 1080 + 6].tolist() == [0, 0, 0]  # outside it
    # Joint dots (radius 4) in their own colour at full strength: neck (255, 85, 0) -> RGB (0, 85, 255).
    assert image[540, 1080].tolist() == [0, 85, 255]
    assert image[1620, 1080].tolist() == [0, 170, 255]  # right shoulder (255, 170, 0)
    assert image[100, 100].tolist() == [0, 0, 0]


def test_score_scales_colour_and_low_scores_are_skipped():
    pose = make_pose({1: (0.5, 0.25), 2: (0.5, 0.75)}, body_score=0.5)
    image = draw_pose(pose, 2160, 2160)
    assert image[1080, 1080].tolist() == [0, 0, int(int(255 * 0.25) * 0.6)]
    pose["body_score"][2] = 0.29
    image = draw_pose(pose, 2160, 2160)
    assert image[1080, 1080].tolist() == [0, 0, 0]  # limb skipped
    assert image[1620, 1080].tolist() == [0, 0, 0]  # joint skipped


def test_hand_and_face_colours():
    pose = make_pose()
    hand = np.full((21, 2), np.nan, np.float32)
    hand[0], hand[1] = (0.25, 0.5), (0.75, 0.5)  # first bone, horizontal
    pose["hands"][0] = hand
    pose["hands_score"][0] = 1.0
    pose["face"][0] = (0.5, 0.9)
    pose["face_score"][0] = 0.5
    image = draw_pose(pose, 2160, 2160)
    # Bone 0 has hue 0: HSV red written into the BGR canvas comes out blue.
    assert image[1080, 1080].tolist() == [0, 0, 255]
    # Hand points: (0, 0, score) in BGR -> red dots.
    assert image[1080, 540].tolist() == [255, 0, 0]
    grey = int(0.5 * 255)
    assert image[int(0.9 * 2160), 1080].tolist() == [grey, grey, grey]


def test_missing_points_are_not_drawn():
    pose = make_pose()
    assert draw_pose(pose, 256, 256).max() == 0


def test_scores_above_one_saturate():
    pose = make_pose({1: (0.5, 0.25), 2: (0.5, 0.75)}, body_score=1.3)
    image = draw_pose(pose, 2160, 2160)
    assert image[1080, 1080].tolist() == [0, 0, 153]
    pose["hands"][:] = 0  # points at the origin are skipped by both
    pose["face"][:] = 0
    np.testing.assert_array_equal(draw_pose(pose, 2160, 2160), published_reference(pose, 2160, 2160))


def test_render_sequence_keeps_order():
    frames = [random_pose(s) for s in range(7)]
    seq = PoseSequence.stack(frames, 576, 1024, 10)
    threaded = list(render_sequence(seq, 256, 144, workers=3))
    assert len(threaded) == 7
    for frame, image in zip(frames, threaded):
        np.testing.assert_array_equal(image, draw_pose(frame, 256, 144))
    assert threaded[0].shape == (256, 144, 3)
