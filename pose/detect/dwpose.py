"""DWPose: YOLOX person detector + RTMPose/SimCC whole-body model, through onnxruntime.

Pre- and post-processing as published (IDEA-Research/DWPose, reused by MimicMotion and
ControlNeXt-SVD-v2): 640x640 letterbox padded with 114, grid decoding, NMS 0.45, class-score
threshold 0.1, persons kept above 0.3; each box padded x1.25, fixed to the model's aspect,
affine-cropped, ImageNet-normalised; SimCC argmax / 2 mapped back; 133 keypoints -> OpenPose-18
(+ neck), face 68, left and right hand 21. Images are fed as RGB, as the published code does.

Differences from the published code, both deliberate: one person is followed across the video
(largest box first, then the box overlapping the previous one) instead of drawing everyone; a
frame with no person box yields no pose instead of a pose guessed from the whole image.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import cv2
import numpy as np

from svd_common.errors import InputError, WeightsError
from svd_common.hub import hub_endpoint, hub_offline, hub_reachable

from .base import PoseDetector, choose_box, empty_pose

logger = logging.getLogger(__name__)

HUB_REPO = "yzd-v/DWPose"
DETECTOR_FILE = "yolox_l.onnx"
POSE_FILE = "dw-ll_ucoco_384.onnx"
ENV_DIR = "SVD_ANIMATE_DWPOSE_DIR"

DETECTOR_SIZE = (640, 640)  # (H, W)
LETTERBOX_PAD = 114
NMS_IOU = 0.45
CLASS_SCORE_MIN = 0.1
PERSON_SCORE_MIN = 0.3
BOX_PADDING = 1.25
SIMCC_SPLIT = 2.0
IMAGENET_MEAN = np.array([123.675, 116.28, 103.53], np.float32)
IMAGENET_STD = np.array([58.395, 57.12, 57.375], np.float32)
BODY_VISIBLE = 0.3

# OpenPose-18 index <- COCO-17 index; the neck (OpenPose 1) is computed from the shoulders.
OPENPOSE_FROM_COCO = (0, None, 6, 8, 10, 5, 7, 9, 12, 14, 16, 11, 13, 15, 2, 1, 4, 3)
FACE_SLICE = slice(23, 91)
LEFT_HAND_SLICE = slice(91, 112)
RIGHT_HAND_SLICE = slice(112, 133)


# ---- detector ---------------------------------------------------------------------------------

def letterbox(image: np.ndarray, size=DETECTOR_SIZE) -> tuple[np.ndarray, float]:
    """Resize keeping aspect into the top-left of a `size` canvas of 114s: (CHW float32, ratio)."""
    ratio = min(size[0] / image.shape[0], size[1] / image.shape[1])
    new_h, new_w = int(image.shape[0] * ratio), int(image.shape[1] * ratio)
    padded = np.full((*size, 3), LETTERBOX_PAD, np.uint8)
    padded[:new_h, :new_w] = cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
    return np.ascontiguousarray(padded.transpose(2, 0, 1), dtype=np.float32), ratio


def decode_grid(predictions: np.ndarray, size=DETECTOR_SIZE, strides=(8, 16, 32)) -> np.ndarray:
    """YOLOX raw (N, 4 + 1 + classes) -> centre/size in letterbox pixels (anchor-free grids)."""
    grids, scales = [], []
    for stride in strides:
        ys, xs = np.meshgrid(np.arange(size[0] // stride), np.arange(size[1] // stride), indexing="ij")
        grids.append(np.stack([xs.ravel(), ys.ravel()], axis=1))
        scales.append(np.full((xs.size, 1), stride))
    grid = np.concatenate(grids).astype(np.float32)
    scale = np.concatenate(scales).astype(np.float32)
    out = predictions.astype(np.float32).copy()
    out[:, :2] = (out[:, :2] + grid) * scale
    out[:, 2:4] = np.exp(out[:, 2:4]) * scale
    return out


def nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float = NMS_IOU) -> list[int]:
    """Greedy NMS with the published +1 pixel convention in areas."""
    x0, y0, x1, y1 = boxes.T
    areas = (x1 - x0 + 1) * (y1 - y0 + 1)
    order = scores.argsort()[::-1]
    keep = []
    while order.size:
        best, rest = order[0], order[1:]
        keep.append(int(best))
        w = np.maximum(0.0, np.minimum(x1[best], x1[rest]) - np.maximum(x0[best], x0[rest]) + 1)
        h = np.maximum(0.0, np.minimum(y1[best], y1[rest]) - np.maximum(y0[best], y0[rest]) + 1)
        inter = w * h
        order = rest[inter / (areas[best] + areas[rest] - inter) <= iou_threshold]
    return keep


def person_boxes(raw: np.ndarray, ratio: float) -> tuple[np.ndarray, np.ndarray]:
    """Person boxes (xyxy, original pixels) and scores from one YOLOX output (N, 85).

    The published NMS is class-aware, so the person class can be taken on its own.
    """
    decoded = decode_grid(raw)
    centre, size = decoded[:, :2], decoded[:, 2:4]
    boxes = np.concatenate([centre - size / 2, centre + size / 2], axis=1) / ratio
    scores = decoded[:, 4] * decoded[:, 5]
    candidate = scores > CLASS_SCORE_MIN
    boxes, scores = boxes[candidate], scores[candidate]
    keep = nms(boxes, scores) if len(scores) else []
    boxes, scores = boxes[keep], scores[keep]
    person = scores > PERSON_SCORE_MIN
    return boxes[person].reshape(-1, 4), scores[person]


# ---- pose model --------------------------------------------------------------------------------

def box_to_centre_scale(box, input_wh, padding=BOX_PADDING) -> tuple[np.ndarray, np.ndarray]:
    """Centre and (w, h) of the padded box, widened to the model's aspect ratio."""
    box = np.asarray(box, np.float64)
    centre = (box[:2] + box[2:]) / 2
    w, h = (box[2:] - box[:2]) * padding
    aspect = input_wh[0] / input_wh[1]
    scale = np.array([w, w / aspect]) if w > h * aspect else np.array([h * aspect, h])
    return centre, scale


def crop_matrix(centre, scale, input_wh) -> np.ndarray:
    """The 2x3 affine that maps the box (centre, scale) onto the model input (no rotation)."""
    s = input_wh[0] / scale[0]
    return np.array([[s, 0.0, input_wh[0] / 2 - s * centre[0]],
                     [0.0, s, input_wh[1] / 2 - s * centre[1]]])


def crop_person(image: np.ndarray, box, input_wh) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Model input (1, 3, h, w) float32 plus the centre and scale needed to map points back."""
    centre, scale = box_to_centre_scale(box, input_wh)
    crop = cv2.warpAffine(image, crop_matrix(centre, scale, input_wh), (int(input_wh[0]), int(input_wh[1])),
                          flags=cv2.INTER_LINEAR)
    normalised = (crop.astype(np.float32) - IMAGENET_MEAN) / IMAGENET_STD
    return normalised.transpose(2, 0, 1)[None], centre, scale


def decode_simcc(simcc_x: np.ndarray, simcc_y: np.ndarray, split: float = SIMCC_SPLIT):
    """(K, Wx), (K, Wy) -> locations (K, 2) in model-input pixels and scores (K,).

    Score = the smaller of the two maxima; a keypoint whose score is <= 0 gets location -1 (before
    the division by the split ratio), as published.
    """
    locs = np.stack([simcc_x.argmax(axis=-1), simcc_y.argmax(axis=-1)], axis=-1).astype(np.float32)
    scores = np.minimum(simcc_x.max(axis=-1), simcc_y.max(axis=-1))
    locs[scores <= 0] = -1
    return locs / split, scores


def to_image_coords(locs: np.ndarray, centre, scale, input_wh) -> np.ndarray:
    return locs / np.asarray(input_wh, np.float64) * scale + centre - scale / 2


def wholebody_to_openpose(keypoints: np.ndarray, scores: np.ndarray, width: int, height: int) -> dict:
    """133 COCO-WholeBody keypoints (pixels) -> our frame layout, normalised by the image size.

    The neck is the mean of the shoulders; its score is 1 when both shoulders are above 0.3, else 0
    (as published). Feet are dropped.
    """
    pose = empty_pose()
    size = np.array([width, height], np.float64)
    points = keypoints / size
    for op_index, coco_index in enumerate(OPENPOSE_FROM_COCO):
        if coco_index is None:
            pose["body"][op_index] = (points[5] + points[6]) / 2
            pose["body_score"][op_index] = float(scores[5] > BODY_VISIBLE and scores[6] > BODY_VISIBLE)
        else:
            pose["body"][op_index] = points[coco_index]
            pose["body_score"][op_index] = scores[coco_index]
    pose["face"][:] = points[FACE_SLICE]
    pose["face_score"][:] = scores[FACE_SLICE]
    for side, part in enumerate((LEFT_HAND_SLICE, RIGHT_HAND_SLICE)):
        pose["hands"][side] = points[part]
        pose["hands_score"][side] = scores[part]
    return pose


# ---- weights and the detector -----------------------------------------------------------------

class WeightsUnavailable(WeightsError):
    """The two ONNX files are neither here nor downloadable now; `reason` says why in a few words, so that
    `auto` can fall back with a short warning while `--detector dwpose` shows the whole line."""

    def __init__(self, repo: str, reason: str):
        self.reason = reason
        super().__init__(f"DWPose weights could not be downloaded from {repo} ({reason}); put {DETECTOR_FILE} and "
                         f"{POSE_FILE} in a folder and pass --dwpose-dir")


def find_weights(source: str | os.PathLike | None = None, download: bool = False) -> tuple[Path, Path] | None:
    """Locate the two ONNX files: a folder, $SVD_ANIMATE_DWPOSE_DIR, the hub cache, or (download=True)
    the hub repo `yzd-v/DWPose`. None when they are not here and download=False; WeightsUnavailable
    when the download is impossible (HF_HUB_OFFLINE, hub unreachable, hub error)."""
    folders = [Path(p) for p in (source, os.environ.get(ENV_DIR)) if p and Path(p).is_dir()]
    for folder in folders:
        det, pose = folder / DETECTOR_FILE, folder / POSE_FILE
        if det.is_file() and pose.is_file():
            return det, pose
    repo = HUB_REPO
    if source and not Path(source).exists():
        text = str(source)
        if text.startswith(("/", ".", "~")) or text.count("/") != 1:
            raise InputError(f"{source}: DWPose folder does not exist")
        repo = text  # a hub repo id holding the two files
    from huggingface_hub import hf_hub_download, try_to_load_from_cache

    cache_dir = os.environ.get("HF_HUB_CACHE")  # read now, not at import, so it can be redirected
    cached = [try_to_load_from_cache(repo, name, cache_dir=cache_dir) for name in (DETECTOR_FILE, POSE_FILE)]
    if all(isinstance(c, str) for c in cached):
        return Path(cached[0]), Path(cached[1])
    if not download:
        return None
    if hub_offline():
        raise WeightsUnavailable(repo, "HF_HUB_OFFLINE is set")
    endpoint = hub_endpoint()
    if not hub_reachable(f"{endpoint}/api/models/{repo}"):
        raise WeightsUnavailable(repo, f"{endpoint} unreachable")
    logger.info("fetching DWPose weights from %s/%s (about 350 MB, first run only)", endpoint, repo)
    try:
        return tuple(Path(hf_hub_download(repo, name, cache_dir=cache_dir, endpoint=endpoint))
                     for name in (DETECTOR_FILE, POSE_FILE))
    except Exception as e:  # auth, missing repo or file, a connection lost midway
        raise WeightsUnavailable(repo, " ".join(f"{type(e).__name__}: {e}".split())) from None


class DWPoseDetector(PoseDetector):
    name = "dwpose"

    def __init__(self, detector_path, pose_path, providers: list[str] | None = None):
        import onnxruntime as ort

        available = ort.get_available_providers()
        self.providers = [p for p in (providers or ["CUDAExecutionProvider", "CPUExecutionProvider"])
                          if p in available] or ["CPUExecutionProvider"]
        options = ort.SessionOptions()
        options.log_severity_level = 3
        try:
            self.detector = ort.InferenceSession(str(detector_path), options, providers=self.providers)
            self.pose_model = ort.InferenceSession(str(pose_path), options, providers=self.providers)
        except Exception as e:
            raise WeightsError(f"cannot load DWPose ONNX models {detector_path}, {pose_path}: {e}") from None
        self.files = (Path(detector_path).name, Path(pose_path).name)
        self.pose_input_hw = tuple(int(d) for d in self.pose_model.get_inputs()[0].shape[2:])
        self._previous_box = None

    @classmethod
    def from_pretrained(cls, source=None, providers=None, download: bool = True) -> "DWPoseDetector":
        found = find_weights(source, download=download)
        if found is None:
            raise WeightsError(f"DWPose weights not found: put {DETECTOR_FILE} and {POSE_FILE} in a folder and "
                             f"pass --dwpose-dir (or set {ENV_DIR})")
        return cls(*found, providers=providers)

    def settings(self) -> dict:
        return {"files": list(self.files), "pose_input": list(self.pose_input_hw), "tracking": "box-iou"}

    def reset(self) -> None:
        self._previous_box = None

    def detect_boxes(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        blob, ratio = letterbox(image)
        raw = self.detector.run(None, {self.detector.get_inputs()[0].name: blob[None]})[0]
        return person_boxes(raw[0], ratio)

    def estimate(self, image: np.ndarray, box) -> tuple[np.ndarray, np.ndarray]:
        """133 keypoints (pixels) and scores for the person in `box`."""
        input_wh = (self.pose_input_hw[1], self.pose_input_hw[0])
        blob, centre, scale = crop_person(image, box, input_wh)
        simcc_x, simcc_y = self.pose_model.run(None, {self.pose_model.get_inputs()[0].name: blob})[:2]
        locs, scores = decode_simcc(simcc_x[0], simcc_y[0])
        return to_image_coords(locs, centre, scale, input_wh), scores

    def detect(self, image: np.ndarray):
        boxes, _ = self.detect_boxes(image)
        self.people_seen = len(boxes)
        chosen = choose_box(boxes, self._previous_box)
        if chosen is None:
            return None
        self._previous_box = boxes[chosen]
        keypoints, scores = self.estimate(image, boxes[chosen])
        return wholebody_to_openpose(keypoints, scores, image.shape[1], image.shape[0])
