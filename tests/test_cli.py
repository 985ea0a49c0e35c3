import subprocess
import sys

import av
import numpy as np
import pytest

from pose.skeleton import PoseSequence
from svd_animate import cli
from tests.helpers import square_frames, write_clip

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]


def run(capsys, *args):
    code = cli.main(["-q", "pose", *map(str, args)])
    out, err = capsys.readouterr()
    return code, out, err


def count_frames(path):
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = list(container.decode(stream))
    return len(frames), frames[0].width, frames[0].height


def test_pose_command_on_real_clip(shared_data, tmp_path, capsys):
    out, preview = tmp_path / "poses.npz", tmp_path / "preview.mp4"
    code, stdout, _ = run(capsys, "--video", shared_data / "driving_controlnext_v2_01.mp4", "--ref",
                          shared_data / "ref_controlnext_v2_01.jpeg", "--stride", "2", "--max-frames", "12",
                          "-o", out, "--preview", preview, "--cache-dir", tmp_path / "cache")
    assert code == 0
    assert "12 frames" in stdout and "from mediapipe" in stdout and "align ls" in stdout
    poses = PoseSequence.load(out)
    assert len(poses) == 12 and (poses.width, poses.height) == (1200, 2140)  # the reference's frame
    assert poses.meta["align"]["method"] == "ls" and poses.frame_index.tolist() == list(range(0, 24, 2))
    frames, width, height = count_frames(preview)
    assert frames == 12 and height == 640
    # three panels 640 high: the 576x1024 source (360 wide), the skeleton and the skeleton over the reference,
    # both in the reference's 1200x2140 frame (round(1200 * 640 / 2140) = 359 wide)
    assert width == 360 + 2 * 359
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "poses.npz", "preview.mp4"]

    # Second run: poses from the cache, bone alignment, no preview.
    code, stdout, _ = run(capsys, "--video", shared_data / "driving_controlnext_v2_01.mp4", "--ref",
                          shared_data / "ref_controlnext_v2_01.jpeg", "--stride", "2", "--max-frames", "12",
                          "--align", "bones", "-o", out, "--cache-dir", tmp_path / "cache")
    assert code == 0 and "from cache" in stdout and "align bones" in stdout
    assert PoseSequence.load(out).meta["align"]["method"] == "bones"


def test_pose_without_reference_keeps_driving_frame(shared_data, tmp_path, capsys):
    out = tmp_path / "poses.npz"
    code, stdout, _ = run(capsys, "--video", shared_data / "driving_controlnext_v2_02.mp4", "--max-frames", "3",
                          "--detector", "mediapipe", "--no-cache", "-o", out)
    assert code == 0 and "align none" in stdout
    poses = PoseSequence.load(out)
    assert (poses.width, poses.height, len(poses)) == (576, 1024, 3)


@pytest.fixture
def clips(tmp_path):
    good = write_clip(tmp_path / "nobody.mp4", square_frames(6, missing=set(range(6))), fps=10)
    text = tmp_path / "notes.mp4"
    text.write_text("not a video")
    full = write_clip(tmp_path / "full.mp4", square_frames(30), fps=10)
    truncated = tmp_path / "truncated.mp4"
    truncated.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    empty = tmp_path / "empty.mkv"
    with av.open(str(empty), mode="w") as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.width, stream.height = 64, 48
        container.start_encoding()
    black = tmp_path / "black.png"
    import cv2

    cv2.imwrite(str(black), np.zeros((64, 48, 3), np.uint8))
    return {"nobody": good, "text": text, "truncated": truncated, "empty": empty, "black": black}


@pytest.mark.parametrize("case, extra, message", [
    ("missing", [], "no such file"),
    ("text", [], "not a readable video"),
    ("black", [], "is an image; --video takes a driving video"),
    ("truncated", [], "truncated|not a readable video|no frames"),
    ("empty", [], "has no frames"),
    ("nobody", [], "no person was found in any of its 6 frames"),
    ("nobody", ["--ref", "{black}"], "no person found in the reference image.*--align none"),
    ("nobody", ["--ref", "{text}"], "not a readable image"),
    ("nobody", ["--align", "ls"], "--align ls needs --ref"),
    ("nobody", ["--start", "2", "--end", "1"], r"end \(1s\) must come after start \(2s\)"),
])
def test_bad_input_one_line_no_output(clips, tmp_path, capsys, case, extra, message):
    video = clips.get(case, tmp_path / "missing.mp4")
    out = tmp_path / "poses.npz"
    out.write_bytes(b"earlier result")
    extra = [e.format(**clips) for e in extra]
    code, stdout, stderr = run(capsys, "--video", video, *extra, "-o", out, "--preview", tmp_path / "p.mp4")
    assert code == 2
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("svd-animate: error: ")
    import re

    assert re.search(message, lines[0]), lines[0]
    assert out.read_bytes() == b"earlier result"  # nothing overwritten
    assert not (tmp_path / "p.mp4").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary files


@pytest.mark.parametrize("output, message", [
    ("{tmp}/missing/poses.npz", "folder .* does not exist"),
    ("/proc/poses.npz", "not writable"),
    ("{tmp}", "is a folder"),
])
def test_unwritable_output(clips, tmp_path, capsys, output, message):
    code, _, stderr = run(capsys, "--video", clips["nobody"], "-o", output.format(tmp=tmp_path))
    assert code == 2
    import re

    assert re.search(message, stderr.strip()) and len(stderr.strip().splitlines()) == 1


def test_console_script_exits_non_zero_without_traceback(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "cli.py"), "pose", "--video", str(tmp_path / "x.mp4"),
                             "-o", str(tmp_path / "x.npz")], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 2
    assert result.stderr.strip() == f"svd-animate: error: {tmp_path / 'x.mp4'}: no such file"


def test_nobody_in_the_reference_is_one_line_with_mediapipe(tmp_path):
    """MediaPipe's C++ logging (TFLite delegate, inference_feedback_manager warnings) is filtered out, so the
    error is the only line on stderr, without -q."""
    import cv2

    from tests.helpers import square_frames, write_clip

    cv2.imwrite(str(tmp_path / "blank.png"), np.full((64, 64, 3), 128, np.uint8))
    video = write_clip(tmp_path / "clip.mp4", square_frames(4))
    result = subprocess.run([sys.executable, str(ROOT / "cli.py"), "pose", "--video", str(video), "--ref",
                             str(tmp_path / "blank.png"), "--detector", "mediapipe", "-o", str(tmp_path / "p.npz")],
                            capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [f"svd-animate: error: {tmp_path / 'blank.png'}: no person found in the "
                                          "reference image; stylised characters often defeat pose detectors: use "
                                          "--align none to skip alignment"]


def test_help_lists_the_options(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["pose", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for option in ("--video", "--ref", "--detector", "--align", "--stride", "--max-frames", "--preview",
                   "--no-cache", "--cache-dir", "--dwpose-dir"):
        assert option in text


@pytest.mark.parametrize("args, message", [
    (["--ref", "r.png", "--pose", "p.mp4", "--fusion", "cosine"],
     "argument --fusion: invalid choice: 'cosine' (choose from 'ramp', 'uniform')"),
    (["--ref", "r.png", "--pose", "p.mp4", "--steps", "abc"], "argument --steps: invalid int value: 'abc'"),
    (["pose", "--video", "v.mp4", "-o", "p.npz", "--stride", "two"], "argument --stride: must be an integer, got 'two'"),
    (["pose", "--video", "v.mp4", "-o", "p.npz", "--stride", "0"], "argument --stride: must be at least 1, got 0"),
])
def test_option_errors_are_one_line_without_the_usage_block(capsys, args, message):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(args)
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == f"svd-animate: error: {message}\n"
