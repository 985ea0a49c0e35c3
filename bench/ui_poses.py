"""Step 1 of the web page (`svd-animate ui`): how long until the aligned-skeleton preview is there.

Runs the page's pose job (`JobRunner.poses`, what the "1 · Show poses" button calls) on the real clip with the
`controlnext-svd-v2` preset's frame selection (stride 2, every frame of the clip: 67 frames of 576x1024) and MediaPipe:
first with an empty pose cache, then the same clip again, then with another alignment (the cache keeps the raw
poses, so only the fit and the preview are made again). Prints one JSON object as its last line.
Run: .venv/bin/python bench/ui_poses.py [--preset controlnext-svd-v2]
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("GLOG_minloglevel", "2")

from svd_animate.ui.jobs import JobRunner  # noqa: E402

DATA = ROOT.parent / "shared" / "data"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="controlnext-svd-v2")
    parser.add_argument("--clip", type=Path, default=DATA / "driving_controlnext_v2_01.mp4")
    parser.add_argument("--ref", type=Path, default=DATA / "ref_controlnext_v2_01.jpeg")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        runner = JobRunner(Path(tmp) / "out", device="cpu", cache_dir=Path(tmp) / "cache",
                           fixed={"detector": "mediapipe"})
        timings = {}
        for name, align in (("first_s", "ls"), ("cached_s", "ls"), ("other_alignment_s", "bones")):
            started = time.perf_counter()
            job = runner.poses(args.ref, args.clip, {"preset": args.preset, "align": align})
            timings[name] = round(time.perf_counter() - started, 2)
        runner.close()
    result = {"bench": "ui_poses", "preset": args.preset, "clip": args.clip.name, "frames": job.frames,
              "detector": "mediapipe", **timings, "speedup_cached": round(timings["first_s"] / timings["cached_s"], 1),
              "machine": f"{platform.machine()}, {os.cpu_count()} cores"}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
