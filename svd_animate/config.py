"""Inference settings: one dataclass field per option, the only place it is defined.

Each field carries its type (a `Literal` lists the allowed values), default, help text and where it
may be set (`option`). The CLI flags and the web page's inputs (`options.config_options`), YAML preset keys
(`load_preset`), batch manifest columns (`per_job_fields`) and per-job overrides are all derived from these fields, and every
value is checked when a config is made (`check_config`), before any model or pose is loaded.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from pathlib import Path
from typing import Literal

import yaml

from pose.align import ALIGN_METHODS
from pose.detect import DETECTORS
from pose.extract import FILL_MODES
from svd_common.errors import InputError
from svd_controlnext.schedules import SCHEDULERS, SIGMA_SCHEDULES
from svd_controlnext.windows import FUSION_MODES


def _presets_dir() -> Path:
    """The presets: `svd_animate/configs/` in an installed wheel (pyproject.toml maps the repository's `configs/`
    there), the repository's `configs/` in a checkout."""
    installed = Path(__file__).resolve().parent / "configs"
    return installed if installed.is_dir() else Path(__file__).resolve().parents[1] / "configs"


CONFIG_DIR = _presets_dir()
TINY = "tiny"
OFFLOAD_MODES = ("none", "model", "sequential")
DTYPES = ("auto", "fp32", "fp16", "bf16")


def option(default, help: str, *, flag: str | None = "", per_job: bool = False, load: bool = False,
           poses: bool = False, minimum: float | None = None, maximum: float | None = None,
           flag_help: str | None = None):
    """A config field. `flag`: the CLI flag ("" derives `--name-with-dashes`, None: no flag); `per_job`: a batch
    manifest column; `load`: it decides which models load, so it is fixed for a whole run; `poses`: the job's
    `poses` stage uses it (the driving frames, the framing, the alignment), so it is fixed once the poses are made
    (`AnimationJob.with_settings`; the ComfyUI Poses node's inputs); `minimum`, `maximum`:
    the smallest and largest allowed values; `flag_help`: the flag's own help where the flag inverts the field
    (`--no-audio` leaves out what `audio` keeps), else the field's `help` serves both."""
    return dataclasses.field(default=default, metadata={"help": help, "flag": flag, "per_job": per_job,
                                                        "load": load, "poses": poses, "minimum": minimum, "maximum": maximum,
                                                        "flag_help": flag_help})


@dataclasses.dataclass
class AnimateConfig:
    base_model: str = option("stabilityai/stable-video-diffusion-img2vid-xt-1-1",
                             "base SVD model: hub id, local folder, or tiny", flag=None, load=True)
    control_weights: str | None = option("Pbihao/ControlNeXt", "control encoder: controlnet.bin, a folder holding "
                                         "it (or from `convert`), or a hub repo", load=True)
    unet_weights: str | None = option(None, "fine-tuned UNet loaded over the base's: unet.bin, a folder holding it, "
                                      "or a hub repo", load=True)
    width: int = option(576, "output width in pixels (a multiple of 64)", per_job=True, poses=True, minimum=8)
    height: int = option(1024, "output height in pixels (a multiple of 64)", per_job=True, poses=True, minimum=8)
    steps: int = option(25, "denoising steps", per_job=True, minimum=1)
    min_guidance: float = option(3.0, "classifier-free guidance at the first frame of a window", flag=None,
                                 per_job=True, minimum=0)
    max_guidance: float = option(3.0, "classifier-free guidance at the last frame of a window", flag=None,
                                 per_job=True, minimum=0)
    # [0, 10]: ComfyUI's ControlNet strength range (ControlNetApply's `strength`); far beyond it the control
    # swamps the UNet (1e30 writes an all-black video).
    control_scale: float = option(1.0, "strength of the pose control (1 = as trained)", per_job=True, minimum=0,
                                  maximum=10)
    window: int = option(24, "frames per window", per_job=True, minimum=1)
    overlap: int = option(6, "frames shared by neighbouring windows", per_job=True, minimum=0)
    fusion: Literal[FUSION_MODES] = option("ramp", "how overlapping windows are blended: ramp (position-weighted) "
                                           "or uniform (the published plain mean)", per_job=True)
    prepend_reference_pose: bool = option(False, "the reference image's pose as output frame 0 (published)",
                                          flag=None, poses=True)
    reference_pose_in_every_window: bool = option(False, "the reference pose at position 0 of every window "
                                                  "(published)", flag=None)
    published_sampling: bool = option(False, "the published path around the sampler: its reference framing, the "
                                      "reference pose detected on the framed image, the alignment fitted on the "
                                      "whole video with every keypoint, floored fps, DWPose (see "
                                      "with_published_sampling)", flag=None, poses=True)
    scheduler: Literal[SCHEDULERS] = option("euler", "sampler: euler (SVD's), dpm++2m or dpm++2m-sde (EDM "
                                            "DPM-Solver++ on SVD's noise range)", per_job=True)
    sigma_schedule: Literal[SIGMA_SCHEDULES] = option("karras", "noise levels: karras (SVD's) or ays (Align Your "
                                                      "Steps for SVD, made for 10 steps; euler only)", per_job=True)
    guidance_sigma_min: float = option(0.0, "limited-interval guidance: guide only while the noise level is above "
                                       "this ...", per_job=True, minimum=0)
    guidance_sigma_max: float | None = option(None, "... and at most this (none: guide every step)", per_job=True,
                                              minimum=0)
    cache_interval: int = option(1, "DeepCache: the deep UNet blocks run every N steps, reused in between (1: every "
                                    "step, exact)", per_job=True, minimum=1)
    fast_sampling: bool = option(False, "the fast settings (see with_fast_sampling)", flag=None)
    stride: int = option(2, "use every N-th driving frame", per_job=True, poses=True, minimum=1)
    fps: float | None = option(None, "output frame rate: the stride is chosen per clip to come closest to it "
                                     "(replaces --stride; a slower clip keeps every frame)", per_job=True, poses=True,
                               minimum=0.01)
    start: float = option(0.0, "start of the driving clip, in seconds", per_job=True, poses=True, minimum=0)
    end: float | None = option(None, "end of the driving clip, in seconds (default: its end)", per_job=True, poses=True,
                               minimum=0)
    fill: Literal[FILL_MODES] = option("interpolate", "driving frames with nobody found: interpolate between "
                                       "neighbours or hold the last pose", per_job=True, poses=True)
    max_frames: int | None = option(None, "at most N output frames (the reference-pose frame, when first, counts)",
                                    per_job=True, poses=True, minimum=1)
    fps_id: int = option(7, "SVD's fps conditioning (the model sees fps_id - 1)", flag=None, minimum=1)
    motion_bucket_id: int = option(128, "SVD's motion conditioning (128: what the published ControlNeXt pipeline "
                                        "conditions on, whatever it is passed; its training used 127)", flag=None,
                                   per_job=True, minimum=0)
    noise_aug_strength: float = option(0.02, "noise added to the reference before encoding", flag=None,
                                       per_job=True, minimum=0)
    decode_chunk_size: int | None = option(None, "frames per VAE decode (default: 8, fewer with a warning when half "
                                           "the free memory cannot hold 8; the chunk changes the pixels)",
                                           flag="--decode-chunk", minimum=1)
    # torch.Generator.manual_seed and torch.manual_seed (tiny_components) take up to 2**64 - 1, but the web page's
    # number input carries the seed as a JavaScript double, exact only up to 2**53 (a larger seed typed there
    # would silently become another): 2**32 - 1, numpy.random.seed's range, which most diffusion tools use too.
    seed: int = option(42, "random seed (-1: a new one each run, printed)", per_job=True, minimum=-1,
                       maximum=2**32 - 1)
    dtype: Literal[DTYPES] = option("auto", "auto (fp16 on CUDA, fp32 on CPU), fp32, fp16 or bf16", load=True)
    offload: Literal[OFFLOAD_MODES] = option("none", "keep models in CPU memory: model (each model moves to the GPU "
                                             "while it runs) or sequential (each layer; slowest, least memory)",
                                             load=True)
    compile: bool = option(False, "torch.compile the UNet (slow first step)", load=True)
    low_vram: bool = option(False, "for GPUs with little memory: model offload, feed-forward chunking and "
                                   "one-frame decode chunks", load=True)
    audio: bool = option(True, "keep the driving clip's audio track", flag="--no-audio",
                         flag_help="leave out the driving clip's audio track (default: keep it)")
    detector: Literal[DETECTORS] = option(
        "auto", "pose backend (default: auto = DWPose, fetched once from the hub yzd-v/DWPose (~350 MB) when not found "
        "locally; MediaPipe, with a warning, when offline or HF_HUB_OFFLINE=1. dwpose: an error instead of falling "
        "back; mediapipe: never uses the network)", flag=None, poses=True, load=True)  # flag: options.pose_source_options
    align: Literal[(*ALIGN_METHODS, "none")] = option(
        "ls", "retarget the driving poses to the reference: ls, the published least-squares fit; bones: ls plus the "
        "reference's limb lengths; none: keep the driving positions", flag=None, poses=True, per_job=True)  # (as detector)

    def __post_init__(self):
        check_config(self)
        if self.overlap >= self.window:
            raise InputError(f"overlap ({self.overlap}) must be smaller than window ({self.window})")
        if self.sigma_schedule == "ays" and self.scheduler != "euler":
            raise InputError(f"sigma_schedule ays needs scheduler euler ({self.scheduler} makes its own noise levels)")
        if self.guidance_sigma_max is not None and self.guidance_sigma_max <= self.guidance_sigma_min:
            raise InputError(f"guidance_sigma_max ({self.guidance_sigma_max:g}) must be above guidance_sigma_min "
                             f"({self.guidance_sigma_min:g})")
        if self.end is not None and self.end <= self.start:
            raise InputError(f"end ({self.end:g}s) must come after start ({self.start:g}s)")
        if self.fast_sampling and self.published_sampling:
            raise InputError("the fast settings and the published sampling exclude each other")

    def replace(self, **changes) -> "AnimateConfig":
        """A copy with `changes` (a None sets the field to None, as `dataclasses.replace`)."""
        return dataclasses.replace(self, **changes)

    def with_given(self, **values) -> "AnimateConfig":
        """A copy with the values a user gave: a None is "not given" and changes nothing (flags left out, empty
        page inputs, empty manifest cells). The one place None means that."""
        return dataclasses.replace(self, **{k: v for k, v in values.items() if v is not None})


def field_types(cls) -> dict[str, object]:
    return typing.get_type_hints(cls)


def allowed_values(annotation) -> tuple | None:
    """The values a `Literal[...]` field allows (None for other types)."""
    return typing.get_args(annotation) if typing.get_origin(annotation) is Literal else None


def check_value(field: dataclasses.Field, annotation, value, name: str | None = None) -> None:
    """One field's allowed values, finiteness and range, in one line naming `name`: what the user typed (a flag),
    the field's name by default (a preset or manifest key)."""
    name = name or field.name
    if isinstance(value, float) and not math.isfinite(value):  # --guidance nan would sample an all-black video
        raise InputError(f"{name} must be a finite number, got {value!r}")
    choices = allowed_values(annotation)
    if choices is not None and value not in choices:
        raise InputError(f"{name} must be one of {', '.join(map(str, choices))}, got {value!r}")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        problem = range_problem(value, field.metadata.get("minimum"), field.metadata.get("maximum"))
        if problem:
            raise InputError(f"{name} must be {problem}, got {value!r}")


def range_problem(value, minimum, maximum) -> str | None:
    """What `value` breaks of [minimum, maximum] (either may be None), saying the whole allowed range, so one
    message tells the user what to type; None when it is inside."""
    if (minimum is None or value >= minimum) and (maximum is None or value <= maximum):
        return None
    if minimum is not None and maximum is not None:
        return f"between {_number(minimum)} and {_number(maximum)}"
    return f"at least {_number(minimum)}" if minimum is not None else f"at most {_number(maximum)}"


def _number(value) -> str:
    """A bound as the user would type it: 4294967295, not 4.29497e+09 (an int); 10, not 10.0 (a float)."""
    return str(value) if isinstance(value, int) else f"{value:g}"


def check_config(config) -> None:
    """Every field's allowed values and range; run whenever a config is made (`__post_init__`)."""
    types = field_types(type(config))
    for field in dataclasses.fields(config):
        check_value(field, types[field.name], getattr(config, field.name))


# Names that set several fields to one value, on the command line, the page and in batch manifests, with their help.
SHORTCUTS = {"guidance": ("min_guidance", "max_guidance")}
SHORTCUT_HELP = {"guidance": "classifier-free guidance (min and max)"}


def per_job_fields() -> dict[str, object]:
    """What a batch job may set, with the type of each (a shortcut takes its first field's)."""
    types = field_types(AnimateConfig)
    fields = {f.name: types[f.name] for f in dataclasses.fields(AnimateConfig) if f.metadata.get("per_job")}
    return {**fields, **{shortcut: types[names[0]] for shortcut, names in SHORTCUTS.items()}}


def parse_value(annotation, value):
    """A manifest cell (a CSV string, or a YAML value) as the field's type; ValueError when it is not one."""
    choices = allowed_values(annotation)
    if choices is not None:
        if value not in choices:
            raise ValueError(f"one of {', '.join(map(str, choices))}")
        return value
    kind = next((t for t in (int, float) if t == annotation or t in typing.get_args(annotation)), str)
    if isinstance(value, bool) or (kind is int and isinstance(value, float) and not value.is_integer()):
        raise ValueError(kind.__name__)
    try:
        return kind(value)
    except (TypeError, ValueError):
        raise ValueError(kind.__name__) from None
LOAD_KEYS = tuple(f.name for f in dataclasses.fields(AnimateConfig) if f.metadata.get("load"))
POSE_KEYS = tuple(f.name for f in dataclasses.fields(AnimateConfig) if f.metadata.get("poses"))


def expand_shortcuts(values: dict) -> dict:
    """`guidance: 2` -> `min_guidance: 2, max_guidance: 2` (an explicit min or max wins)."""
    values = dict(values)
    for shortcut, names in SHORTCUTS.items():
        value = values.pop(shortcut, None)
        for name in names:
            if value is not None and values.get(name) is None:
                values[name] = value
    return values


# What `--published-sampling` sets besides `published_sampling` (ControlNeXt-SVD-v2 `run_controlnext.py`,
# `script.sh` and its pipeline): the plain window mean, the reference pose first and in every window,
# everything in fp32, decode chunks of 2 frames, at most 240 frames (the reference-pose frame included).
PUBLISHED_SAMPLING = {"fusion": "uniform", "prepend_reference_pose": True, "reference_pose_in_every_window": True,
                      "dtype": "fp32", "decode_chunk_size": 2, "max_frames": 240}


@dataclasses.dataclass(frozen=True)
class SettingsSwitch:
    """A switch that sets several fields at once (`--published-sampling`, `--fast`), defined beside the values it
    sets: its option name, the field that records it, the values and the help of its flag."""

    name: str
    field: str
    settings: dict
    help: str

    def apply(self, config: AnimateConfig, explicit=()) -> AnimateConfig:
        """`settings` over `config`, except the fields named in `explicit` (those the user set on purpose:
        `--dtype bf16 --published-sampling` keeps bf16), with the field that records the switch."""
        kept = {key: value for key, value in self.settings.items() if key not in explicit}
        return dataclasses.replace(config, **{self.field: True}, **kept)


PUBLISHED_SWITCH = SettingsSwitch(
    "published_sampling", "published_sampling", PUBLISHED_SAMPLING,
    "the published ControlNeXt-SVD-v2 path: its sampler exactly (reference pose as frame 0 and at position 0 of "
    "every window, plain window mean), its reference framing and alignment fit, DWPose, fp32, decode chunks of 2, at "
    "most 240 frames, fps floored, no audio (flags given explicitly still win; README: differences)")


def with_published_sampling(config: AnimateConfig, explicit=()) -> AnimateConfig:
    return PUBLISHED_SWITCH.apply(config, explicit)


# `--fast`: each value from its authors' figures on SVD (README, "Fast sampling"). AYS: NVIDIA's schedule made for SVD
# at 10 steps. Guidance for σ in (0.28, 5.42]: the interval the limited-interval guidance paper uses for SD-XL, whose
# σ is SVD's (unit-variance latents); no interval was published for SVD. DeepCache every 2nd step: its authors ran
# SVD-XT at 3 over 25 steps; over 10 steps, 2 keeps 5 full steps.
FAST_SAMPLING = {"steps": 10, "sigma_schedule": "ays", "guidance_sigma_min": 0.28, "guidance_sigma_max": 5.42,
                 "cache_interval": 2}


FAST_SWITCH = SettingsSwitch(
    "fast", "fast_sampling", FAST_SAMPLING,
    "fast sampling: Align Your Steps at 10 steps, guidance only for noise levels in (0.28, 5.42], DeepCache every "
    "2nd step (about a quarter of the published time; flags given explicitly still win; README: fast sampling)")
SWITCHES = (PUBLISHED_SWITCH, FAST_SWITCH)


def with_fast_sampling(config: AnimateConfig, explicit=()) -> AnimateConfig:
    return FAST_SWITCH.apply(config, explicit)


def with_switches(config: AnimateConfig, on, explicit=()) -> AnimateConfig:
    """The settings of each switch in `on` (names) over `config`, except the fields in `explicit`. The one place the
    switches meet what the user set on purpose: a preset's own keys (`load_preset`), the flags and page inputs
    given (`options.config_from_values`)."""
    for switch in SWITCHES:
        if switch.name in on:
            config = switch.apply(config, explicit)
    return config


def _check_type(name: str, value, annotation, where: str):
    """`value` against a resolved annotation: int, float, str, bool, list[str], Literal, and `X | None`."""
    options = typing.get_args(annotation) if typing.get_origin(annotation) in (typing.Union, _UnionType) else (annotation,)
    if value is None and type(None) in options:
        return
    for option_type in options:
        if _is_instance(value, option_type):
            return
    raise InputError(f"{where}: key {name!r} must be {_describe(annotation)}, got {value!r}")


_UnionType = type(int | None)


def _is_instance(value, annotation) -> bool:
    if allowed_values(annotation) is not None:
        return value in allowed_values(annotation)
    if typing.get_origin(annotation) is list:
        (item,) = typing.get_args(annotation) or (object,)
        return isinstance(value, list) and all(isinstance(v, item) for v in value)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(annotation, type) and isinstance(value, annotation)


def _describe(annotation) -> str:
    if allowed_values(annotation) is not None:
        return "one of " + ", ".join(map(str, allowed_values(annotation)))
    if typing.get_origin(annotation) in (typing.Union, _UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(annotation))
    return "null" if annotation is type(None) else getattr(annotation, "__name__", str(annotation))


def config_from_mapping(cls, values: dict, where: str):
    """A config dataclass from a mapping; unknown keys, wrong types and disallowed values are refused by name."""
    if not isinstance(values, dict):
        raise InputError(f"{where}: must be a mapping of keys to values")
    hints = field_types(cls)
    for key, value in values.items():
        if key not in hints:
            raise InputError(f"{where}: unknown key {key!r}")
        _check_type(key, value, hints[key], where)
    try:
        return cls(**values)
    except InputError as e:
        raise InputError(f"{where}: {e}") from None


def read_yaml(path: Path):
    try:
        return yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise InputError(f"{path}: not valid YAML ({e})") from None


def is_preset_name(text: str) -> bool:
    """`tiny` names a built-in preset; `mine.yaml`, `presets/mine` and `./tiny` are files."""
    path = Path(text)
    return path.name == text and not path.suffix


def preset_path(name_or_path: str, folder: Path | None = None) -> Path:
    """Where a preset is: a built-in one by name, else the file, a relative path taken from `folder` (the
    extending preset's own), so `extends: base.yaml` finds its neighbour whatever the current directory."""
    if is_preset_name(name_or_path):
        return CONFIG_DIR / f"{name_or_path}.yaml"
    return Path(name_or_path) if folder is None else folder / name_or_path


def circle_message(chain: tuple[Path, ...], path: Path) -> str | None:
    """The one line refusing `path` when it is already in `chain` (the presets extending down to it), naming
    the circle; None when it is not. Each file by its name, or by its path where two names are alike."""
    seen = [p.resolve() for p in chain]
    if path.resolve() not in seen:
        return None
    circle = (*chain[seen.index(path.resolve()):], path)
    names = [p.name for p in circle]
    shown = names if len(set(names)) == len({p.resolve() for p in circle}) else [str(p) for p in circle]
    return f"{circle[0]}: presets extend each other in a circle ({' -> '.join(shown)})"


def load_preset(name_or_path: str) -> AnimateConfig:
    """`tiny`, `controlnext-svd-v2`, or a YAML file; unknown keys and wrong types are refused by name."""
    return _load_preset(name_or_path, None, ())


def _load_preset(name_or_path: str, folder: Path | None, chain: tuple[Path, ...]) -> AnimateConfig:
    """`load_preset` for a preset reached through `chain` (the files extending it, from `folder`, the last's)."""
    path = preset_path(name_or_path, folder)
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
        raise InputError(f"{name_or_path if is_preset_name(name_or_path) else path}: no such preset "
                         f"(built in: {known})")
    circle = circle_message(chain, path)
    if circle:
        raise InputError(circle)
    own = read_yaml(path)
    base = own.pop("extends", None) if isinstance(own, dict) else None
    # `extends: PRESET`: that preset's values, this file's over them
    values = ({**dataclasses.asdict(_load_preset(str(base), path.parent, (*chain, path))), **own}
              if base is not None else own)
    config = config_from_mapping(AnimateConfig, values, f"{path}")
    return with_switches(config, [switch.name for switch in SWITCHES if getattr(config, switch.field)], explicit=own)
