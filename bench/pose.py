"""Pose pipeline benchmark: extraction frames/s per backend, render frames/s, cache-hit time.

Prints one JSON object as its last line. Uses ../shared/data's real clip when present.
DWPose's real weights cannot be downloaded on a machine without the hub; then the DWPose figure is
the pre/post-processing overhead measured with tiny ONNX graphs of the real signatures (the
network itself excluded), labelled as such. Run: .venv/bin/python bench/pose.py [--frames N]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("GLOG_minloglevel", "2")

from pose.cache import PoseCache  # noqa: E402
from pose.detect.dwpose import DETECTOR_FILE, POSE_FILE, DWPoseDetector, find_weights  # noqa: E402
from pose.detect.mediapipe import MediaPipeDetector  # noqa: E402
from pose.extract import ExtractSettings, extract_video  # noqa: E402
from pose.render import draw_pose, render_sequence  # noqa: E402
from svd_common.video import iter_frames  # noqa: E402

CLIP = ROOT.parent / "shared" / "data" / "driving_controlnext_v2_01.mp4"


def time_detector(detector, frames) -> float:
    detector.reset()
    detector.detect(frames[0])  # warm-up
    start = time.perf_counter()
    for frame in frames:
        detector.detect(frame)
    return len(frames) / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=40, help="frames per measurement")
    parser.add_argument("--video", type=Path, default=CLIP)
    parser.add_argument("--dwpose-dir", type=Path, help="real DWPose weights, when available")
    args = parser.parse_args()
    result = {"machine": f"{platform.machine()} {os.cpu_count()} cores", "frames": args.frames}
    if not args.video.is_file():
        print(json.dumps({**result, "error": f"{args.video} not found"}))
        return 1
    frames = [rgb for _, rgb in iter_frames(args.video, max_frames=args.frames)]
    result["video"] = f"{args.video.name} {frames[0].shape[1]}x{frames[0].shape[0]}"

    with MediaPipeDetector() as detector:
        result["extract_fps_mediapipe"] = round(time_detector(detector, frames), 2)

    real = find_weights(args.dwpose_dir)
    if real is not None:
        result["extract_fps_dwpose"] = round(time_detector(DWPoseDetector(*real), frames), 2)
    else:
        from tests.helpers import build_pose_graph, build_yolox_graph, yolox_output

        with tempfile.TemporaryDirectory() as folder:
            build_yolox_graph(Path(folder) / DETECTOR_FILE, yolox_output([(200, 40, 440, 620)]))
            build_pose_graph(Path(folder) / POSE_FILE)
            fps = time_detector(DWPoseDetector.from_pretrained(folder, download=False), frames)
        result["extract_fps_dwpose"] = None
        result["dwpose_prepost_fps_tiny_graphs"] = round(fps, 1)

    with tempfile.TemporaryDirectory() as folder, MediaPipeDetector() as detector:
        cache = PoseCache(folder)
        settings = ExtractSettings(max_frames=args.frames)
        start = time.perf_counter()
        poses = extract_video(args.video, detector, settings, cache, progress=False).poses
        cold = time.perf_counter() - start
        start = time.perf_counter()
        hit = extract_video(args.video, detector, settings, cache, progress=False)
        warm = time.perf_counter() - start
        assert hit.from_cache
    result["cache_cold_s"] = round(cold, 3)
    result["cache_hit_s"] = round(warm, 4)

    draw_pose(poses.frame(0), 1024, 576)
    start = time.perf_counter()
    for t in range(len(poses)):
        draw_pose(poses.frame(t), 1024, 576)
    result["render_fps_576x1024_1thread"] = round(len(poses) / (time.perf_counter() - start), 1)
    from tests.test_render import published_reference  # the published drawing, written plainly

    frames_with_origin = []
    for t in range(len(poses)):
        frame = poses.frame(t)
        for name in ("body", "hands", "face"):  # the plain version has no NaN handling
            frame[name] = np.nan_to_num(frame[name], nan=0.0)
        frames_with_origin.append(frame)
    start = time.perf_counter()
    for frame in frames_with_origin:
        published_reference(frame, 1024, 576)
    result["render_fps_576x1024_published_style"] = round(len(poses) / (time.perf_counter() - start), 1)
    result["render_speedup_vs_published_style"] = round(
        result["render_fps_576x1024_1thread"] / result["render_fps_576x1024_published_style"], 2)
    start = time.perf_counter()
    count = sum(1 for _ in render_sequence(poses, 1024, 576, workers=2))
    result["render_fps_576x1024_2threads"] = round(count / (time.perf_counter() - start), 1)
    result["render_to_extract_speed"] = round(result["render_fps_576x1024_1thread"] / result["extract_fps_mediapipe"], 1)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
