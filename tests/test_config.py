"""One definition per option: the config fields give the CLI flags, YAML keys and manifest columns, and
every value is checked when a config is made, before anything loads."""

import dataclasses

import pytest

from svd_animate import batch, cli
from svd_animate.config import LOAD_KEYS, AnimateConfig, expand_shortcuts, load_preset, per_job_fields
from svd_common.errors import InputError


@pytest.mark.parametrize("text, message", [
    ("steps: 3\nwindw: 8\n", "unknown key 'windw'"),
    ("steps: three\n", "key 'steps' must be int"),
    ("- a list\n", "must be a mapping"),
    ("fusion: cosine\n", "key 'fusion' must be one of ramp, uniform, got 'cosine'"),
    ("align: sideways\n", "key 'align' must be one of ls, bones, none"),
    ("dtype: fp8\n", "key 'dtype' must be one of auto, fp32, fp16, bf16"),
    ("offload: gpu\n", "key 'offload' must be one of none, model, sequential"),
    ("detector: openpose\n", "key 'detector' must be one of auto, dwpose, mediapipe"),
    ("steps: 0\n", "steps must be at least 1, got 0"),
    ("window: 4\noverlap: 4\n", r"overlap \(4\) must be smaller than window \(4\)"),
    ("max_frames: two\n", "key 'max_frames' must be int or null"),
    ("max_guidance: .nan\n", "max_guidance must be a finite number, got nan"),
    ("control_scale: .inf\n", "control_scale must be a finite number, got inf"),
])
def test_preset_values_are_checked_when_loaded(tmp_path, text, message):
    path = tmp_path / "mine.yaml"
    path.write_text(text)
    with pytest.raises(InputError, match=message):
        load_preset(str(path))


def test_every_flagged_field_is_a_flag_of_animate_and_batch(capsys):
    for command in ("animate", "batch"):
        with pytest.raises(SystemExit):
            cli.main([command, "--help"])
        help_text = capsys.readouterr().out
        for field in dataclasses.fields(AnimateConfig):
            flag = field.metadata["flag"]
            if flag is not None:
                assert (flag or "--" + field.name.replace("_", "-")) in help_text, (command, field.name)
    assert "--prepend-reference-pose" not in help_text  # no flag: set by --published-sampling or a preset


def test_flags_reach_the_config():
    args = cli.build_parser().parse_args(
        ["animate", "--ref", "r.png", "--pose", "p.mp4", "--preset", "tiny", "--fusion", "uniform", "--decode-chunk",
         "3", "--no-audio", "--guidance", "2", "--control-weights", "c/", "--low-vram", "--seed", "7"])
    config = cli.config_from_args(args)
    assert (config.fusion, config.decode_chunk_size, config.audio, config.min_guidance, config.max_guidance,
            config.control_weights, config.low_vram, config.seed) == ("uniform", 3, False, 2.0, 2.0, "c/", True, 7)
    assert config.steps == load_preset("tiny").steps  # not given: the preset's


def test_a_bad_flag_value_is_one_line_before_anything_loads(tmp_path, capsys):
    code = cli.main(["-q", "--ref", str(tmp_path / "r.png"), "--pose", str(tmp_path / "p.mp4"), "--preset", "tiny",
                     "--window", "4", "--overlap", "6"])
    err = capsys.readouterr().err
    assert code == 2 and err == "svd-animate: error: overlap (6) must be smaller than window (4)\n"


def test_load_keys_and_job_columns_come_from_the_fields():
    assert set(LOAD_KEYS) == {"base_model", "control_weights", "unet_weights", "dtype", "offload", "compile",
                              "low_vram", "detector"}
    columns = per_job_fields()
    assert {"seed", "steps", "fusion", "align", "guidance", "max_frames"} <= set(columns)
    assert not set(columns) & set(LOAD_KEYS)
    assert expand_shortcuts({"guidance": 2.0, "max_guidance": 3.0}) == {"min_guidance": 2.0, "max_guidance": 3.0}


def test_manifest_values_are_checked_against_the_fields_and_the_config(tmp_path):
    (tmp_path / "r.png").write_bytes(b"x")
    (tmp_path / "p.mp4").write_bytes(b"x")
    manifest = tmp_path / "jobs.csv"
    manifest.write_text("ref,pose,output,fusion,steps,window\n"
                        "r.png,p.mp4,a.mp4,cosine,3,\n"
                        "r.png,p.mp4,b.mp4,uniform,zero,\n"
                        "r.png,p.mp4,c.mp4,uniform,0,\n"
                        "r.png,p.mp4,d.mp4,uniform,3,2\n")
    config = load_preset("tiny")  # overlap 2
    with pytest.raises(InputError) as info:
        batch.jobs_from_manifest(manifest, tmp_path / "out", config)
    lines = str(info.value).splitlines()
    assert "4 problems" in lines[0]
    assert lines[1:] == ["  job 1: fusion must be one of ramp, uniform, got 'cosine'",
                         "  job 2: steps must be int, got 'zero'",
                         "  job 3: steps must be at least 1, got 0",
                         "  job 4: overlap (2) must be smaller than window (2)"]


def test_non_finite_guidance_and_an_unwritable_container_are_refused_before_work(tmp_path, capsys):
    base = ["-q", "--ref", str(tmp_path / "r.png"), "--pose", str(tmp_path / "p.mp4"), "--preset", "tiny"]
    assert cli.main([*base, "--guidance", "nan"]) == 2
    assert capsys.readouterr().err == "svd-animate: error: --guidance must be a finite number, got nan\n"
    assert cli.main([*base, "-o", str(tmp_path / "out.avi")]) == 2
    assert capsys.readouterr().err == (f"svd-animate: error: {tmp_path / 'out.avi'}: cannot write .avi videos; end "
                                       "the name with .mp4, .mov, .mkv, .webm or .gif\n")
    assert cli.main([*base, "-o", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err == (f"svd-animate: error: {tmp_path / 'out'}: no extension to choose the video "
                                       "format from; end the name with .mp4, .mov, .mkv, .webm or .gif\n")
    assert not (tmp_path / "out.avi").exists() and not (tmp_path / "out").exists()


def test_a_preset_with_published_sampling_keeps_it_through_the_cli(tmp_path):
    """An unset --published-sampling is "not given": it no longer clears the preset's value."""
    preset = tmp_path / "mine.yaml"
    preset.write_text("extends: tiny\npublished_sampling: true\n")
    args = cli.build_parser().parse_args(["animate", "--ref", "r.png", "--pose", "p.mp4", "--preset", str(preset)])
    config = cli.config_from_args(args)
    assert config.published_sampling and config.fusion == "uniform" and config.prepend_reference_pose
