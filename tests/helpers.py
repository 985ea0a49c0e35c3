"""Builders shared by the tests: generated clips, poses and tiny DWPose ONNX graphs."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from pose.detect.base import empty_pose

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def write_clip(path, frames, fps=10, codec="libx264", tone_hz=None, rate=16000) -> Path:
    """Encode RGB frames (H, W, 3 uint8, even sizes) into a video file; `tone_hz` adds a mono AAC
    sine track as long as the video."""
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec, rate=Fraction(fps))
        stream.height, stream.width = frames[0].shape[:2]
        stream.pix_fmt = "yuv420p"
        audio = None
        if tone_hz is not None:
            audio = container.add_stream("aac", rate=rate)
            audio.layout = "mono"
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
        if audio is not None:
            t = np.arange(round(len(frames) / fps * rate)) / rate
            wave = (0.5 * np.sin(2 * np.pi * tone_hz * t)).astype(np.float32)[None]
            frame = av.AudioFrame.from_ndarray(wave, format="fltp", layout="mono")
            frame.sample_rate, frame.pts = rate, 0
            for packet in [*audio.encode(frame), *audio.encode()]:
                container.mux(packet)
    return Path(path)


def read_audio(path) -> tuple[np.ndarray, int]:
    """The first audio track, mono float samples, and its sample rate."""
    with av.open(str(path)) as container:
        stream = container.streams.audio[0]
        chunks = [frame.to_ndarray().reshape(frame.to_ndarray().shape[0], -1).mean(axis=0)
                  for frame in container.decode(stream)]
        return np.concatenate(chunks), stream.codec_context.sample_rate


def square_frames(num_frames=12, height=48, width=64, missing=(), size=8):
    """Black frames with a white square moving right by 2 px per frame; `missing` frames stay black."""
    frames = []
    for t in range(num_frames):
        frame = np.zeros((height, width, 3), np.uint8)
        if t not in missing:
            x = 4 + 2 * t
            frame[20:20 + size, x:x + size] = 255
        frames.append(frame)
    return frames


def make_pose(body=None, body_score=1.0, hands=None, face=None):
    """One frame dict with the given body points (dict joint -> (x, y)) and everything else missing."""
    pose = empty_pose()
    for joint, xy in (body or {}).items():
        pose["body"][joint] = xy
        pose["body_score"][joint] = body_score
    if hands is not None:
        pose["hands"][:] = hands
        pose["hands_score"][:] = 1.0
    if face is not None:
        pose["face"][:] = face
        pose["face_score"][:] = 1.0
    return pose


# ---- tiny ONNX graphs with the real DWPose models' signatures -----------------------------------

def yolox_output(boxes_640, num_anchors=8400, num_classes=80, obj=0.9, cls=0.9) -> np.ndarray:
    """A raw YOLOX output (1, 8400, 85) with one confident person per box (xyxy, letterbox pixels).

    Each box is planted in the stride-8 cell holding its centre, encoded the way decode_grid inverts.
    """
    out = np.zeros((1, num_anchors, 5 + num_classes), np.float32)
    out[..., 2:4] = np.log(1.0)
    for x0, y0, x1, y1 in boxes_640:
        cx, cy, w, h = (x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0
        gx, gy = int(cx // 8), int(cy // 8)
        anchor = gy * 80 + gx
        out[0, anchor, :4] = [cx / 8 - gx, cy / 8 - gy, np.log(w / 8), np.log(h / 8)]
        out[0, anchor, 4] = obj
        out[0, anchor, 5] = cls
    return out


def build_yolox_graph(path, raw_output: np.ndarray) -> Path:
    """`images` (1,3,640,640) -> `output` (1,8400,85): the planted detections (+ 0 x the input mean,
    so the image really flows through the session)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    nodes = [
        helper.make_node("ReduceMean", ["images"], ["mean"], keepdims=0),
        helper.make_node("Mul", ["mean", "zero"], ["nothing"]),
        helper.make_node("Add", ["planted", "nothing"], ["output"]),
    ]
    graph = helper.make_graph(
        nodes, "tiny_yolox",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, 640, 640])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, list(raw_output.shape))],
        initializer=[numpy_helper.from_array(raw_output.astype(np.float32), "planted"),
                     numpy_helper.from_array(np.array(0.0, np.float32), "zero")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return Path(path)


def build_pose_graph(path, height=384, width=288, keypoints=133) -> Path:
    """`input` (1,3,H,W) -> `simcc_x` (1,K,2W), `simcc_y` (1,K,2H) that point every keypoint at the
    brightest column / row of the crop: column max over channels and rows, upsampled x2 (split ratio
    2). A bright dot in the image therefore comes back as every keypoint's location, which exercises
    the crop, the SimCC decoding and the mapping back to image pixels for real."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    up_x = np.kron(np.eye(width, dtype=np.float32), np.ones((1, 2), np.float32))  # (W, 2W)
    up_y = np.kron(np.eye(height, dtype=np.float32), np.ones((1, 2), np.float32))
    nodes = [
        helper.make_node("ReduceMax", ["input"], ["cols"], axes=[1, 2], keepdims=0),  # (1, W)
        helper.make_node("ReduceMax", ["input"], ["rows"], axes=[1, 3], keepdims=0),  # (1, H)
        helper.make_node("MatMul", ["cols", "up_x"], ["x2"]),  # (1, 2W)
        helper.make_node("MatMul", ["rows", "up_y"], ["y2"]),
        helper.make_node("Unsqueeze", ["x2", "axis1"], ["x3"]),  # (1, 1, 2W)
        helper.make_node("Unsqueeze", ["y2", "axis1"], ["y3"]),
        helper.make_node("Expand", ["x3", "shape_x"], ["simcc_x"]),
        helper.make_node("Expand", ["y3", "shape_y"], ["simcc_y"]),
    ]
    graph = helper.make_graph(
        nodes, "tiny_rtmpose",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, height, width])],
        [helper.make_tensor_value_info("simcc_x", TensorProto.FLOAT, [1, keypoints, 2 * width]),
         helper.make_tensor_value_info("simcc_y", TensorProto.FLOAT, [1, keypoints, 2 * height])],
        initializer=[
            numpy_helper.from_array(up_x, "up_x"), numpy_helper.from_array(up_y, "up_y"),
            numpy_helper.from_array(np.array([1], np.int64), "axis1"),
            numpy_helper.from_array(np.array([1, keypoints, 2 * width], np.int64), "shape_x"),
            numpy_helper.from_array(np.array([1, keypoints, 2 * height], np.int64), "shape_y"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return Path(path)


def make_training_dataset(folder, clips=3, frames=8, size=64):
    """A dataset folder in `prepare-data`'s layout: clips of a white square moving right, and a
    stick figure following it (written directly: no detector finds a person in a square)."""
    import json

    from pose.skeleton import PoseSequence

    folder = Path(folder)
    (folder / "poses").mkdir(parents=True, exist_ok=True)
    entries = []
    for c in range(clips):
        video_frames, poses = [], []
        for t in range(frames):
            frame = np.zeros((size, size, 3), np.uint8)
            x = (4 + 3 * t + 5 * c) % (size - 12)
            frame[24:36, x:x + 12] = (255, 255 - 60 * c, 255)
            video_frames.append(frame)
            hand = np.full((2, 21, 2), np.nan, np.float32)
            hand[0] = ((x + 6) / size, 30 / size)
            cx = (x + 6) / size
            body = {0: (cx, 0.1), 1: (cx, 0.25), 2: (cx - 0.15, 0.25), 3: (cx - 0.2, 0.45), 4: (cx - 0.2, 0.6),
                    5: (cx + 0.15, 0.25), 6: (cx + 0.2, 0.45), 7: (cx + 0.2, 0.6), 8: (cx - 0.1, 0.6),
                    9: (cx - 0.1, 0.8), 10: (cx - 0.1, 0.95), 11: (cx + 0.1, 0.6), 12: (cx + 0.1, 0.8),
                    13: (cx + 0.1, 0.95)}
            poses.append(make_pose(body, hands=hand))
        video = write_clip(folder / f"clip{c}.mp4", video_frames, fps=10)
        PoseSequence.stack(poses, size, size, fps=10).save(folder / "poses" / f"clip{c}.npz")
        entries.append({"video": video.name, "poses": f"poses/clip{c}.npz", "frames": frames, "fps": 10.0,
                        "width": size, "height": size})
    (folder / "dataset.json").write_text(json.dumps({"format": "svd-animate.dataset", "version": 1,
                                                     "clips": entries, "skipped": []}))
    return folder
