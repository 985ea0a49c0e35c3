"""Predicted peak GPU memory of a whole full-size video, ours vs the published pipeline's settings, without a GPU.

The real pipeline runs on fake tensors (torch's FakeTensorMode: shapes, dtypes and the ops' output sizes,
no storage, no compute) and torch's MemTracker counts the bytes of every live tensor, peak included.
The full-size SVD-XT architecture with the published pose encoder (bench/fullsize.py), 576x1024.

Modes, each a fresh pipeline:
- ours: fp16 (our CUDA default), all models resident, pose frames uint8, the encoder on the conditional frames,
  streamed decode in chunks chosen by `decode_chunk_for` for a card of --card-gib;
- ours_low_vram: --low-vram: model offload (only the running model resident: the UNet and the pose encoder while
  sampling, the VAE while decoding), the UNet's feed-forward one frame at a time, one-frame decode chunks;
- published: fp32, all models resident, pose frames fp32 on the device, the encoder on the doubled guidance batch,
  the reference pose in every window, decode chunk 2 with the whole video decoded before writing.
What a fake run cannot see, so the figures leave out: the CUDA context (~0.5 GiB), the caching allocator's slack,
cuDNN/cuBLAS workspaces. Host-side steps (PIL to tensors, CLIP's feature extractor, the scheduler's CPU sigmas) run
on real tensors; the fp16 VAE encoder is not upcast (one frame; `.to()` cannot swap fake parameters), which leaves
the sampling peak unchanged because the UNet's activations are far larger.
One denoising step is enough: every step holds the same tensors.

Prints one JSON object as its last line: per mode, resident parameters and activation peaks of sampling and decoding,
`predicted_peak_gib`, and `peak_memory_ratio` (ours / published), `fits_20gib` per mode, and the decode working memory
per frame (`decode_gib_per_frame`) next to what `svd_animate.memory` assumes.
Run: .venv/bin/python bench/memory.py            (48 frames, windows 24/6; about 7 minutes on 2 cores)
     .venv/bin/python bench/memory.py --quick    (24 frames, one window; about 3 minutes)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import diffusers
import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.fullsize import full_components, published_settings  # noqa: E402
from svd_animate.memory import decode_chunk_for  # noqa: E402
from svd_controlnext.decode import iter_decoded_chunks  # noqa: E402
from svd_controlnext.pipeline import ControlNeXtSVDPipeline  # noqa: E402

GIB = 2**30
MODELS = ("unet", "vae", "image_encoder", "pose_encoder")


def on_real_tensors(function):
    """Run a host-side step outside the fake mode (it reads values: numpy conversions, CPU sigmas)."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    def call(*args, **kwargs):
        with unset_fake_temporarily():
            return function(*args, **kwargs)
    return call


def fake_pipeline(components: dict) -> ControlNeXtSVDPipeline:
    """The pipeline of meta `components`, its parameters made fake; call inside a FakeTensorMode."""
    components = dict(components)
    for name in MODELS:
        components[name] = components[name].to_empty(device="cpu").eval()
    pipe = ControlNeXtSVDPipeline(**components)
    pipe.set_progress_bar_config(disable=True)
    pipe.vae.to = lambda *args, **kwargs: pipe.vae
    pipe.video_processor.preprocess = on_real_tensors(pipe.video_processor.preprocess)
    pipe.feature_extractor = lambda images, **kwargs: SimpleNamespace(pixel_values=torch.zeros(1, 3, 224, 224))
    for name in ("set_timesteps", "scale_model_input", "step"):
        setattr(pipe.scheduler, name, on_real_tensors(getattr(pipe.scheduler, name)))
    return pipe


@contextmanager
def tracked(models):
    """MemTracker over a block that may call modules many times: at each top-level module call it
    drops the per-module statistics of the last (it refuses repeated calls otherwise); the peak is kept."""
    from torch.distributed._tools.mem_tracker import MemTracker
    from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook

    tracker = MemTracker()
    tracker.track_external(*models)
    depth = 0

    def enter(module, args):
        nonlocal depth
        if depth == 0:
            tracker.reset_mod_stats()
        depth += 1

    def leave(module, args, output):
        nonlocal depth
        depth -= 1

    hooks = [register_module_forward_pre_hook(enter), register_module_forward_hook(leave, always_call=True)]
    result = SimpleNamespace()
    try:
        with torch.no_grad(), tracker:
            yield result
    finally:
        for hook in hooks:
            hook.remove()
    peak = next(iter(tracker.get_tracker_snapshot("peak").values()))
    totals = {str(kind).split(".")[-1]: value for kind, value in peak.items()}
    result.activations = (totals["Total"] - totals["PARAM"] - totals["BUFFER"]) / GIB


def parameter_gib(pipe, names) -> float:
    return sum(p.numel() * p.element_size() for name in names for p in getattr(pipe, name).parameters()) / GIB


def measure(mode: str, args) -> dict:
    from torch._subclasses.fake_tensor import FakeTensorMode

    published, low_vram = mode == "published", mode == "ours_low_vram"
    dtype = torch.float32 if published else torch.float16
    width, height = args.width, args.height
    rng = np.random.default_rng(0)
    reference = rng.integers(0, 255, (height, width, 3), dtype=np.uint8)
    poses = rng.integers(0, 255, (args.frames, height, width, 3), dtype=np.uint8)
    components = full_components(meta=True)
    for name in MODELS:
        components[name].to(dtype)
    with FakeTensorMode(allow_non_fake_inputs=True):
        pipe = fake_pipeline(components)
        models = [getattr(pipe, name) for name in MODELS]
        if published:
            published_settings(pipe)
            pose_input = torch.from_numpy(poses).permute(0, 3, 1, 2).float().div(255)  # the video on the device
        else:
            pose_input = poses  # uint8; counted as device memory here, really kept on the host
        if low_vram:
            pipe.unet.enable_forward_chunking()
        with tracked(models) as sampling:
            latents = pipe(Image.fromarray(reference), pose_input, height=height, width=width, num_frames=args.frames,
                           num_inference_steps=args.steps, min_guidance_scale=3.0, max_guidance_scale=3.0,
                           window_size=args.window, window_overlap=args.overlap,
                           fusion="uniform" if published else "ramp", reference_pose_in_every_window=published,
                           generator=torch.Generator().manual_seed(0), output_type="latent").frames
        if published:
            chunk = 2
        elif low_vram:
            chunk = 1
        else:  # what `svd-animate` picks on a card of --card-gib with the models loaded
            free = args.card_gib * GIB - parameter_gib(pipe, MODELS) * GIB
            chunk = decode_chunk_for(int(free), width, height, torch.finfo(dtype).bits // 8)
        with tracked(models) as decoding:
            if published:  # diffusers' decode_latents: the whole video stays on the device until written
                pipe.decode_latents(latents, args.frames, chunk)
            else:
                for frames in iter_decoded_chunks(pipe.vae, latents, chunk):
                    del frames
        sampling_models = ("unet", "pose_encoder") if low_vram else MODELS
        decoding_models = ("vae",) if low_vram else MODELS
        sampling_params, decoding_params = parameter_gib(pipe, sampling_models), parameter_gib(pipe, decoding_models)
    sampling_peak = sampling_params + sampling.activations
    decoding_peak = decoding_params + decoding.activations
    return {"dtype": str(dtype).replace("torch.", ""), "decode_chunk": chunk,
            "sampling": {"parameters_gib": round(sampling_params, 3), "activations_gib": round(sampling.activations, 3),
                         "peak_gib": round(sampling_peak, 3)},
            "decoding": {"parameters_gib": round(decoding_params, 3), "activations_gib": round(decoding.activations, 3),
                         "peak_gib": round(decoding_peak, 3)},
            "decode_gib_per_frame": round(decoding.activations / chunk, 4),
            "predicted_peak_gib": round(max(sampling_peak, decoding_peak), 3)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=576)
    parser.add_argument("--height", type=int, default=1024)
    parser.add_argument("--frames", type=int, default=48)
    parser.add_argument("--window", type=int, default=24)
    parser.add_argument("--overlap", type=int, default=6)
    parser.add_argument("--steps", type=int, default=1, help="denoising steps (each holds the same tensors)")
    parser.add_argument("--card-gib", type=float, default=24.0, help="the GPU our decode chunk is chosen for")
    parser.add_argument("--quick", action="store_true", help="24 frames, one window")
    args = parser.parse_args()
    if args.quick:
        args.frames = args.window = 24
    diffusers.utils.logging.set_verbosity_error()  # casting the fake models to fp16 warns once per model
    started = time.perf_counter()
    modes = {mode: measure(mode, args) for mode in ("ours", "ours_low_vram", "published")}
    from svd_animate.memory import DECODE_BYTES_PER_PIXEL_FP32

    print(json.dumps({
        "method": "fake tensors + torch MemTracker (live tensor bytes; no CUDA context, allocator slack or workspaces)",
        "architecture": "full-size SVD-XT + published pose encoder", "size": f"{args.width}x{args.height}",
        "frames": args.frames, "window": args.window, "overlap": args.overlap, "card_gib": args.card_gib,
        "modes": modes,
        "peak_memory_ratio": round(modes["ours"]["predicted_peak_gib"] / modes["published"]["predicted_peak_gib"], 4),
        "fits_20gib": {mode: result["predicted_peak_gib"] <= 20 for mode, result in modes.items()},
        "decode_gib_per_frame_assumed_fp16": round(DECODE_BYTES_PER_PIXEL_FP32 * args.width * args.height / 2 / GIB, 4),
        "seconds": round(time.perf_counter() - started, 1),
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
