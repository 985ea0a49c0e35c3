"""`svd-animate ui` without a browser: the page's inputs come from the option definitions, its values make the
config the CLI makes, and the jobs behind it (poses, animate, cancel, errors) write what they say and nothing else."""

import dataclasses
import threading
import time
from types import SimpleNamespace

import av
import numpy as np
import pytest

gr = pytest.importorskip("gradio")

from pose.skeleton import PoseSequence  # noqa: E402
from svd_animate import cli  # noqa: E402
from svd_animate.config import FAST_SAMPLING, AnimateConfig  # noqa: E402
from svd_animate.options import Option, generation_options  # noqa: E402
from svd_animate.run import RunSettings  # noqa: E402
from svd_animate.ui.jobs import CancelFlag, JobRunner  # noqa: E402
from svd_animate.ui.page import Page, error_status, page_options, shown_value, values_from_inputs  # noqa: E402
from svd_common.errors import Cancelled, InputError, NoPersonError, UserError  # noqa: E402
from svd_common.video import VideoWriter  # noqa: E402

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
    animate_dests = {a.dest for a in sub["animate"]._actions} - {"help", "quiet", "verbose", "ref", "pose", "output",
                                                                   "num_processes"}
    ui_dests = {a.dest for a in sub["ui"]._actions} - {"help", "quiet", "verbose", "host", "port", "output_dir",
                                                       "examples", "auth", "auth_file", "no_auth", "max_upload"}
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


def shown_inputs(page, preset="tiny"):
    """The option inputs as the page first shows them for `preset`."""
    config = page.runner.config({"preset": preset})
    return [preset if o.name == "preset" else shown_value(config, o, None) for o in page.options]


def apply(raw, updates):
    """The inputs after a handler's updates (an update without a value leaves the input as it was)."""
    return [update.get("value", value) for value, update in zip(raw, updates)]


def test_page_values_make_the_config_the_cli_flags_make(page):
    names = [o.name for o in page.options]
    raw = shown_inputs(page)
    raw[names.index("steps")] = 12.0  # edited, then fast ticked: the edit stays, as `--steps 12 --fast`
    raw[names.index("fast")] = True
    raw = apply(raw, page.refresh(("tiny", False, False), "tiny", True, False, *raw)[2:])
    raw[names.index("max_frames")] = " 8 "
    raw[names.index("guidance")] = "2"
    raw[names.index("audio")] = True  # the `no audio` box ticked
    from_page = page.runner.config(page.job_values(raw, ("tiny", True, False)))
    from_cli = cli.config_from_args(parse_animate(["--preset", "tiny", "--fast", "--steps", "12", "--max-frames", "8",
                                                   "--guidance", "2", "--no-audio", "--detector", "mediapipe"]))
    assert from_page == from_cli
    assert (from_page.steps, from_page.max_frames, from_page.min_guidance, from_page.audio) == (12, 8, 2.0, False)
    assert from_page.sigma_schedule == FAST_SAMPLING["sigma_schedule"] and from_page.fast_sampling


def test_fast_ticked_with_the_inputs_as_shown_is_the_cli_fast(page):
    """Even before the page's refresh has rewritten the inputs, unchanged inputs are "not given"."""
    names = [o.name for o in page.options]
    raw = shown_inputs(page)
    raw[names.index("fast")] = True
    from_cli = cli.config_from_args(parse_animate(["--preset", "tiny", "--fast", "--detector", "mediapipe"]))
    assert page.runner.config(page.job_values(raw, ("tiny", False, False))) == from_cli
    raw[names.index("preset")] = "/etc/some.yaml"  # only the listed presets
    with pytest.raises(InputError, match=r"^preset '/etc/some.yaml': choose one of "):
        page.job_values(raw, ("tiny", False, False))


def test_ticking_fast_shows_the_fast_settings_and_keeps_edits(page):
    names = [o.name for o in page.options]
    raw = shown_inputs(page)
    raw[names.index("seed")] = 7  # the visitor's own
    updates = page.refresh(("tiny", False, False), "tiny", True, False, *raw)
    assert updates[1] == ("tiny", True, False)  # the choice the inputs now show
    shown = dict(zip(names, apply(raw, updates[2:])))
    assert shown["steps"] == FAST_SAMPLING["steps"] and shown["seed"] == 7
    assert shown["sigma_schedule"] == "ays" and shown["cache_interval"] == 2
    assert shown["guidance_sigma_max"] == "5.42"  # a number that may be empty is a text box
    assert shown["fast"] is True
    on_fast_preset = dict(zip(names, apply(raw, page.refresh(("tiny", False, False), "fast", False, False, *raw)[2:])))
    assert on_fast_preset["fast"] is True and on_fast_preset["steps"] == 10  # the fast preset shows itself
    status = page.refresh(("tiny", False, False), "no-such-preset", False, False, *raw)[0]
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

    def on_progress(stage, done, total):
        seen.append((stage, done, total))
        if stage == "sampling" and done == 2:
            flag.cancel()

    with pytest.raises(Cancelled):
        runner.animate(shared_data / REF, shared_data / CLIP, {**TINY, "max_frames": 16, "steps": 50}, on_progress,
                       flag)
    # progress in denoising steps (each over every window); step 3 never ran
    assert [s for s in seen if s[0] == "sampling"] == [("sampling", 1, 50), ("sampling", 2, 50)]
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
             (shared_data / REF, shared_data / CLIP, r"--max-frames must be at least 1, got 0")]
    for reference, video, message in cases:
        values = {**TINY, "max_frames": 0} if "--max-frames" in message else TINY
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

    results = {}
    first = threading.Thread(target=lambda: results.update(
        first=runner.animate(shared_data / REF, shared_data / CLIP, TINY, hold)))
    first.start()
    deadline = time.monotonic() + 60
    while not runner._lock.locked():
        assert first.is_alive() and time.monotonic() < deadline, "the first job never took the worker"
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
    assert results["first"].frames == 8


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


@pytest.mark.realdata
def test_the_result_keeps_the_driving_clips_audio(runner, shared_data, tmp_path):
    from svd_common.video import iter_frames
    from tests.helpers import write_clip

    frames = [rgb for _, rgb in iter_frames(shared_data / CLIP, max_frames=16)]
    clip = write_clip(tmp_path / "dance_with_music.mp4", frames, fps=29, tone_hz=440)
    job = runner.animate(shared_data / REF, clip, {**TINY, "max_frames": 4})
    with av.open(str(job.video)) as container:
        assert len(container.streams.audio) == 1 and count_frames(job.video) == 4
    assert "with the driving clip's audio" in job.summary


def test_a_killed_servers_half_jobs_are_removed_at_start(tmp_path):
    import os

    stale = tmp_path / ".20261127-101010-001-dance.x1y2.partial"
    stale.mkdir()
    (stale / "poses.npz").write_bytes(b"half")
    day_old = time.time() - 24 * 3600
    os.utime(stale, (day_old, day_old))
    running = tmp_path / ".20261127-111111-001-dance.z9z9.partial"  # another server's job, going on now
    running.mkdir()
    kept = tmp_path / "20261127-101010-002-dance"
    kept.mkdir()
    JobRunner(tmp_path, device="cpu").close()
    assert not stale.exists() and running.is_dir() and kept.is_dir()


def test_ticking_published_on_loaded_models_changes_the_detector():
    """`auto` means DWPose under the published sampling: the detector loaded for the last job is let go."""
    from svd_animate.animate import Animator
    from svd_animate.config import load_preset, with_published_sampling

    config = load_preset("tiny")
    animator = Animator(config, RunSettings(device="cpu"))
    animator._detector = object()  # as if MediaPipe had been loaded by `auto`
    animator.reconfigure(config.replace(seed=3))
    assert animator._detector is not None  # same detector: kept
    animator.reconfigure(with_published_sampling(config))
    assert animator._detector is None
    with pytest.raises(InputError, match="^dtype: fixed while the models are loaded$"):
        animator.reconfigure(config.replace(dtype="bf16"))


@pytest.mark.realdata
def test_fps_picks_the_stride_once_for_both_steps(runner, shared_data, caplog):
    """A 29 fps clip at `fps 14.5` keeps every 2nd frame (the stride box is overridden, as on the CLI); a clip
    slower than the target says so once, not once per step of the job."""
    job = runner.poses(shared_data / REF, shared_data / CLIP, {**TINY, "fps": 14.5, "stride": 9})
    assert job.fps == pytest.approx(29 / 2)
    caplog.clear()
    runner.poses(shared_data / REF, shared_data / CLIP, {**TINY, "fps": 60})
    assert sum("slower than --fps" in r.getMessage() for r in caplog.records) == 1


def visitor(name):
    return SimpleNamespace(session_hash=name)


def test_a_job_keeps_the_choice_its_inputs_showed_when_clicked(page):
    """Ticking fast while a job waits in the queue does not change that job (the CLI's `--steps 10`)."""
    names = [o.name for o in page.options]
    raw = shown_inputs(page)
    raw[names.index("steps")] = 10
    _, job_id = page.arm(("tiny", False, False), visitor("a"))
    taken = {}
    data = {page.job_box: job_id, page.choice_state: ("tiny", True, False), page.reference_input: "r.png",
            page.video_input: "v.mp4", **dict(zip(page.option_inputs, raw))}
    job, error = page._job(lambda ref, video, values, progress, flag: taken.update(values) or "done", data,
                           lambda *a, **k: None)
    assert (job, error) == ("done", None)
    config = page.runner.config(taken)
    assert config.steps == 10 and not config.fast_sampling
    assert taken["published_sampling"] is None  # unticked: not given, like the flag left out
    assert page._jobs == {}  # the finished job's entry is gone


def test_cancel_reaches_only_the_visitors_jobs_and_forget_clears_them(page):
    _, first = page.arm(("tiny", False, False), visitor("a"))
    _, second = page.arm(("tiny", False, False), visitor("a"))
    _, other = page.arm(("tiny", False, False), visitor("b"))
    assert page.cancel(visitor("a")) == "Cancelling..."
    flags = {job_id: flag.cancelled for job_id, (_, flag, _) in page._jobs.items()}
    assert flags == {first: True, second: True, other: False}
    page.forget(visitor("a"))
    page.forget(visitor("b"))
    assert page._jobs == {} and page.cancel(visitor("a")) == "Nothing to cancel."
