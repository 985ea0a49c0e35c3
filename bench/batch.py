"""Batch throughput on the tiny preset: N jobs sharing M driving clips, against N separate runs.

Modes, in one run on the same inputs:
- separate: N `svd-animate` commands, one per job, each loading the models and extracting the poses
  (`--no-cache`: what users did before `batch`);
- batch_cold: one `svd-animate batch` with an empty pose cache (each clip extracted once);
- batch_warm: the same batch again into a new folder, the poses now cached.
Prints one JSON object as its last line with jobs/min per mode and the speed-ups over `separate`.
Needs ../shared/data (real clips, so the pose detector finds a person).
Run: .venv/bin/python bench/batch.py [--quick] [--refs 4] [--max-frames 8]
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
CLIPS = ("driving_controlnext_v2_01.mp4", "driving_controlnext_v2_02.mp4")
REFS = ("ref_controlnext_v2_01.jpeg", "ref_mimicmotion_demo1.jpg")


def make_inputs(folder: Path, num_refs: int) -> tuple[Path, Path]:
    """Clips linked in; references: the real ones, then mirrored copies until there are `num_refs`."""
    refs, clips = folder / "refs", folder / "clips"
    refs.mkdir(), clips.mkdir()
    for name in CLIPS:
        (clips / name).symlink_to(DATA / name)
    for index in range(num_refs):
        source = DATA / REFS[index % len(REFS)]
        image = cv2.imread(str(source))
        if index >= len(REFS):
            image = cv2.flip(image, 1)
        cv2.imwrite(str(refs / f"ref{index}.png"), image)
    return refs, clips


def timed(command: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(command, cwd=ROOT, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--refs", type=int, default=4, help="references (jobs = refs x 2 clips)")
    parser.add_argument("--max-frames", type=int, default=8)
    parser.add_argument("--quick", action="store_true", help="2 references, 4 frames")
    args = parser.parse_args()
    if args.quick:
        args.refs, args.max_frames = 2, 4
    if not all((DATA / name).is_file() for name in CLIPS + REFS):
        sys.exit(f"bench/batch.py needs {DATA} (real clips and references)")
    cli = [sys.executable, "-m", "svd_controlnext", "-q"]
    common = ["--preset", "tiny", "--max-frames", str(args.max_frames)]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        refs, clips = make_inputs(tmp, args.refs)
        jobs = [(ref, clip) for clip in sorted(clips.iterdir()) for ref in sorted(refs.iterdir())]
        (tmp / "separate").mkdir()
        seconds = {"separate": sum(
            timed([*cli, "--ref", str(ref), "--pose", str(clip), *common, "--no-cache",
                   "-o", str(tmp / "separate" / f"{clip.stem}__{ref.stem}.mp4")]) for ref, clip in jobs)}
        batch = [*cli, "batch", "--refs", str(refs), "--poses", str(clips), *common, "--cache-dir", str(tmp / "cache")]
        seconds["batch_cold"] = timed([*batch, "-o", str(tmp / "cold")])
        seconds["batch_warm"] = timed([*batch, "-o", str(tmp / "warm")])
        report = json.loads((tmp / "warm" / "report.json").read_text())
        assert report["summary"]["done"] == len(jobs), report["summary"]
        shutil.rmtree(tmp / "cache")
    per_minute = {mode: round(len(jobs) / s * 60, 2) for mode, s in seconds.items()}
    print(json.dumps({
        "machine": f"{platform.machine()} CPU", "preset": "tiny", "jobs": len(jobs), "clips": len(CLIPS),
        "frames_per_job": args.max_frames, "seconds": {mode: round(s, 2) for mode, s in seconds.items()},
        "jobs_per_min": per_minute,
        "speedup_batch_cold_vs_separate": round(seconds["separate"] / seconds["batch_cold"], 2),
        "speedup_batch_warm_vs_separate": round(seconds["separate"] / seconds["batch_warm"], 2),
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
