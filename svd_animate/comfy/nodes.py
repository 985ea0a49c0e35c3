"""The ComfyUI nodes: Load, Poses, Sample, Decode, and Animate (all four in one), over the library's `Animator` and
the stages of its `AnimationJob`: the CLI's path, with nothing of the pipeline here.

- Frames come in and go out as ComfyUI's `IMAGE` (B, H, W, C float 0-1). The job reads files, as it does for every
  front end: the reference is handed to it as a PNG and the driving frames as a lossless clip (`frames.py`), so the
  poses, and the frames, are the CLI's for the same pixels and settings.
- `LATENT` holds the VAE's own latents (`{"samples": (T, 4, h, w)}`), as ComfyUI's latents are.
- ComfyUI's facilities (read in Comfy-Org/ComfyUI 0.38.1): the model folders (`folder_paths`: `models/svd-animate`,
  the diffusers folder), the device and memory manager (`comfy.model_management`: its device, its models unloaded
  before ours load and sample), the progress bar (`comfy.utils.ProgressBar`) and the interrupt button
  (`throw_exception_if_processing_interrupted`), both at each extracted frame, denoising step and decoded frame.
- A user's mistake is our one-line `UserError`, which ComfyUI shows in the node.
"""

from __future__ import annotations

import gc
import importlib
import logging
import os
from pathlib import Path

import comfy.model_management as model_management
import comfy.utils
import folder_paths
import torch

from svd_common.errors import InputError
from svd_controlnext.decode import iter_decoded_frames, unscaled_latents

from ..animate import Animator, AnimationJob
from ..config import CONFIG_DIR, LOAD_KEYS
from ..options import DEFAULT_PRESET, config_field_option, config_from_values
from ..run import RunSettings
from .frames import clip_file, image_file, images_from_frames
from .inputs import given_values, input_types, stage_options, switch_option

logger = logging.getLogger(__name__)

MODEL = "SVD_ANIMATE_MODEL"  # an `Animator`: the models loaded once
POSES = "SVD_ANIMATE_POSES"  # an `AnimationJob` after its `poses` stage
CATEGORY = "svd-animate"
MODEL_FOLDER = "svd-animate"  # models/svd-animate: folders from `svd-animate convert` or training
THE_PRESETS = "(preset's)"

LOAD_OPTIONS = [switch_option("published_sampling"),
                *(config_field_option(name) for name in ("dtype", "offload", "low_vram", "compile", "detector"))]
POSE_OPTIONS = stage_options(poses=True)
SAMPLE_OPTIONS = stage_options(poses=False)
DECODE_OPTIONS = [config_field_option("decode_chunk_size")]
FRAME_RATE = ("FLOAT", {"default": 30.0, "min": 0.01, "max": 1000.0, "step": 0.001, "round": 0.001,
                        "tooltip": "the driving frames' rate (Get Video Components' fps)"})
# The models loaded, one set at a time, by their load settings: a Load node run again with the same settings (ComfyUI
# may drop its cached output and run it again) gets the same models, other settings free these first (ComfyUI's
# memory manager does not know them).
LOADED: dict[tuple, Animator] = {}


def check_our_packages() -> None:
    """Our top-level packages (`pose`, `svd_common`, `svd_controlnext`) are the ones beside `svd_animate`, not another
    custom node's modules of the same name (ComfyUI imports every pack into one process)."""
    home = Path(__file__).resolve().parents[2]
    for name in ("pose", "svd_common", "svd_controlnext"):
        found = Path(importlib.import_module(name).__file__).resolve().parents[1]
        if found != home:
            raise ImportError(f"svd-animate: the module {name!r} comes from {found}, not from svd-animate ({home}); "
                              "another custom node or package uses that name")


def register_model_folder() -> None:
    """`models/svd-animate` as a model folder, beside any given in `extra_model_paths.yaml` under `svd-animate:`
    (ComfyUI's function adds a path once)."""
    folder_paths.add_model_folder_path(MODEL_FOLDER, os.path.join(folder_paths.models_dir, MODEL_FOLDER))


def subfolders(folder_name: str, marker: str) -> list[str]:
    """The folders holding `marker` under a model folder's paths (linked folders followed, as ComfyUI's diffusers
    loader does), by their path relative to it."""
    found = set()
    for root in folder_paths.get_folder_paths(folder_name):
        for folder, children, files in os.walk(root, followlinks=True):
            if marker in files or marker in children:
                found.add(os.path.relpath(folder, root))
                children.clear()
    return sorted(found - {"."})


def full_folder(folder_name: str, name: str) -> Path:
    for root in map(Path, folder_paths.get_folder_paths(folder_name)):
        if (root / name).is_dir():
            return root / name
    raise InputError(f"{name}: no such folder in {folder_name}")


def progress_reporter():
    """`on_progress` for a job: ComfyUI's bar for each stage, then the interrupt button, at every frame and step."""
    bars = {}

    def report(stage: str, done: int, total: int | None) -> None:
        if total:
            if stage not in bars:
                bars[stage] = comfy.utils.ProgressBar(total)
            bars[stage].update_absolute(done, total)
        model_management.throw_exception_if_processing_interrupted()

    return report


def work_folder() -> Path:
    folder = Path(folder_paths.get_temp_directory()) / "svd-animate"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def pose_job(model: Animator, reference: torch.Tensor, driving: torch.Tensor, frame_rate: float,
             values: dict) -> AnimationJob:
    """A job for these frames with the Poses options, through its `poses` stage (its memory check after ComfyUI's
    models are unloaded, as they will be for sampling)."""
    folder = work_folder()
    job = model.job(image_file(reference, folder), clip_file(driving, frame_rate, folder),
                    on_progress=progress_reporter(), **given_values(POSE_OPTIONS, values))
    job.check()
    free_comfy_models()
    job.check_generation()
    job.poses()
    job.skeletons()
    return job


def sampling_job(poses: AnimationJob, values: dict, options=SAMPLE_OPTIONS) -> AnimationJob:
    """The job of `poses` with the Sample options (and `fast`; Animate's: the Decode ones too), reporting to this
    node's bar."""
    job = poses.with_config(config_from_values(given_values(options, values), base=poses.config))
    job.report = progress_reporter()
    return job


def sampled(job: AnimationJob) -> torch.Tensor:
    """The job's latents, ComfyUI's models out of the way first; a drawn seed (-1) said in the log."""
    free_comfy_models()
    latents = job.sample()
    if job.config.seed < 0:
        logger.info("svd-animate: seed %d (drawn for seed -1)", job.seed)
    return latents


def free_comfy_models() -> None:
    """ComfyUI's models out of the device's memory before ours sample (ComfyUI's manager does not know ours)."""
    model_management.unload_all_models()
    model_management.soft_empty_cache()


def to_images(frames, count: int) -> torch.Tensor:
    return images_from_frames(frames, count, model_management.intermediate_device())


class LoadModel:
    DESCRIPTION = ("Loads the SVD base model and the ControlNeXt control weights once (the pose detector on first "
                   "use): a preset (tiny: random weights, for trying a graph), or a folder of models/svd-animate from "
                   "`svd-animate convert` or training.")
    RETURN_TYPES = (MODEL,)
    RETURN_NAMES = ("model",)
    FUNCTION = "load"
    CATEGORY = CATEGORY

    @classmethod
    def INPUT_TYPES(cls):
        presets = sorted(path.stem for path in CONFIG_DIR.glob("*.yaml"))
        return {"required": {
            "preset": (presets, {"default": DEFAULT_PRESET, "tooltip": "the settings and weights to start from"}),
            "weights": ([THE_PRESETS, *subfolders(MODEL_FOLDER, "pose_encoder")],
                        {"tooltip": "a folder of models/svd-animate (pose_encoder/, unet/), or the preset's"}),
            "base_model": ([THE_PRESETS, *subfolders("diffusers", "model_index.json")],
                           {"tooltip": "an SVD folder of models/diffusers, or the preset's (a hub id)"}),
            **input_types(LOAD_OPTIONS)}}

    def load(self, preset, weights, base_model, **values):
        config = config_from_values({"preset": preset, **given_values(LOAD_OPTIONS, values)})
        if base_model != THE_PRESETS:
            config = config.replace(base_model=str(full_folder("diffusers", base_model)))
        run = RunSettings(weights=None if weights == THE_PRESETS else full_folder(MODEL_FOLDER, weights),
                          device=str(model_management.get_torch_device()))
        return (loaded(config, run),)


def loaded(config, run: RunSettings) -> Animator:
    """The models for these load settings: the ones already loaded (with `config`'s per-job values), or, after
    freeing those and ComfyUI's, new ones."""
    key = (tuple(getattr(config, name) for name in LOAD_KEYS), run)
    if key in LOADED:
        LOADED[key].reconfigure(config)
        return LOADED[key]
    while LOADED:
        LOADED.popitem()[1].unload()
    gc.collect()
    free_comfy_models()
    animator = Animator(config, run)
    animator.check_weights()
    animator.pipeline()
    LOADED[key] = animator
    return animator


class Poses:
    DESCRIPTION = ("The driving frames' poses, retargeted to the reference's body and drawn in the output frame, as "
                   "the animation will follow them. Connect Get Video Components' images and fps.")
    RETURN_TYPES = (POSES, "IMAGE", "FLOAT")
    RETURN_NAMES = ("poses", "skeletons", "fps")
    OUTPUT_TOOLTIPS = ("the poses, for Sample", "the skeleton frames", "the output frame rate (the driving clip's "
                       "over the stride)")
    FUNCTION = "poses"
    CATEGORY = CATEGORY

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": (MODEL,), "reference": ("IMAGE",), "driving": ("IMAGE",),
                             "frame_rate": FRAME_RATE, **input_types(POSE_OPTIONS)}}

    def poses(self, model, reference, driving, frame_rate, **values):
        job = pose_job(model, reference, driving, frame_rate, values)
        return job, to_images(job.skeletons(), len(job.skeletons())), job.fps()


class Sample:
    DESCRIPTION = ("Samples the animation's latents along the poses (fast: Align Your Steps, interval guidance and "
                   "DeepCache; 3.6x faster on an H100, BENCHMARKS.md).")
    RETURN_TYPES = ("LATENT",)
    FUNCTION = "sample"
    CATEGORY = CATEGORY

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": (MODEL,), "poses": (POSES,), **input_types(SAMPLE_OPTIONS)}}

    def sample(self, model, poses, **values):
        if poses.animator is not model:
            raise InputError("these poses were made with another Load node's model; connect the same one")
        latents = sampled(sampling_job(poses, values))
        return ({"samples": unscaled_latents(model.pipeline().vae, latents).float().to(
            model_management.intermediate_device())},)


class Decode:
    DESCRIPTION = "Decodes the latents with the temporal VAE a chunk of frames at a time."
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("frames",)
    FUNCTION = "decode"
    CATEGORY = CATEGORY

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": (MODEL,), "latent": ("LATENT",), **input_types(DECODE_OPTIONS)}}

    def decode(self, model, latent, **values):
        samples = latent["samples"]
        if samples.ndim != 4 or samples.shape[1] != 4:
            raise InputError(f"latent: expected SVD latents (frames, 4, h, w), got {tuple(samples.shape)}")
        free_comfy_models()  # before the chunk is fitted to the free memory
        scale = model.pipeline().vae_scale_factor  # the chunk for these frames' size, not the preset's
        size = model.config.replace(width=samples.shape[-1] * scale, height=samples.shape[-2] * scale)
        chunk = model.decode_chunk(config_from_values(given_values(DECODE_OPTIONS, values), base=size))
        frames = iter_decoded_frames(model.pipeline().vae, samples, chunk, model.progress, scaled=False)
        return (to_images(counted(frames, len(samples), progress_reporter()), len(samples)),)


def counted(frames, total: int, report):
    """`frames`, reporting each one as decoded."""
    for index, frame in enumerate(frames):
        yield frame
        report("decoding", index + 1, total)


class Animate:
    DESCRIPTION = ("Poses, Sample and Decode in one node: the reference animated along the driving frames, as "
                   "`svd-animate --ref ... --pose ...` does.")
    RETURN_TYPES = ("IMAGE", "FLOAT")
    RETURN_NAMES = ("frames", "fps")
    FUNCTION = "animate"
    CATEGORY = CATEGORY

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": (MODEL,), "reference": ("IMAGE",), "driving": ("IMAGE",),
                             "frame_rate": FRAME_RATE, **input_types(POSE_OPTIONS), **input_types(SAMPLE_OPTIONS),
                             **input_types(DECODE_OPTIONS)}}

    def animate(self, model, reference, driving, frame_rate, **values):
        job = sampling_job(pose_job(model, reference, driving, frame_rate, values), values,
                           SAMPLE_OPTIONS + DECODE_OPTIONS)
        frames = job.decode(sampled(job))
        return to_images(frames, len(job.skeletons())), job.fps()


NODE_CLASS_MAPPINGS = {"SVDAnimateLoad": LoadModel, "SVDAnimatePoses": Poses, "SVDAnimateSample": Sample,
                       "SVDAnimateDecode": Decode, "SVDAnimate": Animate}
NODE_DISPLAY_NAME_MAPPINGS = {"SVDAnimateLoad": "svd-animate Load", "SVDAnimatePoses": "svd-animate Poses",
                              "SVDAnimateSample": "svd-animate Sample", "SVDAnimateDecode": "svd-animate Decode",
                              "SVDAnimate": "svd-animate Animate"}
check_our_packages()
register_model_folder()
