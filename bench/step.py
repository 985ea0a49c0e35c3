"""One denoising step on the full-size SVD-XT UNet (random weights): plain vs ours vs published settings.

Modes, measured side by side in one process, interleaved, each repeated (median):
- plain: the UNet on the guidance batch (2 x F frames), no control;
- ours: the pose encoder on the F conditional frames, then the same UNet call with our control hook
  (added to the conditional half), in --dtype;
- published: what the published pipeline does per window and step: fp32, the encoder on the doubled
  guidance batch (2 x F frames), every row cross-normalised and scaled by a (2F, 1, 1, 1) tensor
  whose unconditional half is 0.
Prints one JSON object as its last line: `control_overhead` (median over repeats of ours / plain - 1,
each pair timed back to back, which cancels the machine's slow drifts),
`encoder_share` (the encoder alone / plain), `encoder_calls_per_step` and `encoder_frames_per_step`
(counted by hooks), `time_ratio_vs_published`, `encoder_flop_share` (encoder FLOPs / plain UNet FLOPs, counted
on fake tensors, attention included, at this size and at 576x1024), `encoder_stem_flop_share` (the part of those
that does not depend on the timestep), and on CUDA the peak memory of each mode.
Run: .venv/bin/python bench/step.py --quick          (CPU, 64x64, 4 frames)
     .venv/bin/python bench/step.py --device cuda --size 576x1024 --frames 24 --dtype fp16
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.fullsize import full_pose_encoder, full_unet  # noqa: E402
from svd_controlnext.cross_norm import cross_normalize  # noqa: E402
from svd_controlnext.injection import ControlInjector  # noqa: E402

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Counter:
    """Counts encoder calls and the frames they encode."""

    def __init__(self, encoder):
        self.calls = self.frames = 0
        encoder.register_forward_pre_hook(self._count)

    def _count(self, module, args):
        self.calls += 1
        self.frames += args[0].shape[0] * args[0].shape[1]


def make_inputs(frames: int, height: int, width: int, device, dtype):
    generator = torch.Generator().manual_seed(0)
    sigma = 700.0
    return {
        "sample": torch.randn(2, frames, 8, height // 8, width // 8, generator=generator).to(device, dtype),
        "timestep": torch.tensor(0.25 * math.log(sigma), device=device),
        "encoder_hidden_states": torch.randn(2, 1, 1024, generator=generator).to(device, dtype),
        "added_time_ids": torch.tensor([[6.0, 127.0, 0.02]] * 2, device=device, dtype=dtype),
        "poses": torch.rand(1, frames, 3, height, width, generator=generator).to(device, dtype),
    }


def flop_share(width: int, height: int, frames: int = 2) -> tuple[float, float]:
    """Encoder FLOPs, and those of its timestep-independent stem (`embedding`, which could be computed
    once per video instead of once per step), over the guidance-batch UNet's, counted on fake tensors.

    Attention runs through SDPA's math backend here: FlopCounterMode has no formula for the fused CPU
    kernel and would count attention as 0 (at 576x1024 it is a fifth of the UNet's FLOPs)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        unet, encoder = full_unet(), full_pose_encoder()
    with FakeTensorMode(allow_non_fake_inputs=True), sdpa_kernel(SDPBackend.MATH):
        unet, encoder = unet.to_empty(device="cpu"), encoder.to_empty(device="cpu")
        x = make_inputs(frames, height, width, "cpu", torch.float32)
        with FlopCounterMode(display=False) as unet_flops:
            unet(x["sample"], x["timestep"], x["encoder_hidden_states"], x["added_time_ids"])
        with FlopCounterMode(display=False) as encoder_flops:
            encoder(x["poses"], x["timestep"])
        with FlopCounterMode(display=False) as stem_flops:
            encoder.embedding(x["poses"].flatten(0, 1))
    unet_total = unet_flops.get_total_flops()
    return encoder_flops.get_total_flops() / unet_total, stem_flops.get_total_flops() / unet_total


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="128x128", help="pixels, WIDTHxHEIGHT (default 128x128)")
    parser.add_argument("--frames", type=int, default=8, help="frames per window")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=DTYPES, default="fp32", help="ours (the published mode is always fp32)")
    parser.add_argument("--quick", action="store_true", help="64x64, 4 frames, 3 repeats (a few minutes on 2 cores)")
    args = parser.parse_args()
    if args.quick:
        args.size, args.frames, args.repeats = "64x64", 4, 3
    width, height = map(int, args.size.lower().split("x"))
    device, dtype = torch.device(args.device), DTYPES[args.dtype]

    start = time.perf_counter()
    unet, encoder = full_unet().eval(), full_pose_encoder().eval()
    build_s = time.perf_counter() - start
    counter = Counter(encoder)
    injector = ControlInjector(unet, "down_blocks.0", 0.2)

    def published_hook(module, inputs, output):  # the published addition: every row, a 0/1 scale tensor
        if published_control is None:
            return None
        hidden, skips = output
        scale = torch.ones(hidden.shape[0], 1, 1, 1, device=hidden.device, dtype=hidden.dtype)
        scale[: hidden.shape[0] // 2] = 0
        return hidden + cross_normalize(published_control.to(hidden.dtype), hidden) * scale * 0.2, skips

    published_control = None
    unet.down_blocks[0].register_forward_hook(published_hook)

    def run(mode: str, x) -> None:
        nonlocal published_control
        unet_args = (x["sample"], x["timestep"], x["encoder_hidden_states"], x["added_time_ids"])
        if mode == "plain":
            unet(*unet_args, return_dict=False)
        elif mode == "ours":
            injector.set(encoder(x["poses"], x["timestep"]), 1.0)
            unet(*unet_args, return_dict=False)
            injector.clear()
        elif mode == "encoder":
            encoder(x["poses"], x["timestep"])
        else:  # published: the doubled batch through the encoder
            published_control = encoder(torch.cat([x["poses"]] * 2), x["timestep"])
            unet(*unet_args, return_dict=False)
            published_control = None

    modes = {"plain": dtype, "ours": dtype, "encoder": dtype, "published": torch.float32}
    inputs = {d: make_inputs(args.frames, height, width, device, d) for d in set(modes.values())}
    times = {mode: [] for mode in modes}
    peaks, calls = {}, {}
    with torch.no_grad():
        for repeat in range(args.repeats + 1):  # the first round warms up and is not counted
            for mode, mode_dtype in modes.items():
                unet.to(device, mode_dtype)
                encoder.to(device, mode_dtype)
                synchronize(device)
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                counter.calls = counter.frames = 0
                began = time.perf_counter()
                run(mode, inputs[mode_dtype])
                synchronize(device)
                if repeat:
                    times[mode].append(time.perf_counter() - began)
                calls[mode] = (counter.calls, counter.frames)
                if device.type == "cuda":
                    peaks[mode] = torch.cuda.max_memory_allocated(device) / 2**30
    median = {mode: statistics.median(values) for mode, values in times.items()}
    result = {
        "machine": f"{platform.machine()} {torch.get_num_threads()} threads" if device.type == "cpu"
        else torch.cuda.get_device_name(device),
        "device": str(device), "dtype_ours": args.dtype, "dtype_published": "fp32",
        "unet": "full-size SVD-XT (random weights)", "size": f"{width}x{height}", "frames_per_window": args.frames,
        "repeats": args.repeats, "build_s": round(build_s, 1),
        "step_s": {mode: round(value, 4) for mode, value in median.items()},
        "control_overhead": round(statistics.median(o / p - 1 for o, p in zip(times["ours"], times["plain"])), 4),
        "control_overhead_of_medians": round(median["ours"] / median["plain"] - 1, 4),
        "encoder_share": round(median["encoder"] / median["plain"], 4),
        "encoder_calls_per_step": {"ours": calls["ours"][0], "published": calls["published"][0]},
        "encoder_frames_per_step": {"ours": calls["ours"][1], "published": calls["published"][1]},
        "time_ratio_vs_published": round(median["ours"] / median["published"], 4),
    }
    shares = {f"{width}x{height}": flop_share(width, height), "576x1024": flop_share(576, 1024)}
    result["encoder_flop_share"] = {size: round(share[0], 4) for size, share in shares.items()}
    result["encoder_stem_flop_share"] = {size: round(share[1], 4) for size, share in shares.items()}
    if peaks:
        result["peak_memory_gib"] = {mode: round(value, 3) for mode, value in peaks.items()}
        result["peak_memory_ratio_vs_published"] = round(peaks["ours"] / peaks["published"], 4)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
