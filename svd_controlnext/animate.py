"""The main job: reference image + driving video (or PoseSequence) -> animated mp4.

Steps: poses (cache, alignment) -> reference resized to cover H x W and centre-cropped (as published),
poses mapped through the same crop -> skeleton frames -> pipeline (latents) -> streamed chunked decoding
into the writer. The output keeps the driving clip's timing (source fps / stride) and the matching part
of its audio track.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image

from pose.align import align, apply_linear
from pose.cache import PoseCache
from pose.detect import load_detector
from pose.detect.base import PoseDetector
from pose.errors import InputError
from pose.extract import ExtractSettings, detect_reference, expected_count, extract_video
from pose.render import render_sequence
from pose.skeleton import PoseSequence
from pose.video import AudioClip, VideoWriter, check_writable, has_audio, is_image_path, probe_video, read_image

from .config import OFFLOAD_MODES, TINY, AnimateConfig
from .decode import iter_decoded_frames
from .memory import check_frames_fit, decode_chunk_for, free_memory

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class AnimateResult:
    output: Path
    frames: int
    fps: float
    random_weights: bool
    audio: bool = False


def cover_crop(width: int, height: int, target_w: int, target_h: int) -> tuple[float, int, int]:
    """Scale and top-left offset that make a `width` x `height` image cover the target, centred."""
    scale = max(target_w / width, target_h / height)
    return scale, (round(width * scale) - target_w) // 2, (round(height * scale) - target_h) // 2


def crop_reference(image: np.ndarray, target_w: int, target_h: int) -> np.ndarray:
    scale, left, top = cover_crop(image.shape[1], image.shape[0], target_w, target_h)
    size = (round(image.shape[1] * scale), round(image.shape[0] * scale))
    resized = np.asarray(Image.fromarray(image).resize(size, Image.BICUBIC))
    return resized[top:top + target_h, left:left + target_w]


def crop_poses(seq: PoseSequence, target_w: int, target_h: int) -> PoseSequence:
    """Poses normalised to the uncropped frame -> normalised to the cover-cropped target frame."""
    scale, left, top = cover_crop(seq.width, seq.height, target_w, target_h)
    a = (seq.width * scale / target_w, seq.height * scale / target_h)
    b = (-left / target_w, -top / target_h)
    return apply_linear(seq, a, b, target_w, target_h)


def resolve_dtype(name: str, device: str) -> torch.dtype:
    if name == "auto":
        return torch.float16 if device.startswith("cuda") else torch.float32
    dtypes = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    if name not in dtypes:
        raise InputError(f"unknown dtype {name!r}; choose auto, fp32, fp16 or bf16")
    return dtypes[name]


def load_pipeline(config: AnimateConfig, weights: Path | None, device: str, dtype: torch.dtype):
    """The pipeline for a preset: tiny random components, or the base model plus control weights."""
    from .pipeline import ControlNeXtSVDPipeline

    if config.base_model == TINY:
        from .tiny import tiny_components

        components = tiny_components(config.seed)
        if weights is not None:  # e.g. a tiny training run's RUN/final
            components.update(trained_components(weights))
        pipe = ControlNeXtSVDPipeline(**components)
    else:
        from .weights import load_pose_encoder

        source = weights or config.control_weights
        if source is None:
            raise InputError("no control weights: pass --weights DIR or use a preset that names them")
        try:
            encoder = load_pose_encoder(source)
        except InputError as e:
            raise InputError(f"{e}; without weights, try --preset tiny") from None
        extra = {}
        unet_dir = (weights / "unet") if weights is not None and (weights / "unet").is_dir() else None
        try:
            if unet_dir is not None:
                from diffusers import UNetSpatioTemporalConditionModel

                extra["unet"] = UNetSpatioTemporalConditionModel.from_pretrained(unet_dir, torch_dtype=dtype)
            pipe = ControlNeXtSVDPipeline.from_pretrained(config.base_model, pose_encoder=encoder,
                                                          torch_dtype=dtype, **extra)
        except (OSError, ValueError) as e:
            raise InputError(f"cannot load the base model {config.base_model} ({type(e).__name__}); "
                             "no weights are reachable here: try --preset tiny") from None
    if config.base_model == TINY and dtype != torch.float32:
        pipe.to(dtype=dtype)
    place_pipeline(pipe, device, "model" if config.low_vram and config.offload == "none" else config.offload)
    if config.low_vram:
        # One frame at a time through the feed-forward layers: their 4x-wide hidden states are the largest
        # activations of a full-size step (3.2 of its 7.9 GiB at 576x1024 fp16, bench/memory.py).
        pipe.unet.enable_forward_chunking()
    if config.compile:
        pipe.unet.compile()  # in place: the control hook is traced with it, no graph break
    return pipe


def trained_components(folder: Path) -> dict:
    """pose_encoder (and unet, when there is one) from a folder written by `convert` or `train`."""
    from .weights import load_pose_encoder

    if not (folder / "pose_encoder").is_dir():
        raise InputError(f"{folder}: no pose_encoder/ in it (expected a folder from `svd-animate convert` or train)")
    parts = {"pose_encoder": load_pose_encoder(folder)}
    if (folder / "unet").is_dir():
        from diffusers import UNetSpatioTemporalConditionModel

        parts["unet"] = UNetSpatioTemporalConditionModel.from_pretrained(folder / "unet")
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


def prepare_poses(pose_input: Path, reference: Path, config: AnimateConfig, detector: Callable[[], PoseDetector],
                  cache: PoseCache | None, progress: bool = True,
                  reference_pose: Callable[[Path], tuple[PoseSequence, np.ndarray]] | None = None,
                  ) -> tuple[PoseSequence, np.ndarray]:
    """Driving poses in the reference's frame (the reference's own pose first when the config asks
    for the published layout), and the reference image. `detector()` gives the pose detector; it is
    only called when a pose has to be detected. `reference_pose(path)` may stand in for detecting
    the reference (a batch detects each reference once)."""
    reference_pose = reference_pose or (lambda path: detect_reference(path, detector()))
    if is_pose_file(pose_input):
        poses = PoseSequence.load(pose_input)
        if poses.meta.get("align", {}).get("method") in (None, "none"):
            logger.info("%s: poses are not aligned to a reference; used as they are", pose_input)
        if config.max_frames:
            poses = poses.select(slice(0, config.max_frames))
        if not config.prepend_reference_pose:
            return poses, read_image(reference)
        ref_pose, image = reference_pose(reference)
        return prepend_pose(poses, ref_pose), image

    settings = ExtractSettings(stride=config.stride, max_frames=config.max_frames)
    if config.align != "none" or config.prepend_reference_pose:
        ref_pose, image = reference_pose(reference)
    else:
        ref_pose, image = None, read_image(reference)
    poses = extract_video(pose_input, detector(), settings, cache, progress=progress).poses
    if config.align != "none":
        poses = align(poses, ref_pose, config.align)
    else:
        poses = poses.replace(width=image.shape[1], height=image.shape[0])
    return (prepend_pose(poses, ref_pose) if config.prepend_reference_pose else poses), image


def prepend_pose(poses: PoseSequence, ref_pose: PoseSequence) -> PoseSequence:
    """The published layout: the reference image's pose as frame 0 (source frame index -1)."""
    if (ref_pose.width, ref_pose.height) != (poses.width, poses.height):
        raise InputError("the poses are not aligned to this reference image (different frame size); "
                         "run `svd-animate pose` with --ref, or leave out --published-sampling")
    arrays = {name: np.concatenate([ref, drv]) for (name, ref), drv in
              zip(ref_pose.arrays().items(), poses.arrays().values())}
    return poses.replace(**arrays, frame_index=np.concatenate([[-1], poses.frame_index]),
                         filled=np.concatenate([[False], poses.filled]),
                         meta={**poses.meta, "reference_pose_first": True})


def expected_frames(pose_input: Path, config: AnimateConfig) -> int | None:
    """Frames the run will make, known before any pose is extracted (None when the video does not say)."""
    if is_pose_file(pose_input):
        return None
    count = expected_count(probe_video(pose_input), ExtractSettings(stride=config.stride,
                                                                    max_frames=config.max_frames))
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


# Settings that change which models are loaded or how; a batch job cannot override them.
LOAD_KEYS = ("base_model", "control_weights", "unet_weights", "dtype", "offload", "compile", "low_vram", "detector")


class Animator:
    """Loads the pose detector and the pipeline once (each on first use) and animates any number of
    (reference, driving poses) pairs with them; `__call__` takes per-job overrides of the config."""

    def __init__(self, config: AnimateConfig, weights=None, device: str = "cpu", cache: PoseCache | None = None,
                 dwpose_dir=None, progress: bool = True):
        self.config = config
        self.weights = Path(weights) if weights else None
        self.device = device
        self.dtype = resolve_dtype(config.dtype, device)
        self.cache = cache
        self.dwpose_dir = dwpose_dir
        self.progress = progress
        self._pipe = None
        self._detector = None
        self._references: dict[tuple[Path, int], tuple[PoseSequence, np.ndarray]] = {}
        self._resources = contextlib.ExitStack()

    def detector(self) -> PoseDetector:
        if self._detector is None:
            self._detector = self._resources.enter_context(load_detector(self.config.detector,
                                                                         dwpose_dir=self.dwpose_dir))
        return self._detector

    def reference_pose(self, path: Path) -> tuple[PoseSequence, np.ndarray]:
        """The reference's pose and image, detected once per file version for all the jobs using it."""
        key = (path.resolve(), path.stat().st_mtime_ns)
        if key not in self._references:
            self._references[key] = detect_reference(path, self.detector())
        return self._references[key]

    def pipeline(self):
        if self._pipe is None:
            self._pipe = load_pipeline(self.config, self.weights, self.device, self.dtype)
            self._pipe.set_progress_bar_config(desc="sampling (steps x windows)", leave=False,
                                               disable=not self.progress)
        return self._pipe

    def close(self) -> None:
        self._resources.close()
        self._detector = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def decode_chunk(self, config: AnimateConfig) -> int:
        """The configured decode chunk, or the largest that the free memory allows (1 under --low-vram)."""
        if config.decode_chunk_size:
            return config.decode_chunk_size
        if config.low_vram:
            return 1
        free_host, free_device = free_memory(self.device)
        free = free_device if torch.device(self.device).type != "cpu" else free_host
        return decode_chunk_for(free, config.width, config.height, torch.finfo(self.dtype).bits // 8)

    def check(self, reference, pose_input, output, config: AnimateConfig, side_by_side: bool = False) -> None:
        """Every check that needs no model: files, size, and whether the video's length fits in memory."""
        check_writable(output)
        for path in (reference, pose_input):
            if not path.is_file():
                raise InputError(f"{path}: no such file")
        if is_image_path(pose_input):
            raise InputError(f"{pose_input}: is an image; --pose takes a driving video or a poses .npz")
        if config.width % 64 or config.height % 64:
            raise InputError(f"--width/--height must be multiples of 64 (the UNet's latent grid), "
                             f"got {config.width}x{config.height}")
        expected = expected_frames(pose_input, config)
        if expected:  # a video too long for this machine is refused before any pose is extracted
            check_frames_fit(expected, config.width, config.height, self.dtype, self.device, side_by_side)

    def __call__(self, reference, pose_input, output, side_by_side: bool = False, **overrides) -> AnimateResult:
        refused = sorted(set(overrides) & set(LOAD_KEYS))
        if refused:
            raise InputError(f"{', '.join(refused)}: fixed for the whole run, not per job")
        config = self.config.replace(**overrides)
        reference, pose_input, output = Path(reference), Path(pose_input), Path(output)
        self.check(reference, pose_input, output, config, side_by_side)
        width, height = config.width, config.height

        poses, image = prepare_poses(pose_input, reference, config, self.detector, self.cache, self.progress,
                                     self.reference_pose)
        check_frames_fit(len(poses), width, height, self.dtype, self.device, side_by_side)
        reference_image = crop_reference(image, width, height)
        poses = crop_poses(poses, width, height)
        pose_frames = render_frames(poses, height, width)
        audio = audio_for(pose_input, poses) if config.audio else None

        pipe = self.pipeline()
        generator = torch.Generator(device="cpu").manual_seed(config.seed)
        try:
            latents = pipe(
                Image.fromarray(reference_image), pose_frames, height=height, width=width,
                num_frames=len(pose_frames), num_inference_steps=config.steps,
                min_guidance_scale=config.min_guidance, max_guidance_scale=config.max_guidance, fps=config.fps_id,
                motion_bucket_id=config.motion_bucket_id, noise_aug_strength=config.noise_aug_strength,
                control_scale=config.control_scale, window_size=config.window, window_overlap=config.overlap,
                fusion=config.fusion, reference_pose_in_every_window=config.reference_pose_in_every_window,
                generator=generator, output_type="latent",
            ).frames
            with VideoWriter(output, fps=poses.fps, audio=audio) as writer:
                decoded = iter_decoded_frames(pipe.vae, latents, self.decode_chunk(config), self.progress)
                for index, frame in enumerate(decoded):
                    writer.write(np.concatenate([pose_frames[index], frame], axis=1) if side_by_side else frame)
        except torch.cuda.OutOfMemoryError:
            raise InputError(f"out of memory on {self.device} at {width}x{height} with windows of {config.window} "
                             "frames: try --offload model, a smaller --window, --height/--width or --dtype fp16"
                             ) from None
        return AnimateResult(output, len(pose_frames), poses.fps, config.base_model == TINY, audio is not None)


def animate(reference, pose_input, output, config: AnimateConfig, weights=None, device: str = "cpu",
            side_by_side: bool = False, cache: PoseCache | None = None, dwpose_dir=None,
            progress: bool = True) -> AnimateResult:
    """One animation: `svd-animate --ref ... --pose ...`."""
    with Animator(config, weights, device, cache, dwpose_dir, progress) as animator:
        return animator(reference, pose_input, output, side_by_side)
