import re

import av
import numpy as np
import pytest

import cli
from pose.errors import InputError
from pose.skeleton import PoseSequence
from svd_controlnext.animate import cover_crop, crop_poses
from svd_controlnext.config import AnimateConfig, load_preset
from tests.helpers import make_pose


def test_presets_and_overrides():
    tiny = load_preset("tiny")
    assert (tiny.base_model, tiny.width, tiny.height, tiny.steps) == ("tiny", 64, 64, 3)
    published = load_preset("controlnext-svd-v2")
    assert (published.width, published.height, published.steps, published.window, published.overlap,
            published.stride, published.min_guidance, published.max_guidance) == (576, 1024, 25, 24, 6, 2, 3.0, 3.0)
    assert published.replace(steps=5, seed=None).steps == 5  # None means "not given"
    assert AnimateConfig().fusion == "ramp"


@pytest.mark.parametrize("text, message", [
    ("steps: 3\nwindw: 8\n", "unknown preset key 'windw'"),
    ("steps: three\n", "'steps' must be int"),
    ("- a list\n", "must be a mapping"),
])
def test_bad_preset_files(tmp_path, text, message):
    path = tmp_path / "mine.yaml"
    path.write_text(text)
    with pytest.raises(InputError, match=message):
        load_preset(str(path))


def test_unknown_preset_lists_the_built_in_ones():
    with pytest.raises(InputError, match="no such preset.*controlnext-svd-v2, tiny"):
        load_preset("huge")


def test_cover_crop_and_pose_mapping_hand_computed():
    # 1200x2140 onto 576x1024: scale = max(0.48, 0.4785) = 0.48 -> 576x1027, 1 px off the top.
    assert cover_crop(1200, 2140, 576, 1024) == (0.48, 0, 1)
    seq = PoseSequence.stack([make_pose({0: (0.5, 0.5), 1: (0.0, 1.0)})], 1200, 2140, fps=10)
    out = crop_poses(seq, 576, 1024)
    np.testing.assert_allclose(out.body[0, 0], [0.5, (0.5 * 2140 * 0.48 - 1) / 1024], atol=1e-6)
    np.testing.assert_allclose(out.body[0, 1], [0.0, (2140 * 0.48 - 1) / 1024], atol=1e-6)
    assert (out.width, out.height) == (576, 1024)


def run(capsys, *args):
    code = cli.main(["-q", *map(str, args)])
    out, err = capsys.readouterr()
    return code, out, err


def test_default_command_on_the_tiny_preset(shared_data, tmp_path, capsys):
    out = tmp_path / "anim.mp4"
    code, stdout, _ = run(capsys, "--ref", shared_data / "ref_controlnext_v2_01.jpeg", "--pose",
                          shared_data / "driving_controlnext_v2_01.mp4", "--preset", "tiny", "--max-frames", "6",
                          "--side-by-side", "-o", out, "--cache-dir", tmp_path / "cache")
    assert code == 0 and "6 frames at 7.25 fps" in stdout and "RANDOM WEIGHTS" in stdout
    with av.open(str(out)) as container:
        stream = container.streams.video[0]
        frames = list(container.decode(stream))
        assert len(frames) == 6 and float(stream.average_rate) == pytest.approx(29 / 4)
    assert (frames[0].width, frames[0].height) == (128, 64)  # skeleton | result
    skeleton = frames[0].to_ndarray(format="rgb24")[:, :64]
    assert skeleton.max() > 100  # the skeleton panel shows a drawn pose


def test_poses_npz_as_input(shared_data, tmp_path, capsys):
    poses = tmp_path / "poses.npz"
    assert cli.main(["-q", "pose", "--video", str(shared_data / "driving_controlnext_v2_02.mp4"), "--ref",
                     str(shared_data / "ref_mimicmotion_demo1.jpg"), "--max-frames", "5", "-o", str(poses),
                     "--cache-dir", str(tmp_path / "cache")]) == 0
    capsys.readouterr()
    code, stdout, _ = run(capsys, "animate", "--ref", shared_data / "ref_mimicmotion_demo1.jpg", "--pose", poses,
                          "--preset", "tiny", "-o", tmp_path / "anim.mp4")
    assert code == 0 and "5 frames" in stdout


@pytest.fixture
def inputs(tmp_path):
    import cv2

    ref = tmp_path / "ref.png"
    cv2.imwrite(str(ref), np.full((64, 64, 3), 128, np.uint8))
    poses = tmp_path / "poses.npz"
    PoseSequence.stack([make_pose({0: (0.5, 0.3), 1: (0.5, 0.4)})] * 3, 64, 64, fps=5).save(poses)
    other = tmp_path / "other.npz"
    np.savez(other, frames=np.zeros((3, 18, 2)))
    return {"ref": ref, "poses": poses, "other": other, "missing": tmp_path / "none.png"}


@pytest.mark.parametrize("ref, pose, extra, message", [
    ("missing", "poses", [], "none.png: no such file"),
    ("ref", "other", [], "not an svd-animate pose file"),
    ("ref", "poses", ["--width", "70"], "multiples of 64"),
    ("ref", "ref", [], "is an image; --pose takes a driving video or a poses .npz"),
    ("ref", "poses", ["--preset", "nope"], "no such preset"),
])
def test_bad_input_one_line(inputs, tmp_path, capsys, ref, pose, extra, message):
    out = tmp_path / "out.mp4"
    out.write_bytes(b"earlier result")
    code, _, stderr = run(capsys, "--ref", inputs[ref], "--pose", inputs[pose], "--preset", "tiny", *extra,
                          "-o", out)
    lines = stderr.strip().splitlines()
    assert code == 2 and len(lines) == 1 and re.search(message, lines[0]), stderr
    assert out.read_bytes() == b"earlier result"


def test_no_weights_reachable_points_to_tiny(inputs, tmp_path, capsys, monkeypatch):
    import huggingface_hub

    def offline(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    code, _, stderr = run(capsys, "--ref", inputs["ref"], "--pose", inputs["poses"], "--width", "64", "--height",
                          "64", "-o", tmp_path / "out.mp4")
    assert code == 2 and "try --preset tiny" in stderr and len(stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out.mp4").exists()
