"""The options of a generation run, each defined once.

`generation_options()` lists them: the run-level ones (preset, the sampling shortcuts, side by side), one per
`AnimateConfig` field that has a flag (type, allowed values and help come from the field), and the pose
source. The CLI (`animate`, `batch`) adds them to its parsers with `Option.add_to`; the web page (`svd-animate ui`)
builds one input from each `on_page` option; both turn what was given into a config with `config_from_values`.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from pose.align import ALIGN_METHODS
from pose.detect import DETECTORS

from .config import (SHORTCUTS, AnimateConfig, allowed_values, check_value, expand_shortcuts, field_types, load_preset,
                     with_fast_sampling, with_published_sampling)

DEFAULT_PRESET = "controlnext-svd-v2"


@dataclasses.dataclass(frozen=True)
class Option:
    """One option: its name (the config field or argparse dest), flag, value type, allowed values, help.
    `on_page`: a per-job input of the web page (False: fixed for the whole server, a `ui` command flag).
    `minimum`, `maximum`: the field's range, for an input that can hold to it (a number box); the values given
    are checked against the field in `config_from_values` either way."""

    name: str
    help: str
    kind: type = str  # int, float, str, bool or Path
    flag: str = ""  # "" derives `--name-with-dashes`
    choices: tuple | None = None
    default: object = None  # None: not given (the preset's value applies)
    on_page: bool = True
    minimum: float | None = None
    maximum: float | None = None

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
        if self.is_switch:
            action = "store_true" if self.switch_value else "store_false"
            parser.add_argument(self.cli_flag, dest=self.name, action=action, default=None, help=self.help)
        elif self.choices is not None:
            parser.add_argument(self.cli_flag, dest=self.name, choices=self.choices, default=self.default,
                                help=self.help)
        else:
            parser.add_argument(self.cli_flag, dest=self.name, type=self.kind, default=self.default, help=self.help)


def config_options() -> list[Option]:
    """One option per `AnimateConfig` field with a flag, everything about it taken from the field; its help is
    the flag's own where the flag inverts the field (`--no-audio`), as the CLI and the page's "no audio" box
    both say what the flag does."""
    types = field_types(AnimateConfig)
    options = []
    for field in dataclasses.fields(AnimateConfig):
        flag = field.metadata.get("flag", "")
        if flag is None:
            continue
        annotation = types[field.name]
        kind = next((t for t in (bool, int, float, str) if t == annotation or t in getattr(annotation, "__args__", ())),
                    str)
        options.append(Option(field.name, field.metadata.get("flag_help") or field.metadata["help"], kind, flag,
                              allowed_values(annotation), on_page=not field.metadata.get("load"),
                              minimum=field.metadata.get("minimum"), maximum=field.metadata.get("maximum")))
    return options


def pose_source_options(align_default: str | None) -> list[Option]:
    """The options of every command that extracts poses: backend, alignment (unless `align_default` is
    None), cache."""
    options = [
        Option("detector", "pose backend (default: auto = DWPose, fetched once from the hub yzd-v/DWPose (~350 MB) "
                           "when not found locally; MediaPipe, with a warning, when offline or HF_HUB_OFFLINE=1. "
                           "dwpose: an error instead of falling back; mediapipe: never uses the network)",
               choices=DETECTORS, on_page=False),
        Option("dwpose_dir", "folder with yolox_l.onnx and dw-ll_ucoco_384.onnx", Path, on_page=False),
    ]
    if align_default is not None:
        options.append(Option("align", "ls: the published least-squares fit; bones: ls plus the reference's limb "
                                       f"lengths; none: keep the driving positions (default: {align_default})",
                              choices=(*ALIGN_METHODS, "none")))
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
        Option("guidance", "classifier-free guidance (min and max)", float),
        Option("published_sampling", "the published ControlNeXt-SVD-v2 path: its sampler exactly (reference pose as "
                                     "frame 0 and at position 0 of every window, plain window mean), its reference "
                                     "framing and alignment fit, DWPose, fp32, decode chunks of 2, at most 240 "
                                     "frames, fps floored, no audio (flags given explicitly still win; README: "
                                     "differences)", bool),
        Option("fast", "fast sampling: Align Your Steps at 10 steps, guidance only for noise levels in (0.28, 5.42], "
                       "DeepCache every 2nd step (about a quarter of the published time; flags given explicitly "
                       "still win; README: fast sampling)", bool),
        Option("device", "cpu, cuda, cuda:1, ... (default: cuda when available)", on_page=False),
        Option("side_by_side", "write skeleton | result", bool),
        *config_options(),
        *pose_source_options(align_default="the preset's, ls"),
    ]


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


def config_from_values(values) -> AnimateConfig:
    """The preset, then the published or fast settings, then every value given (None: not given), each checked
    first and named by its flag. `values` maps option names to values: argparse's namespace as a dict, or the
    web page's inputs."""
    check_given(values)
    fields = {field.name: values.get(field.name) for field in dataclasses.fields(AnimateConfig)}
    fields = expand_shortcuts({**fields, "guidance": values.get("guidance")})
    config = load_preset(values.get("preset") or DEFAULT_PRESET)
    explicit = [key for key, value in fields.items() if value is not None]
    if values.get("published_sampling"):
        if values.get("low_vram"):  # its one-frame decode chunks win over the published 2, as --decode-chunk would
            explicit.append("decode_chunk_size")
        config = with_published_sampling(config, explicit)
    if values.get("fast"):
        config = with_fast_sampling(config, explicit)
    return config.replace(**fields)


def add_generation_options(parser: argparse.ArgumentParser) -> None:
    for option in generation_options():
        option.add_to(parser)
