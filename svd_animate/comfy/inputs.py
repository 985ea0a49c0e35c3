"""ComfyUI inputs made from the option definitions (`svd_animate/options.py`, the config's fields), and the values a
node receives turned back into option values: names, defaults, allowed values, ranges and help are written once.

A ComfyUI widget always holds a value, where a CLI flag can be left out. So a widget left at its default means "not
given" (the preset's value applies, or `fast`'s), as a flag left out does; a number whose field has no default
(`end`, `max_frames`, ...) shows 0 for that. Pure: no ComfyUI import.
"""

from __future__ import annotations

import dataclasses

from ..config import POSE_KEYS, SWITCHES, AnimateConfig
from ..options import Option, config_field_option, is_optional_number

FIELDS = {field.name: field for field in dataclasses.fields(AnimateConfig)}
NOT_GIVEN = 0  # what a number widget shows for a field whose default is None
INT_MAX = 2**31 - 1  # a widget needs a maximum; ComfyUI's own default one (2048) is below some of ours
FLOAT_MAX = 1e6


def switch_option(name: str) -> Option:
    switch = next(switch for switch in SWITCHES if switch.name == name)
    return Option(switch.name, switch.help, bool)


def stage_options(poses: bool) -> list[Option]:
    """The per-job options of one side of the poses: those the `poses` stage uses (Poses node) or the sampler's
    (Sample node), every per-job field of `AnimateConfig` on one side; `--fast` sets sampler fields only."""
    options = [config_field_option(name) for name, field in FIELDS.items()
               if field.metadata.get("per_job") and (name in POSE_KEYS) == poses]
    return options if poses else [switch_option("fast"), *options]


def widget_default(option: Option):
    """What the widget shows before the user touches it: the field's default (0 for a number that may be left
    out), a switch off, an option's own default."""
    if option.is_switch:
        return False
    if is_optional_number(option):
        return NOT_GIVEN
    return FIELDS[option.name].default if option.name in FIELDS else option.default


def tooltip(option: Option) -> str:
    if option.name not in FIELDS:
        return option.help
    return f"{option.help} ({'0' if is_optional_number(option) else 'left at its default'}: the preset's value)"


def input_spec(option: Option) -> tuple:
    """`(TYPE, {options})` as `INPUT_TYPES` declares an input (a combo: the list of its values)."""
    default = widget_default(option)
    spec = {"default": default, "tooltip": tooltip(option)}
    if option.is_switch:
        return "BOOLEAN", spec
    if option.choices is not None:
        return list(option.choices), spec
    if option.kind not in (int, float):
        return "STRING", spec
    largest = INT_MAX if option.kind is int else FLOAT_MAX
    lowest = option.minimum if option.minimum is not None else -largest
    spec.update({"min": min(lowest, NOT_GIVEN) if is_optional_number(option) else lowest,
                 "max": option.maximum if option.maximum is not None else largest})
    if option.kind is int:
        return "INT", {**spec, "step": 1, **({"control_after_generate": True} if option.name == "seed" else {})}
    return "FLOAT", {**spec, "step": 0.01, "round": 0.001}  # (the front end rounds to the step unless told)


def input_types(options: list[Option]) -> dict:
    return {option.name: input_spec(option) for option in options}


def given_values(options: list[Option], received: dict) -> dict:
    """The values a node received as option values, each left at its widget's default as None (not given)."""
    values = {}
    for option in options:
        value = received.get(option.name)
        values[option.name] = None if value is None or value == widget_default(option) else value
    return values
