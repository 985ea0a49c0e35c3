"""The edges of the option definitions: presets that extend each other, the ranges of seed and control_scale,
messages that name what the user typed, and a flag's help where the flag inverts its field."""

import dataclasses
import re

import pytest
import torch

from svd_animate import cli
from svd_animate.config import AnimateConfig, load_preset, range_problem
from svd_animate.options import config_from_values, generation_options
from svd_common.errors import InputError

SEED_MAXIMUM = 2**32 - 1


def field(name):
    return next(f for f in dataclasses.fields(AnimateConfig) if f.name == name)


def refused(path) -> str:
    with pytest.raises(InputError) as info:
        load_preset(str(path))
    message = str(info.value)
    assert "\n" not in message
    return message


def config_from_flags(*flags) -> AnimateConfig:
    args = cli.build_parser().parse_args(["animate", "--ref", "r.png", "--pose", "p.mp4", "--preset", "tiny", *flags])
    return cli.config_from_args(args)


# Presets that extend each other


def test_a_preset_extending_itself_is_refused_in_one_line(tmp_path):
    (tmp_path / "a.yaml").write_text("extends: a.yaml\nsteps: 3\n")
    assert refused(tmp_path / "a.yaml") == f"{tmp_path / 'a.yaml'}: presets extend each other in a circle " \
                                           "(a.yaml -> a.yaml)"


def test_presets_extending_each_other_are_refused_naming_the_circle(tmp_path):
    (tmp_path / "a.yaml").write_text("extends: b.yaml\n")
    (tmp_path / "b.yaml").write_text("extends: ./a.yaml\n")  # another spelling of the same file
    (tmp_path / "top.yaml").write_text("extends: a.yaml\n")  # leads into the circle, is not part of it
    assert refused(tmp_path / "a.yaml").endswith(": presets extend each other in a circle (a.yaml -> b.yaml -> a.yaml)")
    assert refused(tmp_path / "top.yaml") == f"{tmp_path / 'a.yaml'}: presets extend each other in a circle " \
                                             "(a.yaml -> b.yaml -> a.yaml)"


def test_a_circle_through_files_of_one_name_names_them_by_path(tmp_path):
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    (tmp_path / "one" / "x.yaml").write_text("extends: ../two/x.yaml\n")
    (tmp_path / "two" / "x.yaml").write_text("extends: ../one/x.yaml\n")
    message = refused(tmp_path / "one" / "x.yaml")
    assert re.search(r"in a circle \(\S*one/x\.yaml -> \S*two/x\.yaml -> \S*one/x\.yaml\)$", message), message


def test_a_relative_extends_path_is_taken_from_the_presets_folder(tmp_path, monkeypatch):
    presets, elsewhere = tmp_path / "presets", tmp_path / "elsewhere"
    (presets / "sub").mkdir(parents=True)
    elsewhere.mkdir()
    (presets / "base.yaml").write_text("extends: tiny\nsteps: 7\n")
    (presets / "mine.yaml").write_text("extends: base.yaml\nwindow: 6\noverlap: 1\n")
    (presets / "sub" / "deep.yaml").write_text("extends: ../mine.yaml\nseed: 5\n")
    (presets / "named.yaml").write_text("extends: tiny\n")
    (presets / "tiny.yaml").write_text("steps: 9\n")  # `extends: tiny` is the built-in preset, not this file
    (elsewhere / "base.yaml").write_text("steps: 9\n")  # the current directory's file is not the one meant
    (presets / "lost.yaml").write_text("extends: missing.yaml\n")
    monkeypatch.chdir(elsewhere)

    config = load_preset(str(presets / "sub" / "deep.yaml"))
    assert (config.steps, config.window, config.overlap, config.seed, config.base_model) == (7, 6, 1, 5, "tiny")
    assert load_preset(str(presets / "named.yaml")) == load_preset("tiny")
    # a file that is not there is named where it was looked for
    assert refused(presets / "lost.yaml").startswith(f"{presets / 'missing.yaml'}: no such preset (built in: ")


# Ranges


def test_range_problem_says_the_whole_allowed_range():
    assert range_problem(5, 0, 10) is None and range_problem(10, 0, 10) is None and range_problem(0, 0, None) is None
    assert range_problem(11, 0, 10) == range_problem(-1, 0, 10) == "between 0 and 10"
    assert range_problem(2**70, -1, SEED_MAXIMUM) == "between -1 and 4294967295"  # not 4.29497e+09
    assert range_problem(0, 0.01, None) == "at least 0.01"
    assert range_problem(11.5, None, 10) == "at most 10"


def test_the_seed_maximum_is_one_every_consumer_takes():
    maximum = field("seed").metadata["maximum"]
    assert maximum == SEED_MAXIMUM
    torch.Generator(device="cpu").manual_seed(maximum)  # the sampler's noise
    from svd_controlnext.tiny import tiny_components

    tiny_components(maximum)  # the tiny preset's weights
    seed = next(option for option in generation_options() if option.name == "seed")
    assert (seed.minimum, seed.maximum) == (-1, SEED_MAXIMUM)  # for the page's number box
    assert config_from_flags("--seed", str(maximum)).seed == maximum


def test_control_scale_is_bounded_like_comfyuis_controlnet_strength():
    scale = next(option for option in generation_options() if option.name == "control_scale")
    assert (scale.minimum, scale.maximum) == (0, 10)
    assert config_from_flags("--control-scale", "10").control_scale == 10
    assert config_from_flags("--control-scale", "0").control_scale == 0


# Messages name what the user typed: the flag on the command line, the key in a preset


BASE = ["-q", "--ref", "r.png", "--pose", "p.mp4", "--preset", "tiny"]


@pytest.mark.parametrize("flags, message", [
    (["--guidance", "nan"], "--guidance must be a finite number, got nan"),
    (["--guidance", "-1"], "--guidance must be at least 0, got -1.0"),
    (["--control-scale", "1e30"], "--control-scale must be between 0 and 10, got 1e+30"),
    (["--control-scale", "-0.5"], "--control-scale must be between 0 and 10, got -0.5"),
    (["--control-scale", "inf"], "--control-scale must be a finite number, got inf"),
    (["--seed", str(2**70)], f"--seed must be between -1 and 4294967295, got {2**70}"),
    (["--seed", "4294967296"], "--seed must be between -1 and 4294967295, got 4294967296"),
    (["--seed", "-2"], "--seed must be between -1 and 4294967295, got -2"),
    (["--decode-chunk", "0"], "--decode-chunk must be at least 1, got 0"),
    (["--steps", "0"], "--steps must be at least 1, got 0"),
    (["--fps", "0"], "--fps must be at least 0.01, got 0.0"),
])
def test_a_bad_flag_value_names_the_flag(tmp_path, monkeypatch, capsys, flags, message):
    monkeypatch.chdir(tmp_path)
    assert cli.main([*BASE, *flags]) == 2
    assert capsys.readouterr().err == f"svd-animate: error: {message}\n"


def test_the_pages_values_are_named_by_their_flags_too():
    """The page makes its config with config_from_values, as the CLI does."""
    with pytest.raises(InputError, match=r"^--control-scale must be between 0 and 10, got 1e\+30$"):
        config_from_values({"preset": "tiny", "control_scale": 1e30})
    with pytest.raises(InputError, match=r"^--guidance must be a finite number, got nan$"):
        config_from_values({"preset": "tiny", "guidance": float("nan")})


@pytest.mark.parametrize("text, message", [
    ("seed: 4294967296\n", "seed must be between -1 and 4294967295, got 4294967296"),
    ("control_scale: 11\n", "control_scale must be between 0 and 10, got 11"),
    ("control_scale: -1\n", "control_scale must be between 0 and 10, got -1"),
])
def test_preset_keys_are_named_by_their_keys(tmp_path, text, message):
    (tmp_path / "mine.yaml").write_text(text)
    assert refused(tmp_path / "mine.yaml") == f"{tmp_path / 'mine.yaml'}: {message}"


# A flag that inverts its field


def test_no_audio_help_says_what_the_flag_does(capsys):
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["animate", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    entry = help_text[help_text.rindex("--no-audio"):]  # its entry, after the usage line
    entry = entry[:entry.index(" --", 1)]
    assert entry == "--no-audio leave out the driving clip's audio track (default: keep it)"
    audio = next(option for option in generation_options() if option.name == "audio")
    assert audio.help == "leave out the driving clip's audio track (default: keep it)"  # the page's "no audio" box
    assert field("audio").metadata["help"] == "keep the driving clip's audio track"  # the preset key `audio`
