"""The options of every sub-command, each defined once.

`generation_options()` lists those of a generation run: the run-level ones (preset, weights, device, the sampling
switches, side by side), one per `AnimateConfig` field that has a flag (type, allowed values and help come from the
field), and the pose source. The CLI (`animate`, `batch`) adds them to its parsers with `Option.add_to`; the web page
(`svd-animate ui`) builds one input from each `on_page` option; both turn what was given into a config with
`config_from_values`. `pose_options()`, `prepare_data_options()`, `train_options()` and `convert_options()` are the
other sub-commands' flags, the ones that set a config field taken from that field.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from pathlib import Path

from .config import (SHORTCUT_HELP, SHORTCUTS, SWITCHES, AnimateConfig, allowed_values, check_value, expand_shortcuts,
                     field_types, load_preset, with_switches)

DEFAULT_PRESET = "controlnext-svd-v2"
POSE_STRIDE = 1  # `svd-animate pose` keeps every frame unless told otherwise (a generation run: the preset's stride)


@dataclasses.dataclass(frozen=True)
class Option:
    """One option: its name (the config field or argparse dest), flag, value type, allowed values, help.
    `on_page`: a per-job input of the web page (False: fixed for the whole server, a `ui` command flag).
    `minimum`, `maximum`: the field's range, for an input that can hold to it (a number box); the values given
    are checked against the field in `config_from_values` either way."""

    name: str
    help: str
    kind: type = str  # int, float, str, bool or Path
    flag: str = ""  # "" derives `--name-with-dashes`; a name without dashes: a positional argument
    choices: tuple | None = None
    default: object = None  # None: not given (the preset's value applies)
    on_page: bool = True
    minimum: float | None = None
    maximum: float | None = None
    required: bool = False
    short: str = ""  # a one-letter alias: "-o"
    parse: object = None  # argparse's `type` where it is not `kind` (a check: `positive_int`, `seconds`)

    @property
    def cli_flag(self) -> str:
        return self.flag or "--" + self.name.replace("_", "-")

    @property
    def is_switch(self) -> bool:
        return self.kind is bool

    @property
    def switch_value(self) -> bool:
        """The value a switch sets when given: `--no-audio` sets `audio` to False."""
        return not self.cli_flag.startswith("--no-")

    def add_to(self, parser) -> None:
        if not self.cli_flag.startswith("-"):  # a positional argument (`flag` is its name in the usage line)
            parser.add_argument(self.name, metavar=self.cli_flag, type=self.parse or self.kind, help=self.help)
            return
        flags = [self.short, self.cli_flag] if self.short else [self.cli_flag]
        if self.is_switch:
            action = "store_true" if self.switch_value else "store_false"
            parser.add_argument(*flags, dest=self.name, action=action, default=None, help=self.help)
        elif self.choices is not None:
            parser.add_argument(*flags, dest=self.name, choices=self.choices, default=self.default,
                                required=self.required, type=self.parse or None, help=self.help)
        else:
            parser.add_argument(*flags, dest=self.name, type=self.parse or self.kind, default=self.default,
                                required=self.required, help=self.help)


def _number(kind, text: str):
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a{'n integer' if kind is int else ' number'}, got {text!r}"
                                         ) from None


def positive_int(text: str) -> int:
    value = _number(int, text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def seconds(text: str) -> float:
    value = _number(float, text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must not be negative, got {value}")
    return value


def is_optional_number(option: Option) -> bool:
    """A number that may be left out (`max_frames: None`, a shortcut such as `guidance`): the page shows a text box,
    where empty means "none" or "the preset's" (Gradio's number box cannot be empty), a ComfyUI widget shows 0."""
    if option.kind not in (int, float) or option.choices is not None:
        return False
    annotation = field_types(AnimateConfig).get(option.name)
    return annotation is None or type(None) in typing.get_args(annotation)


def field_option(field: dataclasses.Field, annotation, **changes) -> Option:
    """The option of a config field: its flag, type, allowed values, range and help, all from the field."""
    kind = next((t for t in (bool, int, float, str) if t == annotation or t in getattr(annotation, "__args__", ())),
                str)
    option = Option(field.name, field.metadata.get("flag_help") or field.metadata["help"], kind,
                    field.metadata.get("flag") or "", allowed_values(annotation),
                    on_page=not field.metadata.get("load"), minimum=field.metadata.get("minimum"),
                    maximum=field.metadata.get("maximum"))
    return dataclasses.replace(option, **changes)


def config_field_option(name: str, **changes) -> Option:
    """The option of the `AnimateConfig` field `name` (for a flag that field has no CLI flag of its own: `align`)."""
    field = next(field for field in dataclasses.fields(AnimateConfig) if field.name == name)
    return field_option(field, field_types(AnimateConfig)[name], **changes)


def config_options() -> list[Option]:
    """One option per `AnimateConfig` field with a flag, everything about it taken from the field; its help is
    the flag's own where the flag inverts the field (`--no-audio`), as the CLI and the page's "no audio" box
    both say what the flag does."""
    types = field_types(AnimateConfig)
    return [field_option(field, types[field.name]) for field in dataclasses.fields(AnimateConfig)
            if field.metadata.get("flag", "") is not None]


def pose_source_options(align_default: str | None) -> list[Option]:
    """The options of every command that extracts poses: backend, alignment (unless `align_default` is
    None), cache. `detector` and `align` are the config's fields, their help the fields' own."""
    options = [
        config_field_option("detector", on_page=False),
        Option("dwpose_dir", "folder with yolox_l.onnx and dw-ll_ucoco_384.onnx", Path, on_page=False),
    ]
    if align_default is not None:
        align = config_field_option("align")
        options.append(dataclasses.replace(align, help=f"{align.help} (default: {align_default})"))
    return options + [
        Option("cache_dir", "pose cache folder (default: $SVD_ANIMATE_CACHE or ~/.cache/svd-animate/poses)", Path,
               on_page=False),
        Option("no_cache", "extract again even when the cache has these poses", bool, on_page=False),
    ]


def generation_options() -> list[Option]:
    """Every option of a generation run (`animate`, `batch`, the web page), in the order `--help` lists them."""
    return [
        Option("preset", "controlnext-svd-v2 (default), tiny (random weights, runs anywhere), fast, or a YAML file",
               default=DEFAULT_PRESET),
        Option("weights", "folder from `svd-animate convert` or training (pose_encoder/, unet/)", Path,
               on_page=False),
        *(Option(name, SHORTCUT_HELP[name], float) for name in SHORTCUTS),
        *(Option(switch.name, switch.help, bool) for switch in SWITCHES),
        Option("device", "cpu, cuda, cuda:1, ... (default: cuda when available)", on_page=False),
        Option("side_by_side", "write skeleton | result", bool),
        *config_options(),
        *pose_source_options(align_default="the preset's, ls"),
    ]


def pose_options() -> list[Option]:
    """`svd-animate pose`: the driving video, the reference, the pose source and the config fields that choose the
    frames (stride, max frames, start, end, fill), the outputs."""
    return [
        Option("video", "driving video (mp4, mov, webm, ...)", Path, required=True),
        Option("ref", "reference image to align the poses to", Path),
        *pose_source_options(align_default="ls with --ref, none without"),
        config_field_option("stride", parse=positive_int, help=f"keep every N-th frame (default {POSE_STRIDE})"),
        *(config_field_option(name, parse=parse) for name, parse in
          (("max_frames", positive_int), ("start", seconds), ("end", seconds), ("fill", None))),
        Option("output", "output .npz", Path, required=True, short="-o"),
        Option("preview", "also write a preview video: source | skeleton (| on the reference)", Path),
    ]


def prepare_data_options() -> list[Option]:
    return [
        Option("videos", "folder of training videos", Path, required=True),
        Option("output", "dataset folder", Path, required=True, short="-o"),
        Option("max_frames", "keep at most N frames of each clip", int, parse=positive_int),
        *pose_source_options(align_default=None),
    ]


def train_options() -> list[Option]:
    """`svd-animate train`: the config, then flags each named after the `TrainConfig` field it sets
    (`train_config_fields`), then how the run starts."""
    from .train.config import MIXED_PRECISION, TRAINABLE_MODES

    return [
        Option("config", "training config name or YAML file", default="controlnext-svd-v2"),
        Option("data", "dataset folder (prepare-data's, or the published meta_info.json layout)", Path),
        Option("output_dir", "run folder", Path),
        Option("max_steps", "stop after N optimisation steps", int, parse=positive_int),
        Option("learning_rate", "AdamW learning rate", float),
        Option("trainable", "encoder (default: fits one GPU), encoder+unet-subset, encoder+unet (what the published "
                            "v2 run trained: 8 GPUs, DeepSpeed ZeRO-2) or lora", choices=TRAINABLE_MODES),
        Option("mixed_precision", "no, fp16 or bf16", choices=MIXED_PRECISION),
        Option("seed", "random seed", int),
        Option("resume", "`latest` (the newest checkpoint in the run folder) or a checkpoint folder"),
        Option("num_processes", "data-parallel over N processes (one per GPU; gloo on CPU); or use `accelerate launch "
                                "--multi_gpu --num_processes N -m svd_controlnext train ...`", int, default=1,
               parse=positive_int),
    ]


def train_config_fields(values) -> dict:
    """The flags given that set a `TrainConfig` field (same name), as the field's type (a folder as its text)."""
    from .train.config import TrainConfig

    names = {field.name for field in dataclasses.fields(TrainConfig)}
    return {option.name: str(values[option.name]) if isinstance(values.get(option.name), Path)
            else values.get(option.name) for option in train_options() if option.name in names}


def convert_options() -> list[Option]:
    return [
        Option("controlnet", "controlnet.bin, a folder holding it, or a hub repo id", required=True),
        Option("unet", "unet.bin (full UNet state dict), a folder holding it, or a hub repo id"),
        Option("base", "SVD base model (hub id or local folder) giving the UNet config (default "
                       "stabilityai/stable-video-diffusion-img2vid-xt-1-1)"),
        Option("embedding_padding", "0: the published inference encoder (default); 1: the training code's variant",
               int, choices=(0, 1), default=0, parse=int),
        Option("output", "output folder", Path, required=True, short="-o"),
    ]


def comfyui_options() -> list[Option]:
    return [Option("comfyui_dir", "the ComfyUI folder (with main.py and custom_nodes/)", Path, flag="COMFYUI_DIR")]


def check_given(values) -> None:
    """Every value given for a config field (a shortcut: against its first field, `--guidance` against
    min_guidance's), named by its flag: the user typed `--guidance nan`, not min_guidance. Run before the config
    is made, whose own checks can only name fields."""
    fields = {field.name: field for field in dataclasses.fields(AnimateConfig)}
    types = field_types(AnimateConfig)
    for option in generation_options():
        target = SHORTCUTS.get(option.name, (option.name,))[0]
        value = values.get(option.name)
        if value is not None and target in fields:
            check_value(fields[target], types[target], value, option.cli_flag)


def config_from_values(values, base: AnimateConfig | None = None) -> AnimateConfig:
    """The preset (or `base`, a config already made: the ComfyUI nodes' loaded one), then the published or fast
    settings, then every value given (None: not given), each checked first and named by its flag. `values` maps
    option names to values: argparse's namespace as a dict, the web page's inputs, or a ComfyUI node's."""
    check_given(values)
    fields = {field.name: values.get(field.name) for field in dataclasses.fields(AnimateConfig)}
    fields = expand_shortcuts({**fields, **{name: values.get(name) for name in SHORTCUTS}})
    config = base if base is not None else load_preset(values.get("preset") or DEFAULT_PRESET)
    explicit = [key for key, value in fields.items() if value is not None]
    if values.get("published_sampling") and values.get("low_vram"):
        explicit.append("decode_chunk_size")  # its one-frame decode chunks win over the published 2, as --decode-chunk
    config = with_switches(config, [switch.name for switch in SWITCHES if values.get(switch.name)], explicit)
    return config.with_given(**fields)


def add_options(parser: argparse.ArgumentParser, options) -> None:
    for option in options:
        option.add_to(parser)


def add_generation_options(parser: argparse.ArgumentParser) -> None:
    add_options(parser, generation_options())
