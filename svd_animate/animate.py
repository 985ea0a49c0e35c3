"""The main job: reference image + driving video (or PoseSequence) -> animated video.

An `Animator` holds what a run loads once (the pose detector, the pipeline) and makes `AnimationJob`s, each in
named stages: check (no model), poses (the reference framed to H x W by `framing.py`, its pose detected, the driving
poses from the cache or extracted and aligned), sample (skeleton frames -> latents), decode (chunk by chunk) and
write (the video with the driving clip's timing, source fps / stride, and the matching part of its audio). The CLI,
batch and the web page all drive these stages. Where the published path differs around the sampler, a `Recipe`
chosen once per job (`recipe_for`: ours or `config.published_sampling`'s) says how (README: differences from the
published pipeline).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import math
import secrets
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image

from pose.align import VISIBLE
from pose.cache import PoseCache
from pose.detect import load_detector
from pose.detect.base import PoseDetector
from pose.extract import Extraction, ExtractSettings, detect_reference, expected_count, extract_aligned
from pose.render import render_sequence
from pose.skeleton import PoseSequence
from svd_common.errors import InputError, ResourceError, SamplingError, UserError, WeightsError
from svd_common.paths import check_input_file, check_not_input
from svd_common.video import (AudioClip, VideoWriter, check_free_space, check_output_container, check_writable,
                              estimate_video_bytes, has_audio, is_image_path, probe_video, read_image)
from svd_controlnext.decode import iter_decoded_frames
from svd_controlnext.schedules import ays_sigmas, make_scheduler

from .config import LOAD_KEYS, OFFLOAD_MODES, POSE_KEYS, TINY, AnimateConfig, expand_shortcuts
from .framing import crop_poses, crop_reference, crop_reference_published
from .memory import DEFAULT_DECODE_CHUNK, check_frames_fit, decode_chunk_for, free_memory
from .run import RunSettings

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class AnimateResult:
    output: Path
    frames: int
    fps: float
    seed: int
    audio: bool = False
    poses: PoseSequence | None = None  # the driving poses in the reference's frame (what `svd-animate pose` saves)


def resolve_dtype(name: str, device: str) -> torch.dtype:
    if name == "auto":
        return torch.float16 if device.startswith("cuda") else torch.float32
    dtypes = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    if name not in dtypes:
        raise InputError(f"unknown dtype {name!r}; choose auto, fp32, fp16 or bf16")
    return dtypes[name]


@torch.inference_mode(False)
def load_pipeline(config: AnimateConfig, weights: Path | None, device: str, dtype: torch.dtype):
    """The pipeline for a preset: tiny random components, or the base model plus control weights. Built outside
    inference mode even for a caller inside it (ComfyUI runs every node so): weights made as inference tensors send
    some of torch's CPU kernels another way, and the frames then differ from the CLI's in their last bits
    (tests/test_comfyui.py)."""
    from svd_controlnext.pipeline import ControlNeXtSVDPipeline

    if config.base_model == TINY:
        from svd_controlnext.tiny import tiny_components

        components = tiny_components(config.seed)
        if weights is not None:  # e.g. a tiny training run's RUN/final
            components.update(trained_components(weights))
        pipe = ControlNeXtSVDPipeline(**components)
    else:
        pipe = load_published_pipeline(config, weights, dtype)
    if config.base_model == TINY and dtype != torch.float32:
        pipe.to(dtype=dtype)
    prepare_pipeline(pipe, device, config.offload, low_vram=config.low_vram, compile=config.compile)
    return pipe


def prepare_pipeline(pipe, device: str, offload: str = "none", *, low_vram: bool = False, compile: bool = False,
                     compile_backend: str = "inductor") -> None:
    """Place a built pipeline as a run asks: offload (`--low-vram` implies model offload when none is asked),
    bounded attention, feed-forward chunking, compile. The one place this is decided (bench/e2e.py uses it too)."""
    from svd_controlnext.attention import apply_bounded_attention

    place_pipeline(pipe, device, "model" if low_vram and offload == "none" else offload)
    for model in (pipe.unet, pipe.vae):  # CUDA: fused attention only; a call no fused kernel takes runs in pieces
        apply_bounded_attention(model)
    if low_vram:
        # One frame at a time through the feed-forward layers: their 4x-wide hidden states are the largest
        # activations of a full-size step (3.2 of its 7.9 GiB at 576x1024 fp16, bench/memory.py).
        pipe.unet.enable_forward_chunking()
    if compile:
        # In place, so the hooks (control, DeepCache) are traced with the UNet, with no graph break: one graph per
        # kind of call (full or cached, guided or not), none per window or step; the decoder: one per chunk length.
        pipe.unet.compile(backend=compile_backend)
        pipe.vae.decoder.compile(backend=compile_backend)


def load_published_pipeline(config: AnimateConfig, weights: Path | None, dtype: torch.dtype):
    """Base model + fine-tuned UNet + control encoder, as `run_controlnext.py` assembles them: the base's
    pretrained UNet with `unet.bin` loaded over it (`strict=False`), the encoder from `controlnet.bin`.
    `--weights DIR` (from `convert` or training) replaces both with its pose_encoder/ and unet/."""
    from svd_common.hub import hub_local_only
    from svd_controlnext.pipeline import ControlNeXtSVDPipeline
    from svd_controlnext.weights import hub_error_message, load_pose_encoder, load_unet

    control, unet_weights = weight_sources(config, weights)
    try:
        encoder = load_pose_encoder(control)
    except WeightsError as e:
        raise WeightsError(f"{e}; without weights, try --preset tiny") from None
    unet = load_unet(config.base_model, unet_weights, dtype)
    try:
        return ControlNeXtSVDPipeline.from_pretrained(config.base_model, pose_encoder=encoder, unet=unet,
                                                      dtype=dtype, local_files_only=hub_local_only())
    except Exception as e:  # noqa: BLE001 - hub, file and config errors all end the run in one line
        raise WeightsError(f"cannot load the base model {config.base_model}: {hub_error_message(e, config.base_model)}"
                         ) from None


def weight_sources(config: AnimateConfig, weights: Path | None) -> tuple:
    """(control encoder, UNet weights) a run loads: `--weights DIR`'s pose_encoder/ and unet/, else the preset's."""
    control = weights or config.control_weights
    if control is None:
        raise WeightsError("no control weights: pass --weights DIR or use a preset that names them")
    unet_weights = weights / "unet" if weights is not None and (weights / "unet").is_dir() else config.unet_weights
    return control, unet_weights


def trained_components(folder: Path) -> dict:
    """pose_encoder (and unet, when there is one) from a folder written by `convert` or `train`."""
    from svd_controlnext.weights import load_pose_encoder

    if not (folder / "pose_encoder").is_dir():
        raise WeightsError(f"{folder}: no pose_encoder/ in it (expected a folder from `svd-animate convert` or train)")
    parts = {"pose_encoder": load_pose_encoder(folder)}
    if (folder / "unet").is_dir():
        from svd_controlnext.weights import load_unet

        parts["unet"] = load_unet(TINY, folder)  # a diffusers folder: the one UNet loader, no base needed
    return parts


def place_pipeline(pipe, device: str, offload: str = "none") -> None:
    """Move the models to `device`, or keep them on the CPU and move each in only while it runs."""
    if offload not in OFFLOAD_MODES:
        raise InputError(f"unknown offload mode {offload!r}; choose one of {', '.join(OFFLOAD_MODES)}")
    if offload != "none" and torch.device(device).type == "cpu":
        logger.info("--offload %s: the models already live in CPU memory; nothing to offload", offload)
        offload = "none"
    if offload == "model":
        pipe.enable_model_cpu_offload(device=device)
    elif offload == "sequential":
        pipe.enable_sequential_cpu_offload(device=device)
    else:
        pipe.to(device)


def is_pose_file(path: Path) -> bool:
    return path.suffix.lower() == ".npz"


NOT_ALIGNED = ("the poses are not aligned to this reference image (different frame size); "
               "run `svd-animate pose` with --ref, or leave out --published-sampling")


@dataclasses.dataclass
class Reference:
    """The reference image framed to the output size, and its pose (None when nothing needs it).

    The pose lives in the frame of the image it was detected on: the original image (ours, so limbs
    that the crop cuts off still count) or the framed one (published: `utils/pre_process.py` runs
    DWPose on the resized and cropped reference)."""

    image: np.ndarray
    pose: PoseSequence | None
    original_size: tuple[int, int]  # (width, height) of the file's image


@dataclasses.dataclass(frozen=True)
class Recipe:
    """What differs between our path and the published one around the sampler (README: differences), chosen once
    per job by `recipe_for` instead of branching on `published_sampling` at every step."""

    name: str
    plain_read: bool  # PIL's plain loader: no EXIF rotation, alpha dropped
    frame_reference: Callable[[np.ndarray, int, int], np.ndarray]
    pose_on_framed: bool  # the reference pose detected on the framed image, not the file's
    fit_whole_video: bool  # the alignment fitted on every strided frame of the whole video, then the first kept
    fit_threshold: float | None  # keypoints the fit uses: the confident ones, or (None) all
    floor_fps: bool  # `run_controlnext.py`: `get_avg_fps() // sample_stride`
    audio: bool
    auto_detector: str  # what `--detector auto` means: the published weights learnt DWPose's skeletons

    def frame_poses(self, poses: PoseSequence, width: int, height: int) -> PoseSequence:
        return crop_poses(poses, width, height, published=self is PUBLISHED)


OURS = Recipe("ours", plain_read=False, frame_reference=crop_reference, pose_on_framed=False, fit_whole_video=False,
              fit_threshold=VISIBLE, floor_fps=False, audio=True, auto_detector="auto")
# ControlNeXt-SVD-v2: `utils/pre_process.py` (framing, DWPose on the framed reference), `dwpose/preprocess.py`
# `get_video_pose` (the fit over the whole video, every keypoint), `run_controlnext.py` (floored fps, no audio).
PUBLISHED = Recipe("published", plain_read=True, frame_reference=crop_reference_published, pose_on_framed=True,
                   fit_whole_video=True, fit_threshold=None, floor_fps=True, audio=False, auto_detector="dwpose")


def recipe_for(config: AnimateConfig) -> Recipe:
    return PUBLISHED if config.published_sampling else OURS


def load_reference(path: Path, config: AnimateConfig, detector: Callable[[], PoseDetector] | None) -> Reference:
    """Read, frame and (when `detector` is given) detect the reference as `config` asks."""
    recipe = recipe_for(config)
    original = read_image(path, orientation=not recipe.plain_read, transparency=not recipe.plain_read)
    image = recipe.frame_reference(original, config.width, config.height)
    seen = image if recipe.pose_on_framed else original
    pose = detect_reference(path, detector(), seen)[0] if detector is not None else None
    return Reference(image, pose, (original.shape[1], original.shape[0]))


def driving_frames_cap(config: AnimateConfig) -> int | None:
    """Driving frames to keep: `max_frames` counts output frames, the prepended reference pose included
    (published: `num_frames = min(max_frame_num, len(poses))` after the reference pose was put first)."""
    if not config.max_frames or not config.prepend_reference_pose:
        return config.max_frames
    if config.max_frames < 2:
        raise InputError("--max-frames must be at least 2 with the reference pose first (--published-sampling)")
    return config.max_frames - 1


def stride_for_fps(source_fps: float, target_fps: float) -> int:
    """The stride whose frame rate (source / stride) comes closest to `target_fps`; never below 1, so a
    clip slower than the target keeps every frame and nothing is invented."""
    return max(1, round(source_fps / target_fps))


def with_target_fps(config: AnimateConfig, pose_input: Path) -> AnimateConfig:
    """`fps` turned into this clip's stride (a 7.5 fps clip at `--fps 7.5` keeps every frame, where the
    preset's stride 2 would make it 3.75 fps); `fps` is then cleared, so nothing turns it into a stride again."""
    if not config.fps:
        return config
    if is_pose_file(pose_input):
        logger.warning("%s: --fps applies to driving videos; a poses file keeps the frames it was made with",
                       pose_input)
        return dataclasses.replace(config, fps=None)
    source = probe_video(pose_input).fps
    stride = stride_for_fps(source, config.fps)
    if source < config.fps:
        logger.warning("%s: %.3g fps, slower than --fps %g: every frame is kept", pose_input, source, config.fps)
    return dataclasses.replace(config, stride=stride, fps=None)


def job_config(config: AnimateConfig, pose_input: Path, **overrides) -> AnimateConfig:
    """A job's config: the run's with the job's own values (None: not given), and `--fps` as this clip's stride.
    The one place a job's settings are made (the Animator's jobs, batch's dry run)."""
    refused = sorted(set(overrides) & set(LOAD_KEYS))
    if refused:
        raise InputError(f"{', '.join(refused)}: fixed for the whole run, not per job")
    config = config.with_given(**expand_shortcuts(overrides))
    return with_target_fps(config, pose_input) if pose_input.is_file() else config  # (a missing one: `check`)


def reference_frame_poses(pose_input: Path, reference: Path | None, config: AnimateConfig,
                          detector: Callable[[], PoseDetector], cache: PoseCache | None, progress: bool = True,
                          load: Callable[[Path, AnimateConfig, bool], Reference] | None = None,
                          on_frame: Callable[[int, int | None], None] | None = None,
                          ) -> tuple[Extraction, Reference | None]:
    """The driving poses aligned in the reference image's frame (what `svd-animate pose --ref` saves; without a
    reference, in the video's own frame), and the reference. `on_frame(done, expected)` is called after each
    extracted frame."""
    load = load or (lambda path, cfg, needs_pose: load_reference(path, cfg, detector if needs_pose else None))
    cap = driving_frames_cap(config)
    needs_pose = config.prepend_reference_pose or (config.align != "none" and not is_pose_file(pose_input))
    ref = load(reference, config, needs_pose) if reference is not None else None
    if is_pose_file(pose_input):
        return Extraction(poses_file(pose_input, ref, config, cap), from_cache=False, cache_path=None), ref
    return driving_extraction(pose_input, ref, config, detector, cache, progress, on_frame), ref


def poses_file(path: Path, ref: Reference | None, config: AnimateConfig, cap: int | None) -> PoseSequence:
    """A saved PoseSequence as the driving poses, with what it cannot follow of this run's settings said."""
    poses = PoseSequence.load(path)
    if poses.meta.get("align", {}).get("method") in (None, "none"):
        logger.info("%s: poses are not aligned to a reference; used as they are", path)
    if config.prepend_reference_pose and ref is not None and (poses.width, poses.height) != ref.original_size:
        raise InputError(NOT_ALIGNED)
    made_with = poses.meta.get("stride")
    if made_with is not None and made_with != config.stride:
        logger.warning("%s: a poses file keeps the stride it was made with (%d); this run's stride %d applies "
                       "to driving videos only", path, made_with, config.stride)
    if recipe_for(config).fit_whole_video:
        logger.warning("%s: poses keep the alignment `svd-animate pose` gave them; the published fit "
                       "(whole video, every keypoint) needs the driving video as --pose", path)
    return poses.select(slice(0, cap)) if cap else poses


def output_frame_poses(poses: PoseSequence, ref: Reference, config: AnimateConfig) -> PoseSequence:
    """Reference-frame poses mapped into the output frame, the reference's pose first when asked."""
    recipe = recipe_for(config)
    poses = recipe.frame_poses(poses, config.width, config.height)
    if config.prepend_reference_pose:
        poses = prepend_pose(poses, recipe.frame_poses(ref.pose, config.width, config.height))
    return poses


def extract_settings(config: AnimateConfig) -> ExtractSettings:
    """What is extracted from the driving video: the kept frames, or (published, to fit the alignment) every
    strided frame of the whole video."""
    whole_video = recipe_for(config).fit_whole_video and config.align != "none"
    return ExtractSettings(stride=config.stride, max_frames=None if whole_video else driving_frames_cap(config),
                           start=config.start, end=config.end, fill=config.fill)


def driving_extraction(video: Path, ref: Reference | None, config: AnimateConfig,
                       detector: Callable[[], PoseDetector], cache: PoseCache | None, progress: bool,
                       on_frame=None) -> Extraction:
    """The driving poses in the reference pose's frame (and whether the cache had them). Ours fits the alignment
    on the kept frames and confident keypoints; published fits every strided frame of the whole video and every
    keypoint (`dwpose/preprocess.py`, `get_video_pose`: `max_frame_num` is computed there but never used), then
    keeps the first frames."""
    cap = driving_frames_cap(config)
    method = config.align if ref is not None else "none"
    extraction = extract_aligned(video, detector(), extract_settings(config), cache, ref.pose if ref else None,
                                 method, ref.original_size if ref else None, recipe_for(config).fit_threshold,
                                 progress, on_frame)
    poses = extraction.poses
    return dataclasses.replace(extraction, poses=poses.select(slice(0, cap)) if cap else poses)


def driving_poses(video: Path, ref: Reference, config: AnimateConfig, detector: Callable[[], PoseDetector],
                  cache: PoseCache | None, progress: bool, on_frame=None) -> PoseSequence:
    return driving_extraction(video, ref, config, detector, cache, progress, on_frame).poses


def prepend_pose(poses: PoseSequence, ref_pose: PoseSequence) -> PoseSequence:
    """The published layout: the reference image's pose as frame 0 (source frame index -1)."""
    if (ref_pose.width, ref_pose.height) != (poses.width, poses.height):
        raise InputError(NOT_ALIGNED)
    arrays = {name: np.concatenate([ref, drv]) for (name, ref), drv in
              zip(ref_pose.arrays().items(), poses.arrays().values())}
    return poses.replace(**arrays, frame_index=np.concatenate([[-1], poses.frame_index]),
                         filled=np.concatenate([[False], poses.filled]),
                         meta={**poses.meta, "reference_pose_first": True})


def output_fps(poses: PoseSequence, config: AnimateConfig) -> float:
    """Source fps / stride; published floors it (`run_controlnext.py`: `get_avg_fps() // sample_stride`)."""
    source_fps, stride = poses.meta.get("source_fps"), poses.meta.get("stride", 1)
    if recipe_for(config).floor_fps and source_fps and source_fps >= stride:  # (the published code writes 0 fps)
        return float(source_fps // stride)
    return poses.fps


def expected_frames(pose_input: Path, config: AnimateConfig) -> int | None:
    """Frames the run will make, known before any pose is extracted (None when the video does not say)."""
    if is_pose_file(pose_input):
        return None
    kept = dataclasses.replace(extract_settings(config), max_frames=driving_frames_cap(config))
    count = expected_count(probe_video(pose_input), kept)
    return count + int(config.prepend_reference_pose) if count else None


def render_frames(poses: PoseSequence, height: int, width: int) -> np.ndarray:
    """All skeleton frames in one preallocated uint8 array (no list-then-stack double peak)."""
    frames = np.empty((len(poses), height, width, 3), np.uint8)
    for index, frame in enumerate(render_sequence(poses, height, width)):
        frames[index] = frame
    return frames


def audio_for(pose_input: Path, poses: PoseSequence) -> AudioClip | None:
    """The driving clip's audio from its first kept frame to the end of its last one, delayed by one
    frame when the reference pose was put first."""
    if is_pose_file(pose_input) or not has_audio(pose_input):
        return None
    source_fps = poses.meta.get("source_fps")
    driving = poses.frame_index[poses.frame_index >= 0]
    if not source_fps or not len(driving):
        return None
    stride = poses.meta.get("stride", 1)
    delay = 1 / poses.fps if poses.frame_index[0] < 0 else 0.0
    return AudioClip(pose_input, driving[0] / source_fps, len(driving) * stride / source_fps, delay)


def detector_name(config: AnimateConfig) -> str:
    """The backend a run asks `load_detector` for (under --published-sampling `auto` means DWPose, MediaPipe only
    when named)."""
    return recipe_for(config).auto_detector if config.detector == "auto" else config.detector


def saved_poses(poses: PoseSequence, reference: Path | None, config: AnimateConfig) -> PoseSequence:
    """The poses with the metadata `svd-animate pose` writes, so the file works as `--pose` later."""
    method = config.align if reference is not None else "none"
    return poses.replace(meta={**poses.meta, "reference": reference.name if reference is not None else None,
                               "align": poses.meta.get("align", {"method": method})})


class Animator:
    """Loads the pose detector and the pipeline once (each on first use) and makes any number of jobs with them
    (`job`, or `__call__` for a whole one); a job takes per-job overrides of the config."""

    def __init__(self, config: AnimateConfig, run: RunSettings | None = None):
        self.config = config
        self.run = run or RunSettings()
        self.device = self.run.resolved_device()
        self.dtype = resolve_dtype(config.dtype, self.device)
        if self.dtype == torch.float16 and torch.device(self.device).type == "cpu":
            logger.warning("--dtype fp16 on the CPU: slow, and some operations may not support it (fp32 is the CPU's "
                           "default)")
        self.cache = self.run.pose_cache()
        self._pipe = None
        self._weights_checked = False
        self._detector = None
        self._references: dict[tuple, Reference] = {}
        self._resources = contextlib.ExitStack()

    @property
    def progress(self) -> bool:
        return self.run.progress

    def detector(self) -> PoseDetector:
        """The configured pose detector. The published skeletons come from DWPose and MediaPipe's differ
        (other joints, hands and face), so under --published-sampling `auto` means DWPose or an error."""
        if self._detector is None:
            name = detector_name(self.config)
            try:
                detector = load_detector(name, dwpose_dir=self.run.dwpose_dir)
            except UserError as e:
                if name == self.config.detector:
                    raise
                raise WeightsError(f"--published-sampling needs DWPose, the detector the published weights were "
                                   f"trained with ({e}); or pass --detector mediapipe to accept other skeletons"
                                   ) from None
            self._detector = self._resources.enter_context(detector)
        return self._detector

    def reference(self, path: Path, config: AnimateConfig, needs_pose: bool) -> Reference:
        """The framed reference (and its pose), made once per file version and framing for all jobs."""
        key = (path.resolve(), path.stat().st_mtime_ns, config.width, config.height, recipe_for(config).name,
               needs_pose)
        if key not in self._references:
            detector = self.detector if needs_pose else None
            self._references[key] = load_reference(path, config, detector)
        return self._references[key]

    def pipeline(self):
        if self._pipe is None:
            self._pipe = load_pipeline(self.config, self.run.weights, self.device, self.dtype)
            self._svd_scheduler = self._pipe.scheduler.config
            self._pipe.set_progress_bar_config(desc="sampling (steps x windows)", leave=False,
                                               disable=not self.progress)
        return self._pipe

    def check_weights(self) -> None:
        """Before the first job extracts any pose: the weights can be had (seconds, where loading would fail only
        after the extraction)."""
        if self._pipe is None and not self._weights_checked and self.config.base_model != TINY:
            from svd_controlnext.weights import check_weights_available

            try:
                check_weights_available(self.config.base_model, *weight_sources(self.config, self.run.weights))
            except WeightsError as e:
                raise WeightsError(f"{e}; without weights, try --preset tiny") from None
            self._weights_checked = True

    def reconfigure(self, config: AnimateConfig) -> None:
        """Use `config` for the next jobs, keeping the loaded models: every field may change but those that
        decide which models load (`LOAD_KEYS`). Unlike per-job overrides, a None here does reset a field."""
        changed = [key for key in LOAD_KEYS if getattr(config, key) != getattr(self.config, key)]
        if changed:
            raise InputError(f"{', '.join(changed)}: fixed while the models are loaded")
        if detector_name(config) != detector_name(self.config):  # --published-sampling turns auto into DWPose
            self.close()
            self._references.clear()
        self.config = config

    def job(self, reference, pose_input, output=None, side_by_side: bool = False,
            on_progress: Callable[[str, int, int | None], None] | None = None, **overrides) -> "AnimationJob":
        """One job with this run's models and `overrides` (None: not given) over the run's config. Without an
        `output` it can only make poses (the `pose` command, the page's step 1)."""
        pose_input = Path(pose_input)
        config = job_config(self.config, pose_input, **overrides)
        return AnimationJob(self, reference, pose_input, output, config, side_by_side, on_progress)

    def poses(self, reference, pose_input, on_frame=None) -> tuple[PoseSequence, Reference]:
        """The driving poses aligned to `reference` in its own frame, and the reference, as the next job will
        use them (the pose cache makes the extraction once per clip and settings)."""
        job = self.job(reference, pose_input, on_progress=on_frame and (lambda stage, done, total:
                                                                         on_frame(done, total)))
        job.check()
        return job.poses(), job.ref

    def __call__(self, reference, pose_input, output, side_by_side: bool = False,
                 on_progress: Callable[[str, int, int | None], None] | None = None, **overrides) -> AnimateResult:
        """One whole job (`AnimationJob.run`)."""
        return self.job(reference, pose_input, output, side_by_side, on_progress, **overrides).run()

    def close(self) -> None:
        self._resources.close()
        self._detector = None

    def unload(self) -> None:
        """Close, and drop the pipeline and the framed references: their memory is freed once nothing else holds
        them (a front end that keeps Animators, ComfyUI's Load node, makes room for another)."""
        self.close()
        self._pipe = None
        self._references.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def decode_chunk(self, config: AnimateConfig) -> int:
        """The configured decode chunk, else 8 frames (1 under --low-vram), lowered only when half the free
        memory cannot hold it: then the pixels differ from a run with more memory, and the user is told."""
        if config.decode_chunk_size:
            return config.decode_chunk_size
        if config.low_vram:
            return 1
        free_host, free_device = free_memory(self.device)
        free = free_device if torch.device(self.device).type != "cpu" else free_host
        fits = decode_chunk_for(free, config.width, config.height, torch.finfo(self.dtype).bits // 8)
        if fits < DEFAULT_DECODE_CHUNK:
            logger.warning("decoding %d frames at a time instead of %d to fit in the free memory: the pixels differ "
                           "from a run with more memory (--decode-chunk %d gives them everywhere)", fits,
                           DEFAULT_DECODE_CHUNK, fits)
        return min(fits, DEFAULT_DECODE_CHUNK)


class AnimationJob:
    """One job in named stages, run in this order by `run`: `check` (no model: files, size, memory, disk), `poses`
    (the driving poses aligned to the reference), `sample` (the latents), `decode` (frames, chunk by chunk) and
    `write` (the video, whole or not at all). Every front end (the CLI, batch, the web page) makes its jobs with
    `Animator.job` and runs the stages it needs. `on_progress(stage, done, total)` is called after each extracted
    frame ("poses"), sampling step ("sampling") and decoded frame ("decoding"); it may raise to stop the job, which
    then writes nothing. With `RunSettings.parallel` each process of a group runs every stage on the same video:
    process 0 extracts the poses and sends them, each samples and decodes its share, and process 0 writes."""

    def __init__(self, animator: Animator, reference, pose_input: Path, output, config: AnimateConfig,
                 side_by_side: bool = False, on_progress: Callable[[str, int, int | None], None] | None = None):
        self.animator = animator
        self.reference = Path(reference) if reference is not None else None
        self.pose_input = Path(pose_input)
        self.output = Path(output) if output is not None else None
        self.config = config
        self.recipe = recipe_for(config)
        self.side_by_side = side_by_side
        self.report = on_progress or (lambda stage, done, total: None)
        self.extraction: Extraction | None = None  # set by `poses`
        self.ref: Reference | None = None
        self.output_poses: PoseSequence | None = None  # set by `skeletons`: the poses in the output frame
        self.pose_frames: np.ndarray | None = None  # ... and drawn
        self.seed: int | None = None  # set by `sample`

    def check(self) -> None:
        """Every check that needs no model: files, size, and whether the video's length fits in memory and on disk."""
        config, output = self.config, self.output
        if output is not None:
            check_not_input(output, {"--ref": self.reference, "--pose": self.pose_input})
            check_output_container(output)
            check_writable(output)
        for path in (self.reference, self.pose_input):
            if path is not None:
                check_input_file(path)
        if is_image_path(self.pose_input):
            raise InputError(f"{self.pose_input}: is an image; --pose takes a driving video or a poses .npz")
        if output is not None:
            self.check_generation()

    def check_generation(self) -> None:
        """What a job that samples needs beyond its files: a size the UNet takes, and a video whose length fits in
        memory (and, when there is an output, on its disk), refused before any pose is extracted. Run by `check`
        for a job with an output; a front end that keeps the frames (the ComfyUI nodes) runs it itself."""
        config = self.config
        if config.width % 64 or config.height % 64:
            raise InputError(f"--width/--height must be multiples of 64 (the UNet's latent grid), "
                             f"got {config.width}x{config.height}")
        expected = expected_frames(self.pose_input, config)
        if expected:
            self.check_fits(expected)

    def check_fits(self, frames: int) -> None:
        animator, config = self.animator, self.config
        check_frames_fit(frames, config.width, config.height, animator.dtype, animator.device, self.side_by_side)
        if self.output is not None:
            check_free_space(self.output, self.video_bytes(frames))

    def with_config(self, config: AnimateConfig) -> "AnimationJob":
        """This job, its poses included once made, with `config` for the stages after them (the ComfyUI Sample node
        after the Poses node). What the poses were made with (`POSE_KEYS`) cannot change."""
        changed = [key for key in POSE_KEYS if getattr(config, key) != getattr(self.config, key)]
        if changed:
            raise InputError(f"{', '.join(changed)}: set where the poses are made, fixed after")
        job = copy.copy(self)
        job.config = config
        return job

    def video_bytes(self, frames: int) -> int:
        """A generous estimate of the output file's size (the skeleton beside the result doubles the width)."""
        width = self.config.width * (2 if self.side_by_side else 1)
        return estimate_video_bytes(frames, width, self.config.height, self.output.suffix)

    def poses(self) -> PoseSequence:
        """The driving poses aligned in the reference image's frame (what `svd-animate pose` saves)."""
        animator = self.animator
        if self.output is not None:
            animator.check_weights()  # seconds now, where loading would fail only after the extraction
        self.extraction, self.ref = self.once(lambda: reference_frame_poses(
            self.pose_input, self.reference, self.config, animator.detector, animator.cache, animator.progress,
            animator.reference, lambda done, total: self.report("poses", done, total)))
        return self.extraction.poses

    def skeletons(self) -> np.ndarray:
        """The skeleton frames the sampler follows (T, H, W, 3 uint8): the poses in the output frame, the reference's
        first when the recipe asks. Made once, after `poses`."""
        if self.pose_frames is None:
            self.output_poses = output_frame_poses(self.extraction.poses, self.ref, self.config)
            self.pose_frames = render_frames(self.output_poses, self.config.height, self.config.width)
        return self.pose_frames

    def fps(self) -> float:
        """The output's frame rate: the driving clip's over the stride (`output_fps`)."""
        self.skeletons()
        return output_fps(self.output_poses, self.config)

    def sample(self) -> torch.Tensor:
        """The final latents of the skeleton frames (the reference's pose first when the recipe asks)."""
        config, animator = self.config, self.animator
        self.check_fits(len(self.skeletons()))  # now that the length is known (a poses file does not say it before)
        pipe = animator.pipeline()
        use_scheduler(pipe, config.scheduler, animator._svd_scheduler)
        self.seed = config.seed if config.seed >= 0 else self.once(lambda: secrets.randbelow(2**31))  # -1: reported
        generator = torch.Generator(device="cpu").manual_seed(self.seed)

        def each_step(pipe, step, timestep, tensors):
            check_finite(tensors["latents"], step + 1, config, animator.dtype)
            self.report("sampling", step + 1, config.steps)
            return tensors

        with self.out_of_memory_hint():
            latents = pipe(Image.fromarray(self.ref.image), self.pose_frames, generator=generator,
                           output_type="latent", callback_on_step_end=each_step, parallel=animator.run.parallel,
                           **pipeline_arguments(config)).frames
        check_finite(latents, config.steps, config, animator.dtype)  # whatever the cause: never into a video file
        return latents

    def decode(self, latents: torch.Tensor):
        """The video's frames (uint8, H x W x 3), decoded a chunk at a time, the skeleton beside when asked."""
        animator, parallel = self.animator, self.animator.run.parallel
        vae, chunk = animator.pipeline().vae, self.once(lambda: animator.decode_chunk(self.config))
        with self.out_of_memory_hint():
            decoded = iter_decoded_frames(vae, latents, chunk, animator.progress) if parallel is None else \
                parallel.decoded_frames(vae, latents, chunk, animator.progress)
            for index, frame in enumerate(decoded):
                yield np.concatenate([self.pose_frames[index], frame], axis=1) if self.side_by_side else frame
                self.report("decoding", index + 1, len(self.pose_frames))

    def write(self, frames) -> AnimateResult:
        """`frames` into the output video with the driving clip's audio (whole or not at all)."""
        poses, config = self.output_poses, self.config
        fps = self.fps()
        audio = audio_for(self.pose_input, poses) if config.audio and self.recipe.audio else None
        if config.audio and not self.recipe.audio:
            logger.info("--published-sampling: no audio (its floored fps would drift from the clip's sound)")
        parallel = self.animator.run.parallel
        if parallel is not None and not parallel.is_main:  # process 0 writes; this one decodes its chunks for it
            for _ in frames:
                pass
            return AnimateResult(self.output, len(poses), fps, self.seed, audio is not None, self.extraction.poses)
        with VideoWriter(self.output, fps=fps, audio=audio, expected_bytes=self.video_bytes(len(poses))) as writer:
            for frame in frames:
                writer.write(frame)
            audio = writer.audio  # (a .gif has none)
        return AnimateResult(self.output, len(poses), fps, self.seed, audio is not None, self.extraction.poses)

    def once(self, make):
        """`make()` here, or, when processes share the video, on process 0 with its result (or error) sent to all:
        work done once (the pose extraction) or that must not differ between them (a drawn seed, the chunk size)."""
        parallel = self.animator.run.parallel
        return make() if parallel is None else parallel.from_main(make)

    def run(self) -> AnimateResult:
        self.check()
        self.poses()
        return self.write(self.decode(self.sample()))

    @contextlib.contextmanager
    def out_of_memory_hint(self):
        try:
            yield
        except torch.cuda.OutOfMemoryError:
            config = self.config
            raise ResourceError(f"out of memory on {self.animator.device} at {config.width}x{config.height} with "
                                f"windows of {config.window} frames: try --offload model, a smaller --window, "
                                "--height/--width or --dtype fp16") from None


def check_finite(latents: torch.Tensor, step: int, config: AnimateConfig, dtype: torch.dtype) -> None:
    """Stop at the first step whose latents hold NaN or infinity: they would decode to a black video."""
    if torch.isfinite(latents).all():
        return
    hint = "--dtype bf16 or fp32 (half precision overflowed), " if dtype == torch.float16 else ""
    raise SamplingError(f"sampling gave NaN or infinite values at step {step} of {config.steps} (control scale "
                        f"{config.control_scale:g}, guidance {config.min_guidance:g}-{config.max_guidance:g}): try "
                        f"{hint}a smaller --control-scale or --guidance; nothing was written")


def pipeline_arguments(config: AnimateConfig) -> dict:
    """The `ControlNeXtSVDPipeline.__call__` arguments a config stands for (its scheduler: `use_scheduler`)."""
    steps = dict(num_inference_steps=config.steps)
    if config.sigma_schedule == "ays":
        steps = dict(num_inference_steps=None, sigmas=ays_sigmas(config.steps))
    interval = None
    if config.guidance_sigma_max is not None or config.guidance_sigma_min > 0:
        interval = (config.guidance_sigma_min, math.inf if config.guidance_sigma_max is None
                    else config.guidance_sigma_max)
    return dict(height=config.height, width=config.width, **steps, min_guidance_scale=config.min_guidance,
                max_guidance_scale=config.max_guidance, fps=config.fps_id, motion_bucket_id=config.motion_bucket_id,
                noise_aug_strength=config.noise_aug_strength, control_scale=config.control_scale,
                window_size=config.window, window_overlap=config.overlap, fusion=config.fusion,
                reference_pose_in_every_window=config.reference_pose_in_every_window, guidance_interval=interval,
                cache_interval=config.cache_interval)


def use_scheduler(pipe, name: str, svd_config) -> None:
    """The config's sampler on the pipeline, made fresh from SVD's scheduler configuration (each job its own)."""
    pipe.scheduler = make_scheduler(name, svd_config)


def animate(reference, pose_input, output, config: AnimateConfig, run: RunSettings | None = None,
            side_by_side: bool = False) -> AnimateResult:
    """One animation: `svd-animate --ref ... --pose ...`."""
    with Animator(config, run) as animator:
        return animator(reference, pose_input, output, side_by_side)
