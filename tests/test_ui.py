"""`svd-animate ui` without a browser: the page's inputs come from the option definitions, its values make the
config the CLI makes, and the jobs behind it (poses, animate, cancel, errors) write what they say and nothing else."""

import dataclasses
import threading

import av
import numpy as np
import pytest

gr = pytest.importorskip("gradio")

from pose.skeleton import PoseSequence  # noqa: E402
from svd_animate import cli  # noqa: E402
from svd_animate.config import FAST_SAMPLING, AnimateConfig  # noqa: E402
from svd_animate.options import Option, generation_options  # noqa: E402
from svd_animate.ui.jobs import CancelFlag, JobRunner  # noqa: E402
from svd_animate.ui.page import Page, error_status, page_options, values_from_inputs  # noqa: E402
from svd_common.errors import Cancelled, InputError, NoPersonError, UserError  # noqa: E402
from svd_common.video import VideoWriter  # noqa: E402
from svd_controlnext.windows import plan_windows  # noqa: E402

CLIP = "driving_controlnext_v2_01.mp4"
REF = "ref_controlnext_v2_01.jpeg"


def count_frames(path) -> int:
    with av.open(str(path)) as container:
        return sum(1 for _ in container.decode(video=0))


def parse_animate(flags):
    parser = cli.build_parser()
    return parser.parse_args(["animate", "--ref", "r.png", "--pose", "p.mp4", *flags])


# -- one definition per option ------------------------------------------------------------------------------

def test_every_generation_option_is_a_page_input_or_a_ui_flag():
    parser = cli.build_parser()
    sub = parser._subparsers._group_actions[0].choices  # argparse keeps sub-parsers here
    animate_dests = {a.dest for a in sub["animate"]._actions} - {"help", "quiet", "verbose", "ref", "pose", "output"}
    ui_dests = {a.dest for a in sub["ui"]._actions} - {"help", "quiet", "verbose", "host", "port", "output_dir",
                                                       "examples"}
    names = {option.name for option in generation_options()}
    assert animate_dests == names
    on_page = {option.name for option in page_options()}
    assert ui_dests == (names - on_page - {"no_cache"}) | {"preset"}
    # the load-deciding config fields are server flags; the rest are per job, as in a batch
    load = {f.name for f in dataclasses.fields(AnimateConfig) if f.metadata.get("load")}
    assert not on_page & load


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    runner = JobRunner(tmp_path_factory.mktemp("ui-out"), device="cpu", fixed={"detector": "mediapipe"})
    page = Page(runner, preset="tiny")
    page.build()
    yield page
    runner.close()


def test_the_page_has_one_input_per_page_option_built_from_its_definition(page):
    assert [c.elem_id for c in page.option_inputs] == [f"opt-{o.name}" for o in page.options]
    for option, component in zip(page.options, page.option_inputs):
        assert component.info == option.help
        if option.choices is not None:
            assert [value for value, _ in component.choices] == list(option.choices)
        if option.is_switch:
            assert isinstance(component, gr.Checkbox)
    steps = page.option_inputs[[o.name for o in page.options].index("steps")]
    assert isinstance(steps, gr.Number) and steps.value == 3  # the tiny preset's steps, shown


def test_page_values_make_the_config_the_cli_flags_make(page):
    names = [o.name for o in page.options]
    raw = [update["value"] for update in page.refresh("tiny", True, False, *[None] * len(names))[1:]]  # fast ticked
    raw[names.index("preset")] = "tiny"
    raw[names.index("fast")] = True
    raw[names.index("steps")] = 12.0
    raw[names.index("max_frames")] = " 8 "
    raw[names.index("guidance")] = "2"
    raw[names.index("audio")] = True  # the `no audio` box ticked
    values = values_from_inputs(page.options, raw)
    from_page = page.runner.config(values)
    from_cli = cli.config_from_args(parse_animate(["--preset", "tiny", "--fast", "--steps", "12", "--max-frames", "8",
                                                   "--guidance", "2", "--no-audio", "--detector", "mediapipe"]))
    assert from_page == from_cli
    assert (from_page.steps, from_page.max_frames, from_page.min_guidance, from_page.audio) == (12, 8, 2.0, False)
    assert from_page.sigma_schedule == FAST_SAMPLING["sigma_schedule"] and from_page.fast_sampling


def test_ticking_fast_shows_the_fast_settings(page):
    updates = page.refresh("tiny", True, False, *[None] * len(page.options))
    shown = {o.name: u["value"] for o, u in zip(page.options, updates[1:])}
    assert shown["steps"] == FAST_SAMPLING["steps"]
    assert shown["sigma_schedule"] == "ays" and shown["cache_interval"] == 2
    assert shown["guidance_sigma_max"] == "5.42"  # a number that may be empty is a text box
    status = page.refresh("no-such-preset", False, False, *[None] * len(page.options))[0]
    assert status["value"].startswith("Error: no-such-preset: no such preset") and "\n" not in status["value"]


def test_values_from_inputs_reads_empty_as_not_given_and_names_bad_numbers():
    options = [Option("max_frames", "", int), Option("fps", "", float), Option("side_by_side", "", bool),
               Option("fusion", "", choices=("ramp", "uniform"))]
    assert values_from_inputs(options, ["", "  ", False, None]) == {"max_frames": None, "fps": None,
                                                                    "side_by_side": None, "fusion": None}
    assert values_from_inputs(options, ["8", "7.5", True, "ramp"]) == {"max_frames": 8, "fps": 7.5,
                                                                       "side_by_side": True, "fusion": "ramp"}
    with pytest.raises(InputError, match=r"^max frames: must be a whole number, got '8.5'$"):
        values_from_inputs(options, ["8.5", "", False, None])
    with pytest.raises(InputError, match=r"^fps: must be a number, got 'fast'$"):
        values_from_inputs(options, ["", "fast", False, None])


def test_error_status_is_one_line():
    import torch

    assert error_status(NoPersonError("a.mp4: no person\nwas found")) == "Error: a.mp4: no person was found"
    assert error_status(Cancelled("x")).startswith("Cancelled:")
    assert "smaller width/height" in error_status(torch.OutOfMemoryError("CUDA out of memory"))
    bug = error_status(KeyError("width"))
    assert bug.startswith("Error: KeyError:") and "server's log" in bug and "\n" not in bug


# -- the jobs behind the page -------------------------------------------------------------------------------

TINY = {"preset": "tiny", "max_frames": 8}


@pytest.fixture(scope="module")
def runner(tmp_path_factory):
    runner = JobRunner(tmp_path_factory.mktemp("jobs"), device="cpu",
                       cache_dir=tmp_path_factory.mktemp("pose-cache"), fixed={"detector": "mediapipe"})
    yield runner
    runner.close()


def job_folders(runner):
    return sorted(path.name for path in runner.output_dir.iterdir())


@pytest.mark.realdata
def test_pose_job_saves_the_aligned_poses_and_a_three_panel_preview(runner, shared_data):
    calls = []
    job = runner.poses(shared_data / REF, shared_data / CLIP, TINY, lambda *call: calls.append(call))
    poses = PoseSequence.load(job.poses)
    assert len(poses) == 8 == job.frames
    assert poses.meta["align"]["method"] == "ls" and poses.meta["reference"] == REF
    assert (poses.width, poses.height) == (1200, 2140)  # the reference's frame, as `svd-animate pose --ref` saves
    assert count_frames(job.preview) == 8
    with av.open(str(job.preview)) as container:
        stream = container.streams.video[0]
        panel = round(1200 * stream.height / 2140)
        assert stream.width >= 3 * panel - 2  # source | skeleton | skeleton over the reference
    assert [c for c in calls if c[0] == "preview"][-1] == ("preview", 8, 8)
    assert job.folder.parent == runner.output_dir and not job.folder.name.startswith(".")


@pytest.mark.realdata
def test_animation_job_writes_the_video_and_poses_with_models_loaded_once(runner, shared_data):
    first = runner.animate(shared_data / REF, shared_data / CLIP, {**TINY, "side_by_side": True})
    pipe = runner._animator._pipe
    assert count_frames(first.video) == 8 == first.frames
    with av.open(str(first.video)) as container:
        assert container.streams.video[0].width == 2 * 64  # skeleton | result
    assert len(PoseSequence.load(first.poses)) == 8
    second = runner.animate(shared_data / REF, shared_data / CLIP, {**TINY, "steps": 2, "seed": 7, "max_frames": 6})
    assert runner._animator._pipe is pipe  # the same loaded models
    assert count_frames(second.video) == 6 and second.seed == 7
    assert second.random_weights and second.folder != first.folder


@pytest.mark.realdata
def test_cancel_stops_sampling_at_once_and_leaves_nothing(runner, shared_data):
    before = job_folders(runner)
    flag, seen = CancelFlag(), []
    windows = len(plan_windows(16, 8, 2))  # 16 frames in the tiny preset's windows of 8 sharing 2: 3 windows

    def on_progress(stage, done, total):
        seen.append((stage, done, total))
        if stage == "sampling" and done == 2 * windows:
            flag.cancel()

    with pytest.raises(Cancelled):
        runner.animate(shared_data / REF, shared_data / CLIP, {**TINY, "max_frames": 16, "steps": 50}, on_progress,
                       flag)
    assert windows == 3
    # progress in steps x windows; step 3 never ran
    assert [s for s in seen if s[0] == "sampling"] == [("sampling", 3, 150), ("sampling", 6, 150)]
    assert job_folders(runner) == before  # no partial folder, no partial file
    assert runner._lock.acquire(blocking=False)  # the worker is free for the next job
    runner._lock.release()


@pytest.mark.realdata
def test_bad_inputs_are_one_line_errors_before_any_work(runner, shared_data, tmp_path):
    before = job_folders(runner)
    notes = tmp_path / "notes.txt"
    notes.write_text("not a video")
    cases = [(None, shared_data / CLIP, r"^no reference image: upload one"),
             (shared_data / REF, None, r"^no driving video: upload one"),
             (shared_data / REF, notes, r"notes.txt"),
             (shared_data / REF, shared_data / REF, r"is an image; the driving input must be a video"),
             (shared_data / REF, shared_data / CLIP, r"max_frames must be at least 1")]
    for reference, video, message in cases:
        values = {**TINY, "max_frames": 0} if "max_frames" in message else TINY
        with pytest.raises(UserError, match=message) as error:
            runner.poses(reference, video, values)
        assert "\n" not in str(error.value)
    assert job_folders(runner) == before


@pytest.mark.realdata
def test_a_clip_with_nobody_in_it_says_so(runner, shared_data, tmp_path):
    blank = tmp_path / "empty_room.mp4"
    with VideoWriter(blank, fps=10) as writer:
        for _ in range(6):
            writer.write(np.full((128, 96, 3), 90, np.uint8))
    with pytest.raises(NoPersonError, match="empty_room.mp4: no person was found in any of its 2 frames"):
        runner.poses(shared_data / REF, blank, TINY)


@pytest.mark.realdata
def test_a_second_job_waits_for_the_first(runner, shared_data):
    """One job at a time on the worker, whatever the page's queue lets through."""
    release, second_seen = threading.Event(), []

    def hold(stage, done, total):
        if stage == "sampling":
            release.wait(30)

    first = threading.Thread(target=runner.animate, args=(shared_data / REF, shared_data / CLIP, TINY, hold))
    first.start()
    while not runner._lock.locked():
        first.join(0.05)
    second = threading.Thread(target=runner.poses, args=(shared_data / REF, shared_data / CLIP, TINY,
                                                         lambda *call: second_seen.append(call)))
    second.start()
    second.join(1.0)
    assert second.is_alive() and second_seen == []  # waiting for the worker
    release.set()
    first.join(30)
    second.join(30)
    assert second_seen and not second.is_alive()


def test_ui_command_refuses_a_bad_preset_and_examples_in_one_line(tmp_path, capsys):
    assert cli.main(["ui", "--preset", "nope", "--output-dir", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip().startswith("svd-animate: error: nope: no such preset")
    assert cli.main(["ui", "--examples", str(tmp_path / "none"), "--output-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no such folder" in err


def test_ui_command_refuses_a_port_in_use_in_one_line(tmp_path, capsys, monkeypatch):
    import socket

    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "uploads"))  # run_ui only sets it when unset
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert cli.main(["ui", "--preset", "tiny", "--port", str(port), "--output-dir", str(tmp_path)]) == 2
    assert capsys.readouterr().err == (f"svd-animate: error: cannot serve on 127.0.0.1:{port}: port {port} is in use "
                                       "(choose another with --port)\n")
