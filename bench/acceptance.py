"""Every mode of the tool on a GPU, in one unattended run with one JSON: the script to run first on a lent GPU.

Run:  bash bench/gpu.sh                  (on the GPU machine, with OUT set: at most 8 minutes on one H100; it
                                          installs the wheels carried in .whl/, then runs this with --device cuda)
      python3 bench/acceptance.py --device cuda --out DIR [--budget 450] [--only a,b] [--skip a,b]
      .venv/bin/python bench/acceptance.py --dry-run --out /tmp/acceptance   (this CPU: tiny models, 64x64; ~3 min)
      .venv/bin/python bench/acceptance.py --list [--dry-run]                 (the plan: modes, limits, no run)

Setup: the full-size SVD-XT architecture and the published pose encoder with random weights (bench/fullsize.py),
576x1024 (WIDTHxHEIGHT), windows of 24 frames overlapping by 6, built once from seed 0 by the `weights` step and
saved under --work, which each later mode loads in seconds instead of drawing 2.3 G random numbers again.
Shapes: `video` = 30 frames in two windows, 25 steps (BENCHMARKS.md's `bench/e2e.py` figures: 1.38 s per output
frame fp16, 0.38 with --fast on an H100); `window` = 24 frames, one window, 4 steps; `short` = 24 frames, 2 steps.
`--fast` keeps its own 10 steps at every shape.

Each mode runs in its own process (bench/e2e.py's `make_pipeline` / `run_video` for sampling), under its own time
limit (cut to what is left of --budget; a mode is skipped when less than its expected time is left), in this order,
the most telling first. Expected seconds on one H100 (process start and model load included):

| mode               | what                                                                 | expected | limit |
| ------------------ | -------------------------------------------------------------------- | -------- | ----- |
| weights            | full-size random weights built (seed 0) and saved for the others     |       30 |    90 |
| published          | fp32, model offload (the published script's), published settings     |       35 |    60 |
|                    | (encoder on the doubled batch, uniform fusion, decode chunk 2)       |          |       |
| default            | fp16, ours; `video`, then `window` and `short` as references         |       60 |    90 |
| fast               | --fast; `video`, then `window` as a reference                        |       28 |    45 |
| compile            | --compile (inductor); `window` twice: the first compiles (warm-up)   |       70 |   110 |
| compile_fast       | --compile --fast; `window` twice                                     |       50 |    80 |
| bf16               | --dtype bf16; `window`                                               |       15 |    30 |
| low_vram           | --low-vram (model offload, feed-forward chunking, decode chunk 1)    |       17 |    35 |
| offload_model      | --offload model; `window`                                            |       16 |    30 |
| offload_sequential | --offload sequential; `short`                                        |       20 |    45 |
| step               | bench/step.py --device cuda --size 576x1024 --frames 24 --dtype fp16 |       40 |    60 |
|                    | --repeats 2 (control overhead per step)                              |          |       |
| decode             | the full VAE, fp16: 24 frames at 576x1024 in chunks of 8 (direct:    |       12 |    30 |
|                    | bench/decode.py runs on the CPU only)                                |          |       |
| train_full         | encoder + whole UNet, 576x1024, 14 frames, bf16 autocast, gradient   |       20 |    45 |
|                    | checkpointing, AdamW: 1 warm-up + 3 timed steps (svd_animate.train)  |          |       |
| train_lora         | encoder + LoRA (rank 16), the same                                   |       18 |    40 |
| dwpose             | onnxruntime's CUDAExecutionProvider on tiny graphs with the DWPose   |        5 |    20 |
|                    | models' signatures (tests/helpers.py); "absent" when it is missing   |          |       |

Expected total 436 s, plus ~10 s of setup in bench/gpu.sh: under 8 minutes. The limits add up to more (810 s):
they stop a hang or an OOM that does not fail fast, and --budget (bench/gpu.sh: 470 s from its own start) bounds
the whole; a slow mode takes its overrun from the last ones (which are skipped, and say so), never from the run.

Per mode: seconds per output frame (sampling and decoding apart too), peak GPU memory (max_memory_allocated and
reserved), and the final latents' distance to the fp16 default's at the same shape (max and mean absolute
difference, each relative to the default's; --fast modes also to --fast's) with the time ratio (this mode / the
default; `time_ratio_ours_vs_published` in the summary is bench/e2e.py's `time_ratio`, at `window`); its error
(OOM, timeout, exit status, the last lines of stderr) when it fails. Random weights: distances bound a change,
they say nothing about quality.

--dry-run: the whole plan on this CPU with device cpu and the tiny components (svd_controlnext.tiny): 64x64,
`video` 8 frames in windows of 4 overlapping by 1, 2 steps; `window` 4 frames, 2 steps; `short` 1 step; tiny
training (64x64, 4 frames, 1 + 2 steps), decode 8 frames in chunks of 4, step.py at 64x64 with 2 frames (that
one builds the full-size UNet: the longest part); compile with torch.compile's `eager` backend (dynamo only:
inductor's CPU code is not what a GPU runs, and `aot_eager` fails on the full UNet with this CPU build); offload
modes run as `none` (svd-animate does the same on a CPU); DWPose on the CPU provider. Same JSON structure.

Output (--out, default $OUT, else /tmp/acceptance-out):
  acceptance.json    everything: setup, one record per mode, a summary; rewritten after every mode
  <mode>.json        one record, written the moment the mode ends (in --modes-dir, default --out; bench/gpu.sh
                     keeps them in /tmp and packs them with the modes' logs into $OUT/modes.tar.gz, because the
                     device tool brings back 8 files at most)
  logs/<mode>.out, logs/<mode>.err   each mode's own output (beside the <mode>.json files)
A record: mode, kind, what, status (ok | failed | timeout | skipped), error, exit_status, wall_s, limit_s,
stderr_tail, command, result (the measures; sampling: shape, frames, steps, seconds, sampling_s, decoding_s,
seconds_per_frame, sampling_s_per_frame, decoding_s_per_frame, peak_cuda_gib, peak_cuda_reserved_gib,
vs_default, ...), partial (what a mode that timed out had written).
Testing the harness: --fail MODE makes a mode raise, --hang MODE makes it hang, --limit MODE=SECONDS.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FORMAT = "svd-animate.acceptance"
GPU_SETUP_S = 10  # bench/gpu.sh before this script: wheels, nvidia-smi
BUDGET_S = 450  # when run directly on a GPU (bench/gpu.sh passes 470 s less its own setup)
DRY_BUDGET_S = 1200
FINISH_S = 3  # kept for the last write
BENCHMARKS_H100 = {"default_s_per_frame": 1.381, "fast_s_per_frame": 0.384, "default_peak_cuda_gib": 14.973}
RECORD_KEYS = ("mode", "kind", "what", "status", "error", "exit_status", "wall_s", "limit_s", "stderr_tail", "command",
               "result", "partial")
SAMPLING_KEYS = ("shape", "frames", "steps", "seconds", "sampling_s", "decoding_s", "seconds_per_frame",
                 "sampling_s_per_frame", "decoding_s_per_frame", "peak_cuda_gib", "peak_cuda_reserved_gib",
                 "vs_default")


@dataclasses.dataclass(frozen=True)
class Mode:
    name: str
    kind: str  # weights | sampling | step | decode | train | dwpose
    expected_s: int  # on one H100 at full size, process start and model load included
    limit_s: int  # on one H100
    what: str
    sampler: str = "ours"  # bench/e2e.py's mode: published | ours | fast
    dtype: str | None = None  # None: the run's default (fp16 on CUDA, fp32 on CPU)
    offload: str = "none"
    low_vram: bool = False
    compile: bool = False
    shape: str = "window"
    references: tuple[str, ...] = ()  # shapes run after the measured one, for the others to compare with
    trainable: str = ""


MODES = (
    Mode("weights", "weights", 30, 90, "full-size random weights built from seed 0 and saved for the modes to load"),
    Mode("published", "sampling", 35, 60, "published settings: fp32, model offload, encoder on the doubled batch, "
         "uniform fusion, whole video decoded in chunks of 2", sampler="published", dtype="fp32", offload="model"),
    Mode("default", "sampling", 60, 90, "ours, the default dtype (fp16 on CUDA)", shape="video",
         references=("window", "short")),
    Mode("fast", "sampling", 28, 45, "--fast", sampler="fast", shape="video", references=("window",)),
    Mode("compile", "sampling", 70, 110, "--compile: the first run compiles (warm-up), the second is measured",
         compile=True),
    Mode("compile_fast", "sampling", 50, 80, "--compile --fast: warm-up run, then the measured one", sampler="fast",
         compile=True),
    Mode("bf16", "sampling", 15, 30, "--dtype bf16", dtype="bf16"),
    Mode("low_vram", "sampling", 17, 35, "--low-vram: model offload, feed-forward chunking, decode chunk 1",
         low_vram=True),
    Mode("offload_model", "sampling", 16, 30, "--offload model", offload="model"),
    Mode("offload_sequential", "sampling", 20, 45, "--offload sequential", offload="sequential", shape="short"),
    Mode("step", "step", 40, 60, "bench/step.py: one denoising step, plain vs ours vs published (control overhead)"),
    Mode("decode", "decode", 12, 30, "the full temporal VAE decoding frames in chunks (direct measurement)"),
    Mode("train_full", "train", 20, 45, "training steps: the encoder and the whole UNet, bf16 autocast, gradient "
         "checkpointing, AdamW", trainable="encoder+unet"),
    Mode("train_lora", "train", 18, 40, "training steps: the encoder and LoRA adapters on the UNet",
         trainable="lora"),
    Mode("dwpose", "dwpose", 5, 20, "DWPose on onnxruntime's CUDA provider (tiny graphs, the real signatures)"),
)
MODE_BY_NAME = {mode.name: mode for mode in MODES}
DRY_LIMIT_S = {"step": 300}  # the full-size UNet built on this CPU; others: 150


def default_work() -> str:
    """/dev/shm when it can hold the full-size weights (8.4 GiB) with room to spare (written in seconds), else /tmp."""
    try:
        shm = os.statvfs("/dev/shm")
        if shm.f_bavail * shm.f_frsize > 24 * 2**30:
            return "/dev/shm/svd-animate-acceptance"
    except OSError:
        pass
    return "/tmp/svd-animate-acceptance"


def make_settings(args) -> dict:
    """Everything a child needs, written once to settings.json in the run folder."""
    run = Path(args.work) / "run"
    common = {"device": args.device, "work": str(run), "latents_dir": str(run / "latents"),
              "logs": str(Path(args.modes_dir or args.out) / "logs"), "fail": args.fail, "hang": args.hang,
              "dry_run": args.dry_run}
    if args.dry_run:
        return {**common, "arch": "tiny", "size": "64x64", "dtype": "fp32", "compile_backend": "eager",
                "weights_dir": str(Path(args.work) / "weights-tiny"),
                "shapes": {"video": dict(frames=8, window=4, overlap=1, steps=2),
                           "window": dict(frames=4, window=4, overlap=1, steps=2),
                           "short": dict(frames=4, window=4, overlap=1, steps=1)},
                "train": dict(size="64x64", frames=4, warmup=1, steps=2),
                "decode": dict(frames=8, chunk=4),
                "step": dict(size="64x64", frames=2, dtype="fp32", repeats=1),
                "dwpose": dict(frames=4)}
    return {**common, "arch": "full", "size": "576x1024", "dtype": "fp16" if args.device.startswith("cuda") else "fp32",
            "compile_backend": "inductor", "weights_dir": str(Path(args.work) / "weights-full"),
            "shapes": {"video": dict(frames=30, window=24, overlap=6, steps=25),
                       "window": dict(frames=24, window=24, overlap=6, steps=4),
                       "short": dict(frames=24, window=24, overlap=6, steps=2)},
            "train": dict(size="576x1024", frames=14, warmup=1, steps=3),
            "decode": dict(frames=24, chunk=8),
            "step": dict(size="576x1024", frames=24, dtype="fp16", repeats=2),
            "dwpose": dict(frames=20)}


# ---- the children ---------------------------------------------------------------------------------

def write_json(path: Path, value) -> None:
    """Whole or not at all: a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(value, indent=1) + "\n")
    os.replace(tmp, path)


class Progress:
    """What a child has measured so far, in <mode>.partial.json: kept when the mode times out."""

    def __init__(self, settings: dict, name: str):
        self.path = Path(settings["work"]) / f"{name}.partial.json"
        self.values: dict = {}

    def __call__(self, **values) -> None:
        self.values.update(values)
        write_json(self.path, self.values)


def load_components(settings: dict, names: tuple[str, ...] | None = None) -> dict:
    """The components the `weights` step saved (all, or `names`), else built here from the same seed."""
    import torch

    from bench.fullsize import full_components
    from svd_controlnext.tiny import tiny_components

    build = tiny_components if settings["arch"] == "tiny" else full_components
    folder = Path(settings["weights_dir"])
    if not (folder / "complete").exists():
        components = build()
    else:
        from accelerate import init_empty_weights

        with init_empty_weights(include_buffers=False):  # parameters on the meta device, buffers real
            components = build()
        for name, model in components.items():
            if isinstance(model, torch.nn.Module) and (names is None or name in names):
                model.load_state_dict(torch.load(folder / f"{name}.pt", mmap=True, weights_only=True), assign=True)
    if names is not None:
        components = {name: value for name, value in components.items() if name in names}
    return components


def weights_child(mode: Mode, settings: dict, progress: Progress) -> dict:
    import torch

    from bench.fullsize import full_components
    from svd_controlnext.tiny import tiny_components

    folder = Path(settings["weights_dir"])
    out = {"arch": settings["arch"], "folder": str(folder), "device": device_info(settings["device"]),
           "versions": versions()}
    if (folder / "complete").exists():
        return {**out, "reused": True, **json.loads((folder / "complete").read_text())}
    started = time.perf_counter()
    components = (tiny_components if settings["arch"] == "tiny" else full_components)()
    built = time.perf_counter()
    progress(build_s=round(built - started, 1))
    folder.mkdir(parents=True, exist_ok=True)
    parameters, size = {}, 0
    for name, model in components.items():
        if isinstance(model, torch.nn.Module):
            tmp = folder / f".{name}.pt.tmp"
            torch.save(model.state_dict(), tmp)
            os.replace(tmp, folder / f"{name}.pt")
            size += (folder / f"{name}.pt").stat().st_size
            parameters[name] = round(sum(p.numel() for p in model.parameters()) / 1e6, 2)
    saved = {"build_s": round(built - started, 1), "save_s": round(time.perf_counter() - built, 1),
             "gib_on_disk": round(size / 2**30, 2), "parameters_millions": parameters}
    (folder / "complete").write_text(json.dumps(saved))
    return {**out, "reused": False, **saved}


def device_info(device: str) -> dict:
    import torch

    info = {"device": device, "torch": torch.__version__}
    if device.startswith("cuda"):
        properties = torch.cuda.get_device_properties(torch.device(device))
        info.update(name=properties.name, memory_gib=round(properties.total_memory / 2**30, 2),
                    capability=f"{properties.major}.{properties.minor}", cuda=torch.version.cuda)
    return info


def versions() -> dict:
    from importlib import metadata

    found = {}
    for name in ("torch", "diffusers", "transformers", "accelerate", "peft", "onnxruntime", "onnxruntime-gpu", "av"):
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def e2e_args(settings: dict, mode: Mode, shape: str) -> argparse.Namespace:
    """bench/e2e.py's arguments for `mode` at `shape`."""
    return argparse.Namespace(device=settings["device"], dtype=mode.dtype or settings["dtype"], size=settings["size"],
                              offload=mode.offload, low_vram=mode.low_vram, compile=mode.compile,
                              compile_backend=settings["compile_backend"], **settings["shapes"][shape])


def memory_peaks(device: str) -> dict:
    import torch

    if not device.startswith("cuda"):
        return {"peak_cuda_gib": None, "peak_cuda_reserved_gib": None}
    return {"peak_cuda_gib": round(torch.cuda.max_memory_allocated(torch.device(device)) / 2**30, 3),
            "peak_cuda_reserved_gib": round(torch.cuda.max_memory_reserved(torch.device(device)) / 2**30, 3)}


def sampling_child(mode: Mode, settings: dict, progress: Progress) -> dict:
    import torch

    from bench import e2e

    def measured(shape: str):
        args = e2e_args(settings, mode, shape)
        out, latents = e2e.run_video(pipe, mode.sampler, args, dtype)
        out = {"shape": shape, "frames": args.frames, "window": args.window, "overlap": args.overlap,
               "steps": args.steps, **out, **memory_peaks(settings["device"]),
               "sampling_s_per_frame": round(out["sampling_s"] / args.frames, 4),
               "decoding_s_per_frame": round(out["decoding_s"] / args.frames, 4)}
        return out, latents

    started = time.perf_counter()
    pipe, dtype = e2e.make_pipeline(mode.sampler, e2e_args(settings, mode, mode.shape),
                                    lambda: load_components(settings))
    setup = {"build_s": round(time.perf_counter() - started, 1), "dtype": str(dtype).replace("torch.", ""),
             "offload": mode.offload, "low_vram": mode.low_vram,
             "compile_backend": settings["compile_backend"] if mode.compile else None}
    progress(**setup)
    warmup = None
    if mode.compile:
        warmup, _ = measured(mode.shape)
        progress(warmup=warmup)
    out, latents = measured(mode.shape)
    latents_dir = Path(settings["latents_dir"])
    latents_dir.mkdir(parents=True, exist_ok=True)
    torch.save(latents, latents_dir / f"{mode.name}@{mode.shape}.pt")
    progress(measured=out)
    references = {}
    for shape in mode.references:
        references[shape], latents = measured(shape)
        torch.save(latents, latents_dir / f"{mode.name}@{shape}.pt")
        progress(references=references)
    return {**out, **setup, "warmup": warmup, "references": references}


def decode_child(mode: Mode, settings: dict, progress: Progress) -> dict:
    import torch

    from svd_controlnext.decode import iter_decoded_chunks, iter_decoded_frames

    device = torch.device(settings["device"])
    dtype = {"fp16": torch.float16, "fp32": torch.float32}[settings["dtype"]]
    frames, chunk = settings["decode"]["frames"], settings["decode"]["chunk"]
    vae = load_components(settings, ("vae",))["vae"].eval().to(device, dtype)
    width, height = map(int, settings["size"].split("x"))
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    latents = torch.randn(1, frames, 4, height // factor, width // factor,
                          generator=torch.Generator().manual_seed(0)).to(device, dtype)
    started = time.perf_counter()
    for _ in iter_decoded_chunks(vae, latents[:, :chunk], chunk):  # first-call costs
        pass
    synchronize(device)
    warmup_s = time.perf_counter() - started
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    started = time.perf_counter()
    checksum = sum(int(frame[0, 0, 0]) for frame in iter_decoded_frames(vae, latents, chunk))
    synchronize(device)
    seconds = time.perf_counter() - started
    return {"method": "direct: svd_controlnext.decode.iter_decoded_frames on the full VAE (bench/decode.py runs on "
                      "the CPU only)", "size": settings["size"], "frames": frames, "chunk": chunk,
            "dtype": settings["dtype"], "warmup_s": round(warmup_s, 2), "seconds": round(seconds, 3),
            "seconds_per_frame": round(seconds / frames, 4), "checksum": checksum, **memory_peaks(settings["device"])}


def synchronize(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_child(mode: Mode, settings: dict, progress: Progress) -> dict:
    """A few optimiser steps as `svd-animate train` takes them (its loss, model placement, trainable selection and
    optimiser; bf16 autocast as accelerate's), on the random components and a random batch: no data, no accelerate."""
    import torch

    from svd_animate.train.config import TrainConfig
    from svd_animate.train.trainer import (ControlInjector, make_optimizer, place_models, select_trainable,
                                           training_loss)

    device = torch.device(settings["device"])
    spec = settings["train"]
    width, height = map(int, spec["size"].split("x"))
    frames = spec["frames"]
    config = TrainConfig(base_model=settings["arch"], trainable=mode.trainable, width=width, height=height,
                         num_frames=frames, mixed_precision="bf16", gradient_checkpointing=True)
    models = load_components(settings)
    unet, encoder = models["unet"], models["pose_encoder"]
    parameters = select_trainable(config, unet, encoder)
    unet_trains = any(p.requires_grad for p in unet.parameters())
    place_models(config, models, unet_trains, device)
    unet.to(device)
    encoder.to(device)
    unet.train()
    encoder.train()
    injector = ControlInjector(unet, encoder.config.injection_site, encoder.config.control_strength)
    optimizer = make_optimizer(config, parameters)
    generator = torch.Generator().manual_seed(0)
    pixels = torch.rand(1, frames, 3, height, width, generator=generator) * 2 - 1
    hands = torch.ones(1, frames, height, width)
    hands[..., height // 4: height // 2, width // 4: width // 2] = config.hand_loss_weight
    batch = {"pixels": pixels, "poses": torch.rand(1, frames, 3, height, width, generator=generator),
             "reference": pixels[:, 0].clone(), "hand_weights": hands, "index": torch.tensor([0])}
    trainable = sum(p.numel() for p in parameters)
    progress(trainable_millions=round(trainable / 1e6, 2))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times, losses = [], []
    for step in range(spec["warmup"] + spec["steps"]):
        started = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = training_loss(batch, models, unet, encoder, injector, config,
                                 torch.Generator().manual_seed(step))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, config.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(round(loss.item(), 4))  # (waits for the device)
        times.append(time.perf_counter() - started)
        progress(step_s=[round(t, 3) for t in times], losses=losses)
    timed = times[spec["warmup"]:]
    injector.remove()
    return {"trainable": mode.trainable, "size": spec["size"], "frames": frames, "batch": 1,
            "mixed_precision": "bf16", "gradient_checkpointing": True, "trainable_millions": round(trainable / 1e6, 2),
            "warmup_steps": spec["warmup"], "steps": spec["steps"], "warmup_s": round(sum(times[:spec["warmup"]]), 2),
            "seconds_per_step": round(sum(timed) / len(timed), 3), "step_s": [round(t, 3) for t in timed],
            "losses": losses, **memory_peaks(settings["device"])}


def dwpose_child(mode: Mode, settings: dict, progress: Progress) -> dict:
    """The DWPose detector class on onnxruntime's CUDA provider, with tiny graphs of the real models' input and
    output signatures: the timing covers the pre- and post-processing and the transfers, not the real networks."""
    try:
        import onnxruntime as ort
    except ImportError as e:
        return {"onnxruntime": None, "cuda_provider": "absent", "reason": f"onnxruntime is not importable ({e})"}
    available = ort.get_available_providers()
    cuda = "CUDAExecutionProvider" in available
    out = {"onnxruntime": ort.__version__, "available_providers": available,
           "cuda_provider": "present" if cuda else "absent"}
    on_gpu = settings["device"].startswith("cuda")
    if on_gpu and not cuda:
        return {**out, "reason": "onnxruntime has no CUDAExecutionProvider (onnxruntime-gpu is not installed)"}
    import numpy as np

    from pose.detect.dwpose import DETECTOR_FILE, POSE_FILE, DWPoseDetector
    from tests.helpers import build_pose_graph, build_yolox_graph, yolox_output  # (needs onnx and PyAV)

    provider = "CUDAExecutionProvider" if on_gpu else "CPUExecutionProvider"
    folder = Path(settings["work"]) / "dwpose"
    folder.mkdir(parents=True, exist_ok=True)
    build_yolox_graph(folder / DETECTOR_FILE, yolox_output([(250, 100, 390, 560)]))
    build_pose_graph(folder / POSE_FILE)
    detector = DWPoseDetector(folder / DETECTOR_FILE, folder / POSE_FILE, providers=[provider])
    used = detector.detector.get_providers()
    width, height = map(int, settings["size"].split("x"))
    image = np.zeros((height, width, 3), np.uint8)
    image[height // 3, width // 2] = 255
    for _ in range(2):  # first-run costs
        detector.detect(image)
    frames = settings["dwpose"]["frames"]
    started = time.perf_counter()
    found = sum(detector.detect(image) is not None for _ in range(frames))
    seconds = time.perf_counter() - started
    return {**out, "provider_asked": provider, "providers_used": used,
            "fell_back_to_cpu": provider == "CUDAExecutionProvider" and used[0] != provider,
            "graphs": "tiny (tests/helpers.py), the real models' signatures", "frames": frames,
            "size": settings["size"], "ms_per_frame": round(1000 * seconds / frames, 2), "people_found": found}


CHILDREN = {"weights": weights_child, "sampling": sampling_child, "decode": decode_child, "train": train_child,
            "dwpose": dwpose_child}


def child_main(name: str, settings_path: str) -> int:
    settings = json.loads(Path(settings_path).read_text())
    mode = MODE_BY_NAME[name]
    result_path = Path(settings["work"]) / f"{name}.result.json"
    if name in settings["hang"]:
        print(f"{name}: hanging on purpose (--hang)", file=sys.stderr, flush=True)
        while True:
            time.sleep(1)
    sys.path.insert(0, str(ROOT))
    try:
        if name in settings["fail"]:
            raise RuntimeError(f"injected failure (--fail {name})")
        result = CHILDREN[mode.kind](mode, settings, Progress(settings, name))
    except BaseException as e:  # noqa: BLE001 - every failure becomes the mode's record
        traceback.print_exc()
        write_json(result_path, describe_error(e, settings["device"]))
        return 3 if is_oom(e) else 1
    write_json(result_path, result)
    return 0


def is_oom(error: BaseException) -> bool:
    return type(error).__name__ == "OutOfMemoryError" or "out of memory" in str(error).lower()


def describe_error(error: BaseException, device: str) -> dict:
    message = " ".join(str(error).split())[:600]
    out = {"error": f"OOM: {message}" if is_oom(error) else f"{type(error).__name__}: {message}"}
    if device.startswith("cuda") and "torch" in sys.modules:
        import torch

        if torch.cuda.is_initialized():
            out["cuda_at_error"] = {
                "allocated_gib": round(torch.cuda.memory_allocated() / 2**30, 3),
                "reserved_gib": round(torch.cuda.memory_reserved() / 2**30, 3),
                "max_allocated_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3)}
    return out


# ---- the parent ------------------------------------------------------------------------------------

class Interrupted(Exception):
    pass


def command_for(mode: Mode, settings: dict, settings_path: Path) -> list[str]:
    if mode.kind == "step":
        spec = settings["step"]
        return [sys.executable, str(ROOT / "bench" / "step.py"), "--device", settings["device"], "--size", spec["size"],
                "--frames", str(spec["frames"]), "--dtype", spec["dtype"], "--repeats", str(spec["repeats"])]
    return [sys.executable, str(Path(__file__).resolve()), "--child", mode.name, "--settings", str(settings_path)]


def tail(path: Path, lines: int = 20) -> list[str]:
    try:
        return path.read_text(errors="replace").splitlines()[-lines:]
    except OSError:
        return []


def read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def run_mode(mode: Mode, settings: dict, settings_path: Path, limit: float) -> dict:
    """One mode in its own process group, killed whole at `limit` seconds."""
    work = Path(settings["work"])
    command = command_for(mode, settings, settings_path)
    stdout, stderr = Path(settings["logs"]) / f"{mode.name}.out", Path(settings["logs"]) / f"{mode.name}.err"
    stdout.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    timed_out = interrupted = False
    with open(stdout, "w") as out, open(stderr, "w") as err:
        process = subprocess.Popen(command, stdout=out, stderr=err, cwd=ROOT, start_new_session=True)
        try:
            process.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            timed_out = True
        except Interrupted:
            interrupted = True
        finally:
            if process.poll() is None:
                kill_group(process)
        exit_status = process.returncode
    wall = round(time.perf_counter() - started, 1)
    record = {"mode": mode.name, "kind": mode.kind, "what": mode.what, "status": "ok", "error": None,
              "exit_status": exit_status, "wall_s": wall, "limit_s": round(limit, 1), "stderr_tail": [],
              "command": " ".join(command), "result": None, "partial": read_json(work / f"{mode.name}.partial.json")}
    if mode.kind == "step":
        lines = stdout.read_text(errors="replace").strip().splitlines()
        result = None
        if lines:
            try:
                result = json.loads(lines[-1])
            except ValueError:
                pass
    else:
        result = read_json(work / f"{mode.name}.result.json")
    errors = tail(stderr)
    if interrupted or timed_out:
        record.update(status="timeout", stderr_tail=errors,
                      error="interrupted: the whole run was stopped" if interrupted
                      else f"timed out after {limit:.0f} s (the process group was killed)")
    elif exit_status == 0 and isinstance(result, dict) and "error" not in result:
        record.update(result=result)
    else:
        record.update(status="failed", stderr_tail=errors)
        if isinstance(result, dict) and "error" in result:
            record["error"] = result.pop("error")
            record["result"] = result or None
        elif any("OutOfMemoryError" in line or "out of memory" in line.lower() for line in errors):
            record["error"] = "OOM: " + next(line for line in reversed(errors) if "memory" in line.lower()).strip()
        elif exit_status is not None and exit_status < 0:
            name = signal.Signals(-exit_status).name if -exit_status in signal.valid_signals() else -exit_status
            record["error"] = f"killed by signal {name} (host memory?)"
        else:
            record["error"] = f"exit status {exit_status}"
    if interrupted:
        raise Interrupted(record)
    return record


def kill_group(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)  # the child and what it started (compile workers, step.py)
    except ProcessLookupError:
        pass
    process.wait()


def compare(records: dict, mode: Mode, settings: dict) -> None:
    """The mode's time and final latents against the default's (and --fast's, for --fast modes) at its shape."""
    result = records[mode.name]["result"]
    if mode.kind != "sampling" or result is None:
        return
    import torch

    latents_dir = Path(settings["latents_dir"])
    for base, key in (("default", "vs_default"), ("fast", "vs_fast")):
        if mode.name == base or (key == "vs_fast" and mode.sampler != "fast"):
            result.setdefault(key, None)
            continue
        against = f"{base}@{mode.shape}"
        base_record = records.get(base) or {}
        base_result = base_record.get("result") or {}
        reference = base_result if base_result.get("shape") == mode.shape else base_result.get("references", {}).get(
            mode.shape)
        mine, theirs = latents_dir / f"{mode.name}@{mode.shape}.pt", latents_dir / f"{against}.pt"
        if reference is None or not theirs.exists() or not mine.exists():
            result[key] = {"against": against, "missing": f"{against} was not measured"}
            continue
        ours, base_latents = torch.load(mine, weights_only=True), torch.load(theirs, weights_only=True)
        difference = (ours - base_latents).abs()
        result[key] = {
            "against": against, "time_ratio": ratio(result["seconds"], reference["seconds"]),
            "sampling_ratio": ratio(result["sampling_s"], reference["sampling_s"]),
            "decoding_ratio": ratio(result["decoding_s"], reference["decoding_s"]),
            "latents_max_relative": round((difference.max() / base_latents.abs().max()).item(), 4),
            "latents_mean_relative": round((difference.mean() / base_latents.abs().mean()).item(), 4),
            "peak_cuda_ratio": ratio(result.get("peak_cuda_gib"), reference.get("peak_cuda_gib"))}


def ratio(a, b):
    return round(a / b, 4) if a is not None and b else None


def summarize(records: dict) -> dict:
    ok = {name: record["result"] for name, record in records.items() if record["status"] == "ok"}
    sampling = {name: result for name, result in ok.items() if MODE_BY_NAME[name].kind == "sampling"}
    summary = {"status": {name: record["status"] for name, record in records.items()},
               "errors": {name: record["error"] for name, record in records.items() if record["error"]}}
    for key in ("seconds_per_frame", "sampling_s_per_frame", "decoding_s_per_frame", "peak_cuda_gib",
                "peak_cuda_reserved_gib"):
        summary[key] = {name: result.get(key) for name, result in sampling.items()}
    summary["shape"] = {name: result.get("shape") for name, result in sampling.items()}
    for key in ("vs_default", "vs_fast"):
        summary[key] = {name: result[key] for name, result in sampling.items() if result.get(key)}
    published = summary["vs_default"].get("published", {})
    if published.get("time_ratio"):  # as bench/e2e.py's time_ratio: ours / published (same shape)
        summary["time_ratio_ours_vs_published"] = round(1 / published["time_ratio"], 4)
    summary["compile_warmup_s"] = {name: result["warmup"]["seconds"] for name, result in sampling.items()
                                   if result.get("warmup")}
    if "step" in ok:
        summary["control_overhead"] = ok["step"].get("control_overhead")
        summary["step_s"] = ok["step"].get("step_s")
    if "decode" in ok:
        summary["decode_s_per_frame"] = ok["decode"]["seconds_per_frame"]
        summary["decode_peak_cuda_gib"] = ok["decode"]["peak_cuda_gib"]
    train = {name: result for name, result in ok.items() if MODE_BY_NAME[name].kind == "train"}
    summary["train_s_per_step"] = {name: result["seconds_per_step"] for name, result in train.items()}
    summary["train_peak_cuda_gib"] = {name: result["peak_cuda_gib"] for name, result in train.items()}
    if "dwpose" in ok:
        summary["dwpose"] = {key: ok["dwpose"].get(key) for key in ("cuda_provider", "providers_used", "ms_per_frame")}
    summary["benchmarks_md_h100"] = BENCHMARKS_H100
    return summary


def plan(args) -> list[Mode]:
    names = [mode.name for mode in MODES]
    chosen = args.only.split(",") if args.only else names
    skipped = args.skip.split(",") if args.skip else []
    unknown = [name for name in chosen + skipped + args.fail + args.hang + list(args.limits) if name not in names]
    if unknown:
        sys.exit(f"unknown mode(s) {', '.join(unknown)}; modes: {', '.join(names)}")
    return [mode for mode in MODES if mode.name in chosen and mode.name not in skipped]


def mode_limit(mode: Mode, args) -> float:
    if mode.name in args.limits:
        return args.limits[mode.name]
    return DRY_LIMIT_S.get(mode.name, 150) if args.dry_run else mode.limit_s


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU (device cpu)")
    parser.add_argument("--out", default=os.environ.get("OUT") or "/tmp/acceptance-out")
    parser.add_argument("--modes-dir", help="where each <mode>.json goes (default: --out)")
    parser.add_argument("--work", default=default_work(),
                        help="the weights cache (kept for a rerun on the same machine) and latents (default: "
                             "/dev/shm/svd-animate-acceptance when /dev/shm has 24 GiB free, else /tmp/...)")
    parser.add_argument("--budget", type=float, help=f"seconds for the whole run (default {BUDGET_S}, dry run "
                                                     f"{DRY_BUDGET_S})")
    parser.add_argument("--only", help="comma-separated modes (default: all, in the planned order)")
    parser.add_argument("--skip", help="comma-separated modes to leave out")
    parser.add_argument("--fail", action="append", default=[], metavar="MODE", help="make MODE raise (harness test)")
    parser.add_argument("--hang", action="append", default=[], metavar="MODE", help="make MODE hang (harness test)")
    parser.add_argument("--limit", action="append", default=[], metavar="MODE=SECONDS", help="another limit")
    parser.add_argument("--list", action="store_true", help="print the plan and stop")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--settings", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child_main(args.child, args.settings)
    if args.dry_run:
        args.device = "cpu"
    try:
        args.limits = {name: float(value) for name, value in (item.split("=", 1) for item in args.limit)}
    except ValueError:
        sys.exit("--limit takes MODE=SECONDS")
    modes = plan(args)
    budget = args.budget or (DRY_BUDGET_S if args.dry_run else BUDGET_S)
    if args.list:
        for mode in modes:
            print(f"{mode.name:20} expected {mode.expected_s:4d} s on an H100, limit {mode_limit(mode, args):5.0f} s: "
                  f"{mode.what}")
        print(f"expected {sum(mode.expected_s for mode in modes)} s (+{GPU_SETUP_S} s bench/gpu.sh), "
              f"budget {budget:.0f} s")
        return 0
    return run_all(args, modes, budget)


def run_all(args, modes: list[Mode], budget: float) -> int:
    started = time.perf_counter()
    out = Path(args.out)
    modes_dir = Path(args.modes_dir or args.out)
    settings = make_settings(args)
    run = Path(settings["work"])
    if run.exists():
        import shutil

        shutil.rmtree(run)
    run.mkdir(parents=True)
    for mode in MODES:  # nothing of an earlier run may pass for this one's
        for stale in (modes_dir / f"{mode.name}.json", Path(settings["logs"]) / f"{mode.name}.out",
                      Path(settings["logs"]) / f"{mode.name}.err"):
            stale.unlink(missing_ok=True)
    settings_path = run / "settings.json"
    write_json(settings_path, settings)
    report = {"format": FORMAT, "version": 1, "dry_run": args.dry_run, "device": args.device, "device_info": None,
              "setup": {"architecture": "tiny (svd_controlnext.tiny)" if args.dry_run else
                        "full-size SVD-XT + published pose encoder (random weights, seed 0)",
                        **{key: settings[key] for key in ("size", "dtype", "compile_backend", "shapes", "train",
                                                          "decode", "step", "dwpose")}},
              "budget_s": budget, "started_at": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
              "elapsed_s": 0.0, "complete": False, "order": [mode.name for mode in modes], "modes": {}, "summary": {}}
    records = report["modes"]
    def stop(signum, frame):
        raise Interrupted()

    previous = signal.signal(signal.SIGTERM, stop)
    print(f"acceptance: {len(modes)} modes on {args.device}, budget {budget:.0f} s, out {out}", flush=True)
    status = 0
    try:
        for mode in modes:
            left = budget - (time.perf_counter() - started) - FINISH_S
            limit = min(mode_limit(mode, args), left)
            needed = 0 if args.dry_run else min(mode.expected_s, mode_limit(mode, args))
            if limit <= 0 or limit < needed:
                records[mode.name] = skipped(mode, f"budget: {max(left, 0):.0f} s left of {budget:.0f}, "
                                                   f"the mode expects {mode.expected_s} s")
            else:
                try:
                    records[mode.name] = run_mode(mode, settings, settings_path, limit)
                except Interrupted as e:
                    records[mode.name] = e.args[0] if e.args else skipped(mode, "interrupted")
                    raise
            finish_mode(records, mode, settings, report, started, out, modes_dir)
        report["complete"] = True
    except Interrupted:
        status = 143
        for mode in modes:
            records.setdefault(mode.name, skipped(mode, "interrupted: the whole run was stopped"))
    finally:
        signal.signal(signal.SIGTERM, previous)
        report["elapsed_s"] = round(time.perf_counter() - started, 1)
        report["summary"] = summarize(records)
        if status:  # (those of the modes that ended are already there)
            for name, record in records.items():
                write_json(modes_dir / f"{name}.json", record)
        write_json(out / "acceptance.json", report)
    print(f"acceptance: {report['elapsed_s']} s, "
          + ", ".join(f"{name} {record['status']}" for name, record in records.items())
          + f"; {out / 'acceptance.json'}", flush=True)
    return status


def skipped(mode: Mode, why: str) -> dict:
    return {"mode": mode.name, "kind": mode.kind, "what": mode.what, "status": "skipped", "error": why,
            "exit_status": None, "wall_s": 0.0, "limit_s": 0.0, "stderr_tail": [], "command": None, "result": None,
            "partial": None}


def finish_mode(records: dict, mode: Mode, settings: dict, report: dict, started: float, out: Path,
                modes_dir: Path) -> None:
    record = records[mode.name]
    if mode.name == "weights" and record["result"]:
        report["device_info"] = {**record["result"].get("device", {}), "versions": record["result"].get("versions")}
    write_json(modes_dir / f"{mode.name}.json", record)  # first as measured, then with its comparisons
    for name in records:  # (a mode measured before the default, as `published` is, is compared once it is there)
        try:
            compare(records, MODE_BY_NAME[name], settings)
        except Exception as e:  # noqa: BLE001 - a comparison must not lose the measurement
            (records[name]["result"] or {})["vs_default"] = {"error": f"{type(e).__name__}: {e}"}
        if records[name]["status"] == "ok" and MODE_BY_NAME[name].kind == "sampling":
            write_json(modes_dir / f"{name}.json", records[name])
    report["elapsed_s"] = round(time.perf_counter() - started, 1)
    report["summary"] = summarize(records)
    write_json(out / "acceptance.json", report)
    print(f"[{report['elapsed_s']:6.1f} s] {one_line(record)}", flush=True)


def one_line(record: dict) -> str:
    head = f"{record['mode']}: {record['status']} in {record['wall_s']} s (limit {record['limit_s']:.0f})"
    if record["status"] != "ok":
        return f"{head}: {record['error']}"
    result = record["result"]
    if record["kind"] == "sampling":
        memory = f", peak {result['peak_cuda_gib']} GiB (reserved {result['peak_cuda_reserved_gib']})" \
            if result.get("peak_cuda_gib") is not None else ""
        versus = result.get("vs_default") or {}
        drift = f", vs default: time x{versus.get('time_ratio')}, latents {versus.get('latents_mean_relative')}" \
            if "time_ratio" in versus else ""
        return (f"{head}: {result['seconds_per_frame']} s/frame (sampling {result['sampling_s_per_frame']}, "
                f"decoding {result['decoding_s_per_frame']}) at {result['shape']}{memory}{drift}")
    keys = {"step": ("control_overhead", "step_s"), "decode": ("seconds_per_frame", "peak_cuda_gib"),
            "train": ("seconds_per_step", "peak_cuda_gib"), "dwpose": ("cuda_provider", "ms_per_frame"),
            "weights": ("reused", "build_s", "save_s")}.get(record["kind"], ())
    return f"{head}: " + ", ".join(f"{key} {result.get(key)}" for key in keys)


if __name__ == "__main__":
    sys.exit(main())
