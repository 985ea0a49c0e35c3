"""Window-parallel sampling on the CPU: one video sampled by 1 process, then by N processes (gloo), 1 thread each.

Tiny random components (svd_controlnext/tiny.py) at a size where the UNet's compute, not Python, dominates; the
video has at least 4 windows. Times the pipeline's sampling call (output_type="latent") after one warm-up call, and
checks that the latents of N processes equal one process's bit for bit. Prints one JSON object.
Run: .venv/bin/python bench/parallel.py [--processes 2] [--frames 22] [--size 64] [--steps 4]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from svd_controlnext.parallel import WindowParallel  # noqa: E402
from svd_controlnext.pipeline import ControlNeXtSVDPipeline  # noqa: E402
from svd_controlnext.tiny import tiny_components  # noqa: E402
from svd_controlnext.windows import WindowPlan  # noqa: E402


def sample(args, parallel=None) -> tuple[float, torch.Tensor]:
    """Seconds of one sampling call (after a warm-up call) and its latents."""
    from PIL import Image

    parts = tiny_components()
    pipe = ControlNeXtSVDPipeline(**parts)
    pipe.set_progress_bar_config(disable=True)
    image = Image.fromarray(np.random.default_rng(5).integers(0, 256, (args.size, args.size, 3), np.uint8))
    poses = np.random.default_rng(7).integers(0, 256, (args.frames, args.size, args.size, 3), np.uint8)

    def call():
        return pipe(image, poses, height=args.size, width=args.size, num_inference_steps=args.steps,
                    window_size=args.window, window_overlap=args.overlap, output_type="latent",
                    generator=torch.Generator().manual_seed(0), parallel=parallel).frames

    call()
    if parallel is not None:
        dist.barrier()
    start = time.perf_counter()
    latents = call()
    return time.perf_counter() - start, latents


def worker(rank, world, folder, args):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/store", rank=rank, world_size=world)
    try:
        seconds, latents = sample(args, WindowParallel(rank, world))
        if rank == 0:
            torch.save({"seconds": seconds, "latents": latents}, Path(folder) / "result.pt")
    finally:
        dist.destroy_process_group()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--frames", type=int, default=22)
    parser.add_argument("--size", type=int, default=64, help="height and width in pixels")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--window", type=int, default=8)
    parser.add_argument("--overlap", type=int, default=2)
    args = parser.parse_args()
    windows = len(WindowPlan.make(args.frames, args.window, args.overlap))
    torch.set_num_threads(1)
    one_seconds, one_latents = sample(args)
    with tempfile.TemporaryDirectory() as folder:
        mp.spawn(worker, args=(args.processes, folder, args), nprocs=args.processes)
        result = torch.load(Path(folder) / "result.pt", weights_only=True)
    print(json.dumps({
        "machine": platform.machine(), "torch": torch.__version__, "threads_per_process": 1,
        "size": f"{args.size}x{args.size}", "frames": args.frames, "window": args.window, "overlap": args.overlap,
        "windows": windows, "steps": args.steps, "processes": args.processes,
        "one_process_s": round(one_seconds, 2), "n_processes_s": round(result["seconds"], 2),
        "speedup": round(one_seconds / result["seconds"], 3),
        "latents_equal": bool(torch.equal(one_latents, result["latents"])),
        "allreduced_bytes_per_step": one_latents.numel() * 4}))


if __name__ == "__main__":
    main()
