"""One path for each job: the run settings object, the job's stages, the published recipe chosen once, the options
of every sub-command defined once, and None meaning "not given" in one place."""

import argparse
import dataclasses
from pathlib import Path

import numpy as np
import pytest

from pose.align import VISIBLE
from pose.skeleton import PoseSequence
from svd_animate import cli
from svd_animate.animate import OURS, PUBLISHED, Animator, detector_name, job_config, recipe_for
from svd_animate.config import (LOAD_KEYS, PUBLISHED_SAMPLING, SWITCHES, AnimateConfig, load_preset,
                                with_published_sampling)
from svd_animate.framing import crop_reference, crop_reference_published
from svd_animate.options import (convert_options, generation_options, pose_options, prepare_data_options,
                                 train_config_fields, train_options)
from svd_animate.run import RunSettings
from svd_common.errors import InputError

CLIP = "driving_controlnext_v2_01.mp4"
REF = "ref_controlnext_v2_01.jpeg"


def test_run_settings_come_from_the_flags_in_one_object(tmp_path):
    values = {"weights": tmp_path / "w", "device": "cpu", "cache_dir": tmp_path / "c", "no_cache": True,
              "dwpose_dir": tmp_path / "d", "quiet": True, "steps": 3}
    run = RunSettings.from_values(values)
    assert run == RunSettings(tmp_path / "w", "cpu", tmp_path / "c", False, tmp_path / "d", False)
    assert run.pose_cache() is None and RunSettings(cache_dir=tmp_path / "c").pose_cache().directory == tmp_path / "c"
    assert RunSettings.from_values({}, progress=False) == RunSettings(progress=False)
    assert RunSettings().resolved_device() == "cpu"  # (this machine has no GPU)
    with pytest.raises(InputError, match="--device banana: not a device name"):
        RunSettings(device="banana").resolved_device()


def test_none_means_not_given_only_in_with_given():
    config = load_preset("tiny")
    assert config.with_given(steps=5, seed=None, end=None).steps == 5
    assert config.with_given(seed=None).seed == config.seed
    assert config.replace(end=3.0).replace(end=None).end is None  # replace sets what it is given, None too


def test_the_recipe_is_chosen_once_from_the_config():
    ours, published = load_preset("tiny"), with_published_sampling(load_preset("tiny"))
    assert recipe_for(ours) is OURS and recipe_for(published) is PUBLISHED
    assert (OURS.frame_reference, OURS.fit_threshold, OURS.floor_fps, OURS.audio) == (crop_reference, VISIBLE, False,
                                                                                       True)
    assert (PUBLISHED.frame_reference, PUBLISHED.fit_threshold, PUBLISHED.floor_fps, PUBLISHED.audio) == (
        crop_reference_published, None, True, False)
    assert detector_name(ours) == "auto" and detector_name(published) == "dwpose"
    assert detector_name(published.replace(detector="mediapipe")) == "mediapipe"


def test_a_job_config_takes_the_overrides_and_turns_fps_into_this_clips_stride_once(shared_data, tmp_path):
    config = load_preset("tiny")
    job = job_config(config, shared_data / CLIP, fps=7.5, steps=4, guidance=2.0, seed=None)
    # the clip runs at 29 fps: 7.5 fps is every 4th frame (29 / 4 = 7.25), and fps is spent
    assert (job.stride, job.fps, job.steps, job.min_guidance, job.max_guidance, job.seed) == (4, None, 4, 2.0, 2.0,
                                                                                            config.seed)
    assert job_config(job, shared_data / CLIP) == job  # nothing left to turn into a stride again
    with pytest.raises(InputError, match="dtype: fixed for the whole run, not per job"):
        job_config(config, shared_data / CLIP, dtype="fp16")
    assert "dtype" in LOAD_KEYS


def test_the_sampling_switches_live_beside_the_values_they_set():
    names = {switch.name: switch for switch in SWITCHES}
    assert names["published_sampling"].settings is PUBLISHED_SAMPLING
    help_of = {option.name: option.help for option in generation_options()}
    assert help_of["fast"] == names["fast"].help and help_of["published_sampling"] == names["published_sampling"].help


def _parser_help(command: str) -> dict[str, str]:
    parser = cli.build_parser()
    sub = next(action for action in parser._actions if isinstance(action, argparse._SubParsersAction))
    return {action.dest: action.help for action in sub.choices[command]._actions}


def test_detector_and_align_say_the_same_everywhere_from_the_config_fields():
    field_help = {field.name: field.metadata["help"] for field in dataclasses.fields(AnimateConfig)}
    for command in ("animate", "batch", "pose", "prepare-data"):
        assert _parser_help(command)["detector"] == field_help["detector"], command
    assert _parser_help("animate")["align"].startswith(field_help["align"])
    assert _parser_help("pose")["align"] == f"{field_help['align']} (default: ls with --ref, none without)"
    assert "align" not in _parser_help("prepare-data")


@pytest.mark.parametrize("command, options", [("pose", pose_options), ("prepare-data", prepare_data_options),
                                              ("train", train_options), ("convert", convert_options)])
def test_every_sub_command_declares_its_flags_from_options(command, options):
    helps = _parser_help(command)
    for option in options():
        assert helps[option.name] == option.help, option.name


def test_train_flags_reach_the_config_by_their_field_names(tmp_path):
    from svd_animate.train.config import load_train_config

    args = cli.build_parser().parse_args(["train", "--config", "tiny", "--data", str(tmp_path), "--max-steps", "3",
                                          "--learning-rate", "0.0003", "--trainable", "lora", "--seed", "5"])
    fields = train_config_fields(vars(args))
    assert fields["data"] == str(tmp_path) and fields["output_dir"] is None  # a folder as its text; None: not given
    config = load_train_config("tiny").with_given(**fields)
    assert (config.data, config.max_steps, config.learning_rate, config.trainable, config.seed) == (
        str(tmp_path), 3, 3e-4, "lora", 5)
    assert config.mixed_precision == load_train_config("tiny").mixed_precision


@pytest.mark.realdata
def test_the_pose_command_saves_what_the_animation_job_follows(shared_data, tmp_path, capsys):
    """`svd-animate pose` runs the poses stage of the animation job: with the same settings, the same poses."""
    out = tmp_path / "poses.npz"
    assert cli.main(["-q", "pose", "--video", str(shared_data / CLIP), "--ref", str(shared_data / REF),
                     "--detector", "mediapipe", "--stride", "3", "--max-frames", "4", "--start", "0.5",
                     "-o", str(out)]) == 0
    saved = PoseSequence.load(out)
    config = load_preset("tiny").replace(detector="mediapipe", stride=3, max_frames=4, start=0.5)
    with Animator(config, RunSettings(progress=False)) as animator:
        job = animator.job(shared_data / REF, shared_data / CLIP)
        job.check()
        followed = job.poses()
    assert len(saved) == len(followed) == 4 and saved.meta["align"]["method"] == "ls"
    np.testing.assert_array_equal(saved.frame_index, followed.frame_index)
    assert saved.frame_index[0] == 15  # the first frame at or after 0.5 s (frame 14.5 at 29 fps)
    np.testing.assert_allclose(saved.body, followed.body, rtol=1e-6, atol=1e-6)
    assert job.extraction.from_cache  # the second extraction came from the pose cache the first one filled


@pytest.mark.realdata
def test_an_animation_job_runs_its_stages_and_reports_sampling_in_steps(shared_data, tmp_path):
    seen = []
    config = load_preset("tiny").replace(detector="mediapipe", max_frames=4, steps=2)
    with Animator(config, RunSettings(progress=False)) as animator:
        job = animator.job(shared_data / REF, shared_data / CLIP, tmp_path / "out.mp4",
                           on_progress=lambda *call: seen.append(call), end=1.0)
        job.check()
        assert not (tmp_path / "out.mp4").exists()
        poses = job.poses()
        latents = job.sample()
        assert latents.shape[:2] == (1, len(poses))
        frames = list(job.decode(latents))
        assert len(frames) == len(poses) and frames[0].shape == (64, 64, 3) and frames[0].dtype == np.uint8
        result = job.write(iter(frames))
    assert result.output == tmp_path / "out.mp4" and result.output.stat().st_size > 0 and result.frames == 4
    assert [call for call in seen if call[0] == "sampling"] == [("sampling", 1, 2), ("sampling", 2, 2)]
    assert [call[1] for call in seen if call[0] == "decoding"] == [1, 2, 3, 4]
    assert job.config.end == 1.0 and job.extraction.poses.frame_index.max() < 29
