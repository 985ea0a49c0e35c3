"""Decode peak memory and time at 14, 56 and 112 frames: streamed chunks vs diffusers' decode_latents.

Each measurement runs in its own process (peak RSS = ru_maxrss). Prints one JSON object as its last
line with `memory_growth_14_to_112` (streamed). Default: the tiny temporal VAE from `svd_controlnext.tiny`
at 128x128 frames (CPU-friendly); `--full-vae` uses the full SVD VAE architecture (random weights).
Run: .venv/bin/python bench/decode.py [--quick] [--full-vae] [--size 128] [--chunk 8]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def child(mode: str, frames: int, size: int, chunk: int, full_vae: bool) -> dict:
    sys.path.insert(0, str(ROOT))
    import torch

    from svd_controlnext.decode import iter_decoded_frames

    torch.manual_seed(0)
    if full_vae:
        from diffusers import AutoencoderKLTemporalDecoder

        vae = AutoencoderKLTemporalDecoder(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
                                           block_out_channels=[128, 256, 512, 512], layers_per_block=2,
                                           latent_channels=4)
    else:
        from svd_controlnext.tiny import tiny_components

        vae = tiny_components()["vae"]
    vae.eval()
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    latents = torch.randn(1, frames, 4, size // factor, size // factor)
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    checksum = 0
    if mode == "streamed":
        for frame in iter_decoded_frames(vae, latents, chunk):
            checksum += int(frame[0, 0, 0])  # the frame is dropped right away, as a writer would
    else:  # diffusers' decode_latents: the whole video decoded (float32) before anything is written
        from diffusers import StableVideoDiffusionPipeline

        with torch.no_grad():
            video = StableVideoDiffusionPipeline.decode_latents(
                type("Pipe", (), {"vae": vae})(), latents, frames, chunk)
        checksum = int(video.shape[2])
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"peak_rss_mb": round(peak / 1024, 1), "decode_peak_over_baseline_mb": round((peak - baseline) / 1024, 1),
            "seconds": round(seconds, 3), "checksum": checksum}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--chunk", type=int, default=2, help="decode chunk (published: 2)")
    parser.add_argument("--quick", action="store_true", help="14 and 112 frames only")
    parser.add_argument("--full-vae", action="store_true")
    parser.add_argument("--child", nargs=2, metavar=("MODE", "FRAMES"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], int(args.child[1]), args.size, args.chunk, args.full_vae)))
        return 0
    counts = (14, 112) if args.quick else (14, 56, 112)
    results = {}
    for mode in ("streamed", "decode_latents"):
        for frames in counts:
            command = [sys.executable, __file__, "--child", mode, str(frames), "--size", str(args.size),
                       "--chunk", str(args.chunk)] + (["--full-vae"] if args.full_vae else [])
            out = subprocess.run(command, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
            results[f"{mode}_{frames}"] = json.loads(out)
    streamed = [results[f"streamed_{n}"]["peak_rss_mb"] for n in (14, 112)]
    at_once = [results[f"decode_latents_{n}"]["peak_rss_mb"] for n in (14, 112)]
    summary = {
        "vae": "full SVD architecture" if args.full_vae else "tiny", "frame_size": args.size, "chunk": args.chunk,
        "memory_growth_14_to_112": round(streamed[1] / streamed[0] - 1, 4),
        "memory_growth_14_to_112_decode_latents": round(at_once[1] / at_once[0] - 1, 4),
        "seconds_per_frame_112": round(results["streamed_112"]["seconds"] / 112, 4),
        "runs": results,
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
