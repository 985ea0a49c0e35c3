import numpy as np
import pytest

from pose.align import align, align_bones, apply_linear, bone_ratios, fit_linear, retarget_bones
from pose.skeleton import PoseSequence
from svd_common.errors import NoPersonError
from tests.helpers import make_pose

BASE = {
    0: (0.5, 0.2), 1: (0.5, 0.3), 2: (0.4, 0.3), 3: (0.4, 0.5), 4: (0.4, 0.7), 5: (0.6, 0.3), 6: (0.6, 0.5),
    7: (0.6, 0.7), 8: (0.45, 0.6), 9: (0.45, 0.75), 10: (0.45, 0.9), 11: (0.55, 0.6), 12: (0.55, 0.75),
    13: (0.55, 0.9), 14: (0.48, 0.18), 15: (0.52, 0.18), 16: (0.46, 0.19), 17: (0.54, 0.19),
}


def sequence(frames, width, height, filled=None):
    return PoseSequence.stack(frames, width, height, fps=10, filled=filled)


def test_linear_fit_recovers_hand_computed_map():
    # Reference 100x200 (W x H), driving frames 200x100: ref_y = 0.5 y + 0.1, ref_x = 2 x + 0.05.
    # a_x must be a_y * (fw/fh) * (H/W) = 0.5 * 2 * 2 = 2, which keeps pixels square.
    drv = {j: (x, y) for j, (x, y) in BASE.items()}
    ref = {j: (2 * x + 0.05, 0.5 * y + 0.1) for j, (x, y) in drv.items()}
    garbage = make_pose({j: (0.9, 0.01) for j in BASE})  # a filled-in frame: must not count
    driving = sequence([make_pose(drv), garbage, make_pose(drv)], 200, 100, filled=[False, True, False])
    reference = sequence([make_pose(ref)], 100, 200)
    a, b = fit_linear(driving, reference)
    np.testing.assert_allclose(a, [2.0, 0.5], atol=1e-5)
    np.testing.assert_allclose(b, [0.05, 0.1], atol=1e-5)


def test_unsure_driving_points_are_left_out_unless_published_mode():
    drv = dict(BASE)
    ref = {j: (x, 0.5 * y + 0.1) for j, (x, y) in drv.items()}
    frame = make_pose(drv)
    frame["body"][10] = (0.45, 0.1)  # a wrong ankle the detector was unsure of
    frame["body_score"][10] = 0.1
    driving = sequence([frame], 100, 100)
    reference = sequence([make_pose(ref)], 100, 100)
    a, b = fit_linear(driving, reference)
    np.testing.assert_allclose([a[1], b[1]], [0.5, 0.1], atol=1e-5)
    a_published, _ = fit_linear(driving, reference, threshold=None)
    assert abs(a_published[1] - 0.5) > 0.05  # the published fit takes the wrong ankle in


def test_only_reference_visible_joints_are_fitted():
    ref = {j: (x, 0.5 * y + 0.1) for j, (x, y) in BASE.items()}
    reference = sequence([make_pose(ref)], 100, 100)
    reference.body_score[0, 13] = 0.0  # the reference's left ankle is hidden
    reference.body[0, 13] = (0.0, 0.0)
    a, b = fit_linear(sequence([make_pose(BASE)], 100, 100), reference)
    np.testing.assert_allclose([a[1], b[1]], [0.5, 0.1], atol=1e-5)


def test_apply_linear_moves_body_hands_and_face_alike():
    frame = make_pose(BASE, hands=np.full((2, 21, 2), 0.5), face=np.full((68, 2), 0.25))
    out = apply_linear(sequence([frame], 200, 100), [2.0, 0.5], [0.05, 0.1], 100, 200)
    np.testing.assert_allclose(out.body[0, 1], [2 * 0.5 + 0.05, 0.5 * 0.3 + 0.1], atol=1e-6)
    np.testing.assert_allclose(out.hands[0, 1, 7], [1.05, 0.35], atol=1e-6)
    np.testing.assert_allclose(out.face[0, 3], [0.55, 0.225], atol=1e-6)
    assert (out.width, out.height) == (100, 200)


def test_reference_without_person_is_a_clear_error():
    reference = sequence([make_pose()], 100, 100)
    with pytest.raises(NoPersonError, match="reference image shows no usable body keypoints"):
        fit_linear(sequence([make_pose(BASE)], 100, 100), reference)


def _arm_driving():
    raised = dict(BASE)
    raised[3], raised[4] = (0.2, 0.3), (0.0, 0.3)  # right arm held out sideways, same lengths
    hands = np.full((2, 21, 2), np.nan, np.float32)
    hands[1, 0] = (0.0, 0.3)  # right-hand wrist point on the driving wrist
    hands[1, 12] = (-0.05, 0.3)  # a fingertip 0.05 further out
    second = make_pose(raised, hands=hands)
    return sequence([make_pose(BASE), second], 100, 100)


def _short_armed_reference():
    ref = dict(BASE)
    ref[3], ref[4] = (0.4, 0.4), (0.4, 0.5)  # upper arm and forearm half as long as the dancer's
    return sequence([make_pose(ref)], 100, 100)


def test_bone_retarget_keeps_angles_and_takes_reference_lengths():
    out = align_bones(_arm_driving(), _short_armed_reference())
    # Frame 0 hangs the arm down: exactly the reference arm.
    np.testing.assert_allclose(out.body[0, 3], [0.4, 0.4], atol=1e-5)
    np.testing.assert_allclose(out.body[0, 4], [0.4, 0.5], atol=1e-5)
    # Frame 1 holds it sideways: same direction, half-length bones from the same shoulder.
    np.testing.assert_allclose(out.body[1, 2], [0.4, 0.3], atol=1e-5)
    np.testing.assert_allclose(out.body[1, 3], [0.3, 0.3], atol=1e-5)
    np.testing.assert_allclose(out.body[1, 4], [0.2, 0.3], atol=1e-5)
    # The left arm, equal in both, does not move; the hand follows the wrist, scaled like the forearm.
    np.testing.assert_allclose(out.body[1, 7], BASE[7], atol=1e-5)
    np.testing.assert_allclose(out.hands[1, 1, 0], [0.2, 0.3], atol=1e-5)
    np.testing.assert_allclose(out.hands[1, 1, 12], [0.175, 0.3], atol=1e-5)
    assert np.isnan(out.hands[1, 0]).all()  # missing stays missing
    assert out.meta["align"]["method"] == "bones"


def test_bone_missing_in_reference_borrows_its_mirror():
    reference = _short_armed_reference()
    reference.body_score[0, 3] = 0.0  # right elbow hidden: right arm bones borrow the left arm's ratio
    driving = _arm_driving()
    px = driving.body.astype(np.float64) * 100
    ratios = bone_ratios(px, driving.body_score, reference.body[0] * 100, reference.body_score[0])
    assert ratios[(2, 3)] == pytest.approx(ratios[(5, 6)]) == pytest.approx(1.0)
    assert ratios[(1, 2)] == pytest.approx(1.0)


def test_retarget_bones_on_a_chain():
    # Neck at the origin, a 3-4-5 shoulder, elbow straight down: ratios 2 and 0.5.
    px = np.full((1, 18, 2), np.nan)
    px[0, 1], px[0, 2], px[0, 3] = (0, 0), (3, 4), (3, 10)
    ratios = {bone: 1.0 for bone in [(1, 0), (0, 14), (14, 16), (0, 15), (15, 17), (1, 2), (2, 3), (3, 4),
                                     (1, 5), (5, 6), (6, 7), (1, 8), (8, 9), (9, 10), (1, 11), (11, 12), (12, 13)]}
    ratios[(1, 2)], ratios[(2, 3)] = 2.0, 0.5
    out = retarget_bones(px, ratios)
    np.testing.assert_allclose(out[0, 2], [6, 8])
    np.testing.assert_allclose(out[0, 3], [6, 11])


def test_align_dispatch():
    driving, reference = _arm_driving(), _short_armed_reference()
    assert align(driving, reference, "none") is driving
    assert align(driving, reference, "ls").meta["align"]["method"] == "ls"
    with pytest.raises(ValueError, match="unknown alignment"):
        align(driving, reference, "magic")
