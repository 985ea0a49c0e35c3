import numpy as np
import pytest

from pose.detect.mediapipe import FACE68_FROM_MESH, MediaPipeDetector, holistic_to_openpose
from pose.extract import ExtractSettings, detect_reference, extract_video


def test_holistic_mapping_hand_computed():
    pose_xy = np.stack([np.arange(33), 100 + np.arange(33)], axis=1) / 1000
    visibility = np.linspace(0.0, 1.0, 33)
    mesh = np.stack([np.arange(468), np.arange(468)], axis=1) / 1000
    left, right = np.full((21, 2), 0.25), np.full((21, 2), 0.75)
    pose = holistic_to_openpose(pose_xy, visibility, left, None, mesh)
    for op, mp_index in {0: 0, 2: 12, 4: 16, 5: 11, 7: 15, 8: 24, 10: 28, 11: 23, 13: 27, 14: 5, 15: 2,
                         16: 8, 17: 7}.items():
        np.testing.assert_allclose(pose["body"][op], pose_xy[mp_index], rtol=1e-6)
        assert pose["body_score"][op] == pytest.approx(visibility[mp_index])
    np.testing.assert_allclose(pose["body"][1], (pose_xy[11] + pose_xy[12]) / 2, rtol=1e-6)
    assert pose["body_score"][1] == pytest.approx(visibility[11])  # the less visible shoulder
    np.testing.assert_allclose(pose["face"][0], mesh[162], rtol=1e-6)
    np.testing.assert_allclose(pose["face"][30], mesh[4], rtol=1e-6)  # nose tip
    assert (pose["hands_score"][0] == 1).all() and (pose["hands"][0] == 0.25).all()
    assert np.isnan(pose["hands"][1]).all() and (pose["hands_score"][1] == 0).all()


def test_face_table_is_68_distinct_mesh_points():
    assert len(FACE68_FROM_MESH) == 68 == len(set(FACE68_FROM_MESH))
    assert max(FACE68_FROM_MESH) < 468


@pytest.fixture(scope="module")
def reference_pose(shared_data):
    with MediaPipeDetector() as detector:
        seq, image = detect_reference(shared_data / "ref_controlnext_v2_01.jpeg", detector)
    return seq, image


def test_real_reference_body_hands_and_face(reference_pose):
    seq, image = reference_pose
    assert (seq.width, seq.height) == (image.shape[1], image.shape[0]) == (1200, 2140)
    body, score = seq.body[0], seq.body_score[0]
    assert (score[[0, 1, 2, 5]] > 0.5).all()  # nose, neck, shoulders
    assert body[2, 0] < body[5, 0]  # the person's right shoulder is on the image's left (facing us)
    # Holistic's "left" hand is the person's left: its wrist point sits on the body's left wrist (7).
    assert np.linalg.norm(seq.hands[0, 0, 0] - body[7]) < 0.03
    assert np.linalg.norm(seq.hands[0, 1, 0] - body[4]) < 0.03
    face = seq.face[0]
    assert face[0, 0] < face[8, 0] < face[16, 0]  # jaw runs from the image-left side to the right
    assert face[8, 1] > face[30, 1] > face[27, 1]  # chin below the nose tip, tip below the bridge
    assert face[36, 0] < face[39, 0] < face[42, 0] < face[45, 0]  # eye corners left to right
    assert face[48, 1] > face[33, 1]  # mouth below the nose
    assert (face[:, 1] < body[1, 1]).all()  # the whole face above the neck
    nose = body[0]
    assert np.linalg.norm(face[30] - nose) < 0.03  # face nose tip on the body's nose


def test_real_clip_extraction(shared_data):
    with MediaPipeDetector() as detector:
        result = extract_video(shared_data / "driving_controlnext_v2_01.mp4", detector,
                               ExtractSettings(stride=4, max_frames=10), progress=False)
    poses = result.poses
    assert len(poses) == 10 and poses.frame_index.tolist() == list(range(0, 40, 4))
    assert poses.num_filled == 0
    assert (poses.width, poses.height) == (576, 1024) and poses.fps == pytest.approx(29 / 4, rel=0.01)
    assert (poses.body_score[:, [0, 1, 2, 5]] > 0.5).all()
    assert (np.abs(np.diff(poses.body[:, 1], axis=0)) < 0.1).all()  # the neck moves smoothly
