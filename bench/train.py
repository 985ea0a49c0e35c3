"""Training throughput and peak memory per trainable-subset mode, on the tiny preset (random weights).

Each mode runs in its own process (peak RSS = ru_maxrss; on CUDA also max_memory_allocated) on the same
generated dataset: `--steps` optimiser steps (the loop alone, timed inside `train`) after a one-step
warm-up run, batch 1. Prints one JSON object as
its last line: samples/s and peak memory per mode, and each mode's time relative to `encoder`.
Run: .venv/bin/python bench/train.py [--quick] [--steps 10] [--size 64] [--frames 4]
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODES = ("encoder", "encoder+unet-subset", "encoder+unet", "lora")


def child(mode: str, data: str, steps: int, size: int, frames: int, run: str) -> dict:
    sys.path.insert(0, str(ROOT))
    import torch

    from svd_animate.train.config import load_train_config
    from svd_animate.train.trainer import train

    config = load_train_config("tiny").replace(
        data=data, output_dir=run, trainable=mode, width=size, height=size, num_frames=frames, max_steps=1,
        checkpoint_every=10**6, validate_every=10**6)
    train(config, progress=False)  # warm-up: first-call costs, allocator growth
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    result = train(config.replace(max_steps=steps, output_dir=run + "-timed"), progress=False)
    seconds = result.loop_seconds  # the loop only: no model building, no export
    out = {"samples_per_s": round(steps / seconds, 3), "seconds": round(seconds, 2),
           "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
           "last_loss": round(result.losses[-1], 4)}
    if torch.cuda.is_available():
        out["peak_cuda_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--frames", type=int, default=4)
    parser.add_argument("--quick", action="store_true", help="4 steps")
    parser.add_argument("--child", nargs=3, metavar=("MODE", "DATA", "RUN"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        mode, data, run = args.child
        print(json.dumps(child(mode, data, args.steps, args.size, args.frames, run)))
        return 0
    if args.quick:
        args.steps = 4
    sys.path.insert(0, str(ROOT))
    from tests.helpers import make_training_dataset

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        data = make_training_dataset(Path(tmp) / "data", clips=4, frames=max(8, args.frames * 2), size=args.size)
        for mode in MODES:
            command = [sys.executable, __file__, "--child", mode, str(data), str(Path(tmp) / mode.replace("+", "_")),
                       "--steps", str(args.steps), "--size", str(args.size), "--frames", str(args.frames)]
            done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
            if done.returncode:
                sys.exit(f"{mode}: {done.stderr[-2000:]}")
            results[mode] = json.loads(done.stdout.strip().splitlines()[-1])
    base = results["encoder"]["seconds"]
    print(json.dumps({
        "machine": f"{platform.machine()} CPU", "preset": "tiny (random weights)", "frame_size": args.size,
        "frames": args.frames, "batch": 1, "steps": args.steps, "modes": results,
        "time_vs_encoder_only": {mode: round(r["seconds"] / base, 3) for mode, r in results.items()},
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
