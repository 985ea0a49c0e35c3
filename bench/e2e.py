"""A whole video, end to end (sampling and decoding), ours and fast vs the published pipeline's settings.

Full-size SVD-XT architecture with random weights (bench/fullsize.py). Each mode runs in its own process:
- published: fp32, the encoder on the doubled guidance batch for every window frame, the reference pose
  in every window with the uniform mean, decode chunk 2 with the whole video decoded before writing;
- ours: our defaults (--dtype, default fp16 on CUDA and fp32 on CPU; position-weighted fusion; the encoder
  on conditional frames once per frame and step; frames decoded in chunks and streamed, nothing held);
- fast: ours with `--fast` (AYS at 10 steps, guidance for sigma in (0.28, 5.42], DeepCache every 2nd step);
- ays, interval, deepcache: ours with one fast technique alone (AYS at 10 steps; limited-interval guidance;
  DeepCache every 2nd step), for the speed-up of each.
Prints one JSON object as its last line: seconds, seconds per output frame and peak memory per mode
(RSS on CPU; torch.cuda.max_memory_allocated on GPU), `time_ratio` (ours / published), `time_ratio_fast`
(fast / published), `speedup` of each technique alone (ours / it), and how far DeepCache's and fast's latents move
from ours (random weights say nothing about quality, only that nothing is broken).
Every mode's pipeline can be placed as svd-animate's options place it: --offload, --low-vram, --compile (and
--compile-backend); bench/acceptance.py runs each mode of the tool through `make_pipeline` and `run_video`.
Run: .venv/bin/python bench/e2e.py --quick          (CPU: 64x64, 12 frames, windows 8/2, 25 steps)
     .venv/bin/python bench/e2e.py --device cuda    (576x1024, 48 frames, windows 24/6, 25 steps)
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODES = ("published", "ours", "fast", "ays", "interval", "deepcache")


def make_pipeline(mode: str, args, components=None):
    """`mode`'s pipeline (full-size random weights unless `components`, a callable, gives others), in its dtype and
    placed by `svd_animate.animate.prepare_pipeline`, as a loaded one is: `args.offload` (none, model, sequential),
    `args.low_vram` (model offload when no offload is asked, feed-forward chunking), `args.compile` (the UNet
    compiled in place, with `args.compile_backend`). Returns (pipe, dtype)."""
    sys.path.insert(0, str(ROOT))
    import torch

    from bench.fullsize import full_components, published_settings
    from svd_animate.animate import prepare_pipeline
    from svd_controlnext.pipeline import ControlNeXtSVDPipeline

    published = mode == "published"
    dtype = torch.float32 if published or args.dtype == "fp32" else {"fp16": torch.float16,
                                                                       "bf16": torch.bfloat16}[args.dtype]
    pipe = ControlNeXtSVDPipeline(**(components or full_components)())
    pipe.to(dtype=dtype)
    prepare_pipeline(pipe, args.device, getattr(args, "offload", "none"), low_vram=getattr(args, "low_vram", False),
                     compile=getattr(args, "compile", False),
                     compile_backend=getattr(args, "compile_backend", "inductor"))
    pipe.set_progress_bar_config(disable=True)
    if published:
        published_settings(pipe)
    return pipe, dtype


def run_video(pipe, mode: str, args, dtype):
    """One video through `pipe` (`make_pipeline`) at `args`' size, frames, windows and steps, sampling then decoding
    as `mode` does. Returns (the measures: seconds, sampling and decoding, peak memory, ...; the final latents in
    float32 on the CPU)."""
    import numpy as np
    import torch
    from PIL import Image

    from svd_animate.animate import pipeline_arguments
    from svd_animate.config import AnimateConfig, with_fast_sampling
    from svd_animate.memory import DEFAULT_DECODE_CHUNK, decode_chunk_for, free_memory
    from svd_controlnext.decode import iter_decoded_frames

    device = torch.device(args.device)
    published = mode == "published"
    width, height = map(int, args.size.split("x"))
    rng = np.random.default_rng(0)
    reference = Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8))
    poses = rng.integers(0, 255, (args.frames, height, width, 3), dtype=np.uint8)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    if published:
        arguments = dict(height=height, width=width, num_inference_steps=args.steps, min_guidance_scale=3.0,
                         max_guidance_scale=3.0, window_size=args.window, window_overlap=args.overlap,
                         fusion="uniform", reference_pose_in_every_window=True)
    else:
        config = AnimateConfig(base_model="tiny", width=width, height=height, steps=args.steps, window=args.window,
                               overlap=args.overlap, min_guidance=3.0, max_guidance=3.0)
        config = {"ours": config, "fast": with_fast_sampling(config),
                  "ays": config.replace(steps=10, sigma_schedule="ays"),
                  "interval": config.replace(guidance_sigma_min=0.28, guidance_sigma_max=5.42),
                  "deepcache": config.replace(cache_interval=2)}[mode]
        arguments = pipeline_arguments(config)
    result = pipe(reference, poses, num_frames=args.frames, generator=torch.Generator().manual_seed(0),
                  output_type="latent", **arguments)
    latents = result.frames
    final = latents.float().cpu()  # (also waits for the device)
    sampled = time.perf_counter()
    checksum = 0
    if published:  # the whole video decoded into memory, then written
        video = pipe.decode_latents(latents, args.frames, 2)
        checksum = int((video.float().mean() * 1000).item())
    else:
        free = free_memory(args.device)
        fits = decode_chunk_for(free[1] if device.type == "cuda" else free[0], width, height,
                                torch.finfo(dtype).bits // 8)
        chunk = 1 if getattr(args, "low_vram", False) else min(DEFAULT_DECODE_CHUNK, fits)  # as `svd-animate` does
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
           "dtype": str(dtype).replace("torch.", ""), "checksum": checksum,
           "unet_calls_cached": result.counts.cached_calls, "guided_steps": result.counts.guided_steps}
    if device.type == "cuda":
        out["peak_cuda_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 3)
    return out, final


def child(mode: str, args) -> dict:
    import torch

    pipe, dtype = make_pipeline(mode, args)
    out, latents = run_video(pipe, mode, args, dtype)
    torch.save(latents, Path(args.latents_dir) / f"{mode}.pt")
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
    parser.add_argument("--quick", action="store_true", help="64x64, 12 frames, windows 8/2, 25 steps (CPU)")
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, of {', '.join(MODES)}")
    parser.add_argument("--offload", choices=("none", "model", "sequential"), default="none",
                        help="every mode's models kept in CPU memory, as svd-animate --offload (default none)")
    parser.add_argument("--low-vram", action="store_true", help="every mode as svd-animate --low-vram")
    parser.add_argument("--compile", action="store_true", help="every mode's UNet compiled, as svd-animate --compile")
    parser.add_argument("--compile-backend", default="inductor", help="torch.compile backend (default inductor)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--latents-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.size, args.frames, args.window, args.overlap = "64x64", 12, 8, 2
    args.dtype = args.dtype or ("fp16" if args.device.startswith("cuda") else "fp32")
    if args.child:
        print(json.dumps(child(args.child, args)))
        return 0
    modes = [mode for mode in MODES if mode in args.modes.split(",")]
    results = {}
    with tempfile.TemporaryDirectory() as latents_dir:
        for mode in modes:
            command = [sys.executable, __file__, "--child", mode, "--device", args.device, "--dtype", args.dtype,
                       "--size", args.size, "--frames", str(args.frames), "--window", str(args.window),
                       "--overlap", str(args.overlap), "--steps", str(args.steps), "--latents-dir", latents_dir,
                       "--offload", args.offload, "--compile-backend", args.compile_backend]
            command += ["--low-vram"] * args.low_vram + ["--compile"] * args.compile
            done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
            if done.returncode:
                sys.exit(f"{mode}: {done.stderr[-3000:]}")
            results[mode] = json.loads(done.stdout.strip().splitlines()[-1])
            print(mode, json.dumps(results[mode]), file=sys.stderr, flush=True)
        drift = latent_drift(Path(latents_dir), modes)
    memory = "peak_cuda_gib" if args.device.startswith("cuda") else "peak_rss_gib"
    summary = {
        "machine": platform.machine() + " CPU" if not args.device.startswith("cuda") else args.device,
        "architecture": "full-size SVD-XT + published pose encoder (random weights)", "size": args.size,
        "frames": args.frames, "window": args.window, "overlap": args.overlap, "steps": args.steps, "modes": results}
    seconds = {mode: result["seconds"] for mode, result in results.items()}
    if "published" in seconds:
        for mode, key in (("ours", "time_ratio"), ("fast", "time_ratio_fast")):
            if mode in seconds:
                summary[key] = round(seconds[mode] / seconds["published"], 4)
        if "ours" in seconds:
            summary["peak_memory_ratio"] = round(results["ours"][memory] / results["published"][memory], 4)
    if "ours" in seconds:
        summary["speedup"] = {mode: round(seconds["ours"] / seconds[mode], 3)
                              for mode in ("fast", "ays", "interval", "deepcache") if mode in seconds}
    summary["latents_vs_ours"] = drift
    print(json.dumps(summary))
    return 0


def latent_drift(folder: Path, modes) -> dict:
    """How far each mode's final latents are from ours: max and mean absolute difference, each relative to ours'
    (same seed, same noise). DeepCache alone keeps the schedule, so its drift is the cache's alone."""
    import torch

    if "ours" not in modes:
        return {}
    ours = torch.load(folder / "ours.pt", weights_only=True)
    drift = {}
    for mode in ("deepcache", "fast", "interval", "ays"):
        if mode in modes:
            difference = (torch.load(folder / f"{mode}.pt", weights_only=True) - ours).abs()
            drift[mode] = {"max_relative": round((difference.max() / ours.abs().max()).item(), 4),
                           "mean_relative": round((difference.mean() / ours.abs().mean()).item(), 4)}
    return drift


if __name__ == "__main__":
    sys.exit(main())
