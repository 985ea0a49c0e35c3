"""A whole video, end to end (sampling and decoding), ours vs the published pipeline's settings.

Full-size SVD-XT architecture with random weights (bench/fullsize.py). Each mode runs in its own process:
- ours: our defaults (--dtype, default fp16 on CUDA and fp32 on CPU; position-weighted fusion; the encoder
  on conditional frames once per frame and step; frames decoded in chunks sized to the free memory and
  streamed, nothing held);
- published: fp32, the encoder on the doubled guidance batch for every window frame, the reference pose
  in every window with the uniform mean, decode chunk 2 with the whole video decoded before writing.
Prints one JSON object as its last line: seconds, seconds per output frame and peak memory per mode
(RSS on CPU; torch.cuda.max_memory_allocated on GPU), `time_ratio` and `peak_memory_ratio` (ours / published).
Run: .venv/bin/python bench/e2e.py --quick          (CPU: 64x64, 12 frames, windows 8/2, 3 steps)
     .venv/bin/python bench/e2e.py --device cuda    (576x1024, 48 frames, windows 24/6, 25 steps)
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def child(mode: str, args) -> dict:
    sys.path.insert(0, str(ROOT))
    import numpy as np
    import torch
    from PIL import Image

    from bench.fullsize import full_components, published_settings
    from svd_animate.animate import place_pipeline
    from svd_animate.memory import decode_chunk_for, free_memory
    from svd_controlnext.decode import iter_decoded_frames
    from svd_controlnext.pipeline import ControlNeXtSVDPipeline

    device = torch.device(args.device)
    published = mode == "published"
    dtype = torch.float32 if published or args.dtype == "fp32" else {"fp16": torch.float16,
                                                                       "bf16": torch.bfloat16}[args.dtype]
    pipe = ControlNeXtSVDPipeline(**full_components())
    pipe.to(dtype=dtype)
    place_pipeline(pipe, args.device, "none")
    pipe.set_progress_bar_config(disable=True)
    if published:
        published_settings(pipe)
    width, height = map(int, args.size.split("x"))
    rng = np.random.default_rng(0)
    reference = Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8))
    poses = rng.integers(0, 255, (args.frames, height, width, 3), dtype=np.uint8)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    latents = pipe(reference, poses, height=height, width=width, num_frames=args.frames,
                   num_inference_steps=args.steps, min_guidance_scale=3.0, max_guidance_scale=3.0,
                   window_size=args.window, window_overlap=args.overlap,
                   fusion="uniform" if published else "ramp", reference_pose_in_every_window=published,
                   generator=torch.Generator().manual_seed(0), output_type="latent").frames
    sampled = time.perf_counter()
    checksum = 0
    if published:  # the whole video decoded into memory, then written
        video = pipe.decode_latents(latents, args.frames, 2)
        checksum = int((video.float().mean() * 1000).item())
    else:
        free = free_memory(args.device)
        chunk = decode_chunk_for(free[1] if device.type == "cuda" else free[0], width, height,
                                 torch.finfo(dtype).bits // 8)
        for frame in iter_decoded_frames(pipe.vae, latents, chunk):
            checksum += int(frame[0, 0, 0])
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - started
    out = {"seconds": round(seconds, 2), "sampling_s": round(sampled - started, 2),
           "decoding_s": round(seconds - (sampled - started), 2), "seconds_per_frame": round(seconds / args.frames, 3),
           "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3),
           "peak_rss_over_models_gib": round((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - baseline) / 2**20,
                                             3),
           "dtype": str(dtype).replace("torch.", ""), "checksum": checksum}
    if device.type == "cuda":
        out["peak_cuda_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 3)
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), help="ours (default fp16 on CUDA, fp32 on CPU)")
    parser.add_argument("--size", default="576x1024", help="WIDTHxHEIGHT")
    parser.add_argument("--frames", type=int, default=48)
    parser.add_argument("--window", type=int, default=24)
    parser.add_argument("--overlap", type=int, default=6)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--quick", action="store_true", help="64x64, 12 frames, windows 8/2, 3 steps (CPU)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.size, args.frames, args.window, args.overlap, args.steps = "64x64", 12, 8, 2, 3
    args.dtype = args.dtype or ("fp16" if args.device.startswith("cuda") else "fp32")
    if args.child:
        print(json.dumps(child(args.child, args)))
        return 0
    results = {}
    for mode in ("ours", "published"):
        command = [sys.executable, __file__, "--child", mode, "--device", args.device, "--dtype", args.dtype,
                   "--size", args.size, "--frames", str(args.frames), "--window", str(args.window),
                   "--overlap", str(args.overlap), "--steps", str(args.steps)]
        done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
        if done.returncode:
            sys.exit(f"{mode}: {done.stderr[-3000:]}")
        results[mode] = json.loads(done.stdout.strip().splitlines()[-1])
    memory = "peak_cuda_gib" if args.device.startswith("cuda") else "peak_rss_gib"
    print(json.dumps({
        "machine": platform.machine() + " CPU" if not args.device.startswith("cuda") else args.device,
        "architecture": "full-size SVD-XT + published pose encoder (random weights)", "size": args.size,
        "frames": args.frames, "window": args.window, "overlap": args.overlap, "steps": args.steps, "modes": results,
        "time_ratio": round(results["ours"]["seconds"] / results["published"]["seconds"], 4),
        "peak_memory_ratio": round(results["ours"][memory] / results["published"][memory], 4),
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
