"""Inference presets: one dataclass holds every default; YAML presets and CLI flags override it."""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

import yaml

from pose.errors import InputError

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
TINY = "tiny"
OFFLOAD_MODES = ("none", "model", "sequential")


@dataclasses.dataclass
class AnimateConfig:
    base_model: str = "stabilityai/stable-video-diffusion-img2vid-xt-1-1"  # hub id, local folder, or "tiny"
    control_weights: str | None = "Pbihao/ControlNeXt"  # folder from `convert`, a controlnet.bin, or a hub repo
    unet_weights: str | None = None  # the fine-tuned UNet over the base's: unet.bin, a folder holding it, or a hub repo
    width: int = 576
    height: int = 1024
    steps: int = 25
    min_guidance: float = 3.0
    max_guidance: float = 3.0
    control_scale: float = 1.0
    window: int = 24
    overlap: int = 6
    fusion: str = "ramp"  # "uniform" is the published plain mean
    # The published layout: the reference image's pose as output frame 0, and fed at position 0 of every window.
    prepend_reference_pose: bool = False
    reference_pose_in_every_window: bool = False
    # The published path around the sampler: reference framing pixels, its pose detected on the framed image,
    # the alignment fitted on the whole video with every keypoint, fps floored, DWPose required.
    # `with_published_sampling` also sets the published values of the fields in PUBLISHED_SAMPLING.
    published_sampling: bool = False
    stride: int = 2
    max_frames: int | None = None  # output frames (the reference-pose frame, when prepended, counts)
    fps_id: int = 7  # SVD's fps conditioning (the model sees fps_id - 1)
    motion_bucket_id: int = 127
    noise_aug_strength: float = 0.02
    decode_chunk_size: int | None = None  # frames per VAE decode; None: sized to the free memory
    seed: int = 42
    dtype: str = "auto"  # auto: fp16 on CUDA, fp32 on CPU
    offload: str = "none"  # none, model (one model on the GPU at a time), sequential (one layer at a time)
    compile: bool = False  # torch.compile the UNet
    low_vram: bool = False  # model offload, feed-forward chunking, one-frame decode chunks: for GPUs with little memory
    audio: bool = True  # keep the driving clip's audio track
    detector: str = "auto"
    align: str = "ls"

    def replace(self, **changes) -> "AnimateConfig":
        changes = {k: v for k, v in changes.items() if v is not None}
        return dataclasses.replace(self, **changes)


# What `--published-sampling` sets besides `published_sampling` (ControlNeXt-SVD-v2 `run_controlnext.py`,
# `script.sh` and its pipeline): the plain window mean, the reference pose first and in every window,
# everything in fp32, decode chunks of 2 frames, at most 240 frames (the reference-pose frame included).
PUBLISHED_SAMPLING = {"fusion": "uniform", "prepend_reference_pose": True, "reference_pose_in_every_window": True,
                      "dtype": "fp32", "decode_chunk_size": 2, "max_frames": 240}


def with_published_sampling(config: AnimateConfig, explicit=()) -> AnimateConfig:
    """The published pipeline's settings over `config`, except the fields named in `explicit`
    (those the user set on purpose: `--dtype bf16 --published-sampling` keeps bf16)."""
    changes = {key: value for key, value in PUBLISHED_SAMPLING.items() if key not in explicit}
    return dataclasses.replace(config, published_sampling=True, **changes)


def _check_type(name: str, value, annotation: str, where: str):
    expected = {"int": int, "float": (int, float), "str": str, "bool": bool, "list[str]": list}
    allowed = [part.strip() for part in annotation.split("|")]
    if value is None and "None" in allowed:
        return
    for part in allowed:
        kind = expected.get(part)
        if kind is not None and isinstance(value, kind) and not (part in ("int", "float") and isinstance(value, bool)):
            if part == "list[str]" and not all(isinstance(item, str) for item in value):
                continue
            return
    raise InputError(f"{where}: key {name!r} must be {annotation}, got {value!r}")


def config_from_mapping(cls, values: dict, where: str):
    """A config dataclass from a mapping; unknown keys and wrong types are refused by name."""
    if not isinstance(values, dict):
        raise InputError(f"{where}: must be a mapping of keys to values")
    fields = {f.name: f.type for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    for key, value in values.items():
        if key not in fields:
            raise InputError(f"{where}: unknown key {key!r}")
        annotation = fields[key] if isinstance(fields[key], str) else str(hints[key])
        _check_type(key, value, annotation, where)
    return cls(**values)


def read_yaml(path: Path):
    try:
        return yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise InputError(f"{path}: not valid YAML ({e})") from None


def load_preset(name_or_path: str) -> AnimateConfig:
    """`tiny`, `controlnext-svd-v2`, or a YAML file; unknown keys and wrong types are refused by name."""
    path = Path(name_or_path)
    if not path.suffix:
        path = CONFIG_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
        raise InputError(f"{name_or_path}: no such preset (built in: {known})")
    values = read_yaml(path)
    config = config_from_mapping(AnimateConfig, values, f"{path}")
    return with_published_sampling(config, explicit=values) if config.published_sampling else config
