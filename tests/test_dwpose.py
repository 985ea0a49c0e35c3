import numpy as np
import pytest

from pose.detect import load_detector
from pose.detect.base import choose_box
from pose.detect.dwpose import (DETECTOR_FILE, POSE_FILE, DWPoseDetector, box_to_centre_scale, decode_simcc,
                                find_weights, letterbox, nms, person_boxes, wholebody_to_openpose)
from svd_common.errors import InputError, WeightsError
from tests.helpers import build_pose_graph, build_yolox_graph, yolox_output


@pytest.fixture
def weights_dir(tmp_path):
    """Tiny graphs in place of yolox_l.onnx / dw-ll_ucoco_384.onnx: one big and one small person."""
    folder = tmp_path / "dwpose"
    folder.mkdir()
    build_yolox_graph(folder / DETECTOR_FILE, yolox_output([(250, 100, 350, 400), (500, 300, 560, 420)]))
    build_pose_graph(folder / POSE_FILE)
    return folder


def test_letterbox_pads_bottom_right_with_114():
    image = np.full((320, 480, 3), 7, np.uint8)
    blob, ratio = letterbox(image)
    assert ratio == pytest.approx(640 / 480)
    assert blob.shape == (3, 640, 640) and blob.dtype == np.float32
    assert blob[:, 425, 10].tolist() == [7, 7, 7]  # int(320 * 4/3) = 426 rows of image
    assert blob[:, 426, 10].tolist() == [114, 114, 114]


def test_decode_simcc_hand_computed():
    simcc_x = np.zeros((2, 576), np.float32)
    simcc_y = np.zeros((2, 768), np.float32)
    simcc_x[0, 10], simcc_y[0, 7] = 0.9, 0.8
    simcc_x[1] -= 0.5  # no positive response: location -1 before the split
    simcc_y[1] -= 0.5
    locs, scores = decode_simcc(simcc_x, simcc_y)
    np.testing.assert_allclose(locs[0], [5.0, 3.5])
    assert scores[0] == pytest.approx(0.8)  # the smaller of the two maxima
    np.testing.assert_allclose(locs[1], [-0.5, -0.5])
    assert scores[1] == pytest.approx(-0.5)


def test_wholebody_to_openpose_mapping():
    keypoints = np.stack([np.arange(133.0), 1000 + np.arange(133.0)], axis=1)  # point i at (i, 1000 + i)
    scores = np.full(133, 0.9)
    pose = wholebody_to_openpose(keypoints, scores, width=1000, height=2000)
    expected_coco = {0: 0, 2: 6, 3: 8, 4: 10, 5: 5, 6: 7, 7: 9, 8: 12, 9: 14, 10: 16, 11: 11, 12: 13, 13: 15,
                     14: 2, 15: 1, 16: 4, 17: 3}
    for op, coco in expected_coco.items():
        np.testing.assert_allclose(pose["body"][op], [coco / 1000, (1000 + coco) / 2000], rtol=1e-6)
    np.testing.assert_allclose(pose["body"][1], [5.5 / 1000, 1005.5 / 2000], rtol=1e-6)  # neck
    assert pose["body_score"][1] == 1.0
    np.testing.assert_allclose(pose["face"][0], [23 / 1000, 1023 / 2000], rtol=1e-6)
    np.testing.assert_allclose(pose["face"][67], [90 / 1000, 1090 / 2000], rtol=1e-6)
    np.testing.assert_allclose(pose["hands"][0, 0], [91 / 1000, 1091 / 2000], rtol=1e-6)  # left hand
    np.testing.assert_allclose(pose["hands"][1, 20], [132 / 1000, 1132 / 2000], rtol=1e-6)  # right hand
    scores[6] = 0.2
    assert wholebody_to_openpose(keypoints, scores, 1000, 2000)["body_score"][1] == 0.0


def test_nms_keeps_the_best_of_overlapping_boxes():
    boxes = np.array([[0, 0, 10, 10], [1, 1, 11, 11], [50, 50, 60, 60]], np.float64)
    assert nms(boxes, np.array([0.8, 0.9, 0.5])) == [1, 2]


def test_person_boxes_decodes_filters_and_unletterboxes():
    raw = yolox_output([(100, 80, 300, 560)])[0]
    low = yolox_output([(400, 100, 500, 300)], obj=0.5, cls=0.5)[0]  # 0.25: above 0.1, below 0.3
    raw = np.maximum(raw, low)
    other = yolox_output([(400, 400, 500, 600)])[0]
    other[..., 5], other[..., 7] = other[..., 7], other[..., 5]  # a confident non-person (class 2)
    raw = np.where(other[:, 4:5] > 0, other, raw)
    boxes, scores = person_boxes(raw, ratio=0.5)
    np.testing.assert_allclose(boxes, [[200, 160, 600, 1120]], atol=1e-3)
    np.testing.assert_allclose(scores, [0.81], atol=1e-6)


def test_box_padding_and_aspect():
    centre, scale = box_to_centre_scale([250, 100, 350, 400], input_wh=(288, 384))
    np.testing.assert_allclose(centre, [300, 250])
    np.testing.assert_allclose(scale, [375 * 0.75, 375])  # 1.25 x height, width widened to 3:4


def test_choose_box_follows_one_person():
    big, small, far = [0, 0, 100, 200], [150, 0, 200, 80], [400, 0, 450, 90]
    assert choose_box(np.array([small, big]), None) == 1  # largest first
    assert choose_box(np.array([big, small]), previous=np.array([148, 2, 198, 82])) == 1  # overlap wins
    assert choose_box(np.array([big, far]), previous=np.array([380, 0, 420, 80])) == 1  # else nearest
    assert choose_box(np.zeros((0, 4)), None) is None


def test_detector_end_to_end_on_tiny_graphs(weights_dir):
    detector = DWPoseDetector.from_pretrained(weights_dir, download=False)
    image = np.zeros((480, 640, 3), np.uint8)
    image[199:202, 299:302] = 255  # the person in the big box (250..350 x 100..400)
    image[350:353, 520:523] = 255  # someone in the small box: must not be picked
    pose = detector.detect(image)
    # Every keypoint of the tiny model lands on the brightest point of the crop: the dot, +-2 px.
    np.testing.assert_allclose(pose["body"][0] * (640, 480), [300, 200], atol=2)
    np.testing.assert_allclose(pose["hands"][1, 5] * (640, 480), [300, 200], atol=2)
    assert pose["body_score"][0] > 0
    assert detector.settings()["files"] == [DETECTOR_FILE, POSE_FILE]


def test_detector_with_letterbox_ratio(weights_dir):
    # A 960x1280 image is shrunk by 0.5 into the letterbox, so the planted box covers 500..700 x 200..800.
    detector = DWPoseDetector.from_pretrained(weights_dir, download=False)
    image = np.zeros((960, 1280, 3), np.uint8)
    image[500:504, 600:604] = 255
    pose = detector.detect(image)
    np.testing.assert_allclose(pose["body"][0] * (1280, 960), [601.5, 501.5], atol=3)


def test_no_person_box_means_no_pose(tmp_path):
    folder = tmp_path / "empty"
    folder.mkdir()
    build_yolox_graph(folder / DETECTOR_FILE, yolox_output([]))
    build_pose_graph(folder / POSE_FILE)
    detector = DWPoseDetector.from_pretrained(folder, download=False)
    assert detector.detect(np.zeros((64, 64, 3), np.uint8)) is None


def test_find_weights_in_a_folder(weights_dir, tmp_path):
    assert find_weights(weights_dir) == (weights_dir / DETECTOR_FILE, weights_dir / POSE_FILE)
    half = tmp_path / "half"
    half.mkdir()
    (half / DETECTOR_FILE).write_bytes(b"x")
    assert find_weights(half) is None


def test_missing_dwpose_folder(tmp_path):
    with pytest.raises(InputError, match="DWPose folder does not exist"):
        load_detector("auto", dwpose_dir=tmp_path / "nowhere")


def test_unknown_detector_and_bad_model_file(tmp_path):
    with pytest.raises(InputError, match="unknown detector"):
        load_detector("openpose")
    (tmp_path / DETECTOR_FILE).write_bytes(b"not onnx")
    (tmp_path / POSE_FILE).write_bytes(b"not onnx")
    with pytest.raises(WeightsError, match="cannot load DWPose ONNX models"):
        DWPoseDetector.from_pretrained(tmp_path, download=False)
