"""What the ComfyUI nodes add before the job starts: the driving `IMAGE` batch written as the lossless clip the job
reads (hash + FFV1 encode), the second time the same frames arrive (found by name, nothing written), and reading the
clip back, beside decoding the source mp4 (what the CLI reads). The real clip at full size: 133 frames of
576x1024. Prints one JSON object as its last line.
Run: .venv/bin/python bench/comfy_frames.py
"""

from __future__ import annotations

import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from svd_animate.comfy.frames import clip_file  # noqa: E402
from svd_common.video import iter_frames  # noqa: E402

CLIP = ROOT.parent / "shared" / "data" / "driving_controlnext_v2_01.mp4"


def timed(work):
    start = time.perf_counter()
    result = work()
    return result, time.perf_counter() - start


def main() -> None:
    source, decode_mp4 = timed(lambda: np.stack([frame for _, frame in iter_frames(CLIP)]))
    images = torch.from_numpy(source.astype(np.float32) / 255)  # as ComfyUI's video loaders give them
    with tempfile.TemporaryDirectory() as folder:
        clip, first = timed(lambda: clip_file(images, 29.0, Path(folder)))
        _, again = timed(lambda: clip_file(images, 29.0, Path(folder)))
        back, decode_clip = timed(lambda: np.stack([frame for _, frame in iter_frames(clip)]))
        size = clip.stat().st_size
    assert np.array_equal(back, source)
    print(json.dumps({"frames": len(source), "size": list(source.shape[1:3]),
                      "write_clip_s": round(first, 2), "same_frames_again_s": round(again, 2),
                      "read_clip_s": round(decode_clip, 2), "read_source_mp4_s": round(decode_mp4, 2),
                      "clip_mb": round(size / 2**20, 1), "lossless": True,
                      "machine": f"{platform.machine()}, {os.cpu_count()} cores"}))


if __name__ == "__main__":
    main()
