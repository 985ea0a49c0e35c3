import re

import av
import numpy as np
import pytest
import torch

from pose.skeleton import PoseSequence
from svd_animate import cli
from svd_animate.config import AnimateConfig, load_preset
from svd_animate.framing import cover_crop, crop_poses
from svd_animate.run import RunSettings
from svd_common.errors import InputError
from tests.helpers import make_pose


def test_presets_and_overrides():
    tiny = load_preset("tiny")
    assert (tiny.base_model, tiny.width, tiny.height, tiny.steps) == ("tiny", 64, 64, 3)
    published = load_preset("controlnext-svd-v2")
    assert (published.width, published.height, published.steps, published.window, published.overlap,
            published.stride, published.min_guidance, published.max_guidance) == (576, 1024, 25, 24, 6, 2, 3.0, 3.0)
    assert published.replace(steps=5, seed=None).steps == 5  # None means "not given"


def test_unknown_preset_lists_the_built_in_ones():
    with pytest.raises(InputError, match="no such preset.*controlnext-svd-v2, fast, tiny"):
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


def test_too_long_for_memory_refused_before_any_pose_is_extracted(shared_data, tmp_path, capsys, monkeypatch):
    import svd_animate.animate
    from svd_animate import memory

    monkeypatch.setattr(memory, "free_memory", lambda device: (2 * 30 * 64 * 64 * 3, 0))  # room for ~25 frames
    monkeypatch.setattr(svd_animate.animate, "load_detector", lambda *a, **k: pytest.fail("poses were extracted"))
    out = tmp_path / "out.mp4"
    code, _, stderr = run(capsys, "--ref", shared_data / "ref_controlnext_v2_01.jpeg", "--pose",
                          shared_data / "driving_controlnext_v2_01.mp4", "--preset", "tiny", "--max-frames", "100",
                          "--stride", "1", "-o", out)
    assert code == 2 and len(stderr.strip().splitlines()) == 1
    assert "100 frames at 64x64" in stderr and "use --max-frames 2" in stderr
    assert not out.exists()


def test_out_of_memory_while_sampling_is_one_line_and_writes_nothing(inputs, tmp_path, capsys, monkeypatch):
    import torch

    from svd_controlnext.pipeline import ControlNeXtSVDPipeline

    def out_of_memory(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(ControlNeXtSVDPipeline, "__call__", out_of_memory)
    out = tmp_path / "out.mp4"
    out.write_bytes(b"earlier result")
    code, _, stderr = run(capsys, "--ref", inputs["ref"], "--pose", inputs["poses"], "--preset", "tiny", "-o", out)
    assert code == 2 and len(stderr.strip().splitlines()) == 1
    assert "out of memory on cpu at 64x64 with windows of 8 frames: try --offload model" in stderr
    assert out.read_bytes() == b"earlier result" and sorted(p.name for p in tmp_path.iterdir()) == [
        "other.npz", "out.mp4", "poses.npz", "ref.png"]


def test_prepend_reference_pose_hand_built():
    from svd_animate.animate import prepend_pose

    driving = PoseSequence.stack([make_pose({0: (0.5, 0.3)}), make_pose({0: (0.6, 0.3)})], 64, 64, fps=5,
                                 frame_index=[4, 6])
    ref = PoseSequence.stack([make_pose({0: (0.1, 0.2)})], 64, 64, fps=1)
    both = prepend_pose(driving, ref)
    assert len(both) == 3 and both.frame_index.tolist() == [-1, 4, 6] and both.filled.tolist() == [False] * 3
    np.testing.assert_allclose(both.body[:, 0], [[0.1, 0.2], [0.5, 0.3], [0.6, 0.3]])
    with pytest.raises(InputError, match="not aligned to this reference"):
        prepend_pose(driving, ref.replace(width=128))


def test_audio_span_hand_computed(tmp_path):
    from svd_animate.animate import audio_for
    from tests.helpers import square_frames, write_clip

    clip = write_clip(tmp_path / "a.mp4", square_frames(30), fps=10, tone_hz=440)
    poses = PoseSequence.stack([make_pose({0: (0.5, 0.3)})] * 3, 64, 48, fps=5, frame_index=[10, 12, 14],
                               meta={"source_fps": 10.0, "stride": 2})
    span = audio_for(clip, poses)
    assert (span.start, span.duration, span.delay) == (1.0, 0.6, 0.0)  # frames 10..15 at 10 fps
    with_reference = poses.replace(frame_index=np.array([-1, 10, 12]))
    assert audio_for(clip, with_reference).delay == pytest.approx(0.2)  # one output frame at 5 fps
    silent = write_clip(tmp_path / "b.mp4", square_frames(30), fps=10)
    assert audio_for(silent, poses) is None and audio_for(tmp_path / "p.npz", poses) is None


@pytest.fixture(scope="module")
def clip_with_audio(tmp_path_factory):
    """Twelve frames of a real driving clip at 144x256 with a 440 Hz tone, 29 fps."""
    from svd_common.video import iter_frames
    from tests.helpers import SHARED_DATA, write_clip

    source = SHARED_DATA / "driving_controlnext_v2_01.mp4"
    if not source.is_file():
        pytest.skip(f"{source} not found (../shared/data is not beside this checkout)")
    import cv2

    frames = [cv2.resize(rgb, (144, 256), interpolation=cv2.INTER_AREA) for _, rgb in iter_frames(source, 1, 12)]
    return write_clip(tmp_path_factory.mktemp("clip") / "dance.mp4", frames, fps=29, tone_hz=440)


def test_output_keeps_the_audio_and_the_reference_pose_first_adds_a_silent_frame(
        shared_data, clip_with_audio, tmp_path, capsys):
    from tests.helpers import read_audio

    preset = tmp_path / "tiny-reference-first.yaml"
    preset.write_text((cli.Path(__file__).parents[1] / "configs" / "tiny.yaml").read_text()
                      + "prepend_reference_pose: true\nreference_pose_in_every_window: true\n")
    out = tmp_path / "anim.mp4"
    code, stdout, _ = run(capsys, "--ref", shared_data / "ref_controlnext_v2_01.jpeg", "--pose", clip_with_audio,
                          "--preset", preset, "--stride", "2", "--max-frames", "6",
                          "-o", out, "--cache-dir", tmp_path / "cache")
    assert code == 0 and "6 frames at 14.5 fps, with the driving clip's audio" in stdout  # 5 + the reference pose
    samples, rate = read_audio(out)
    expected = 6 / 14.5  # one frame of silence, then 10 source frames at 29 fps
    assert abs(len(samples) / rate - expected) < 0.08
    assert abs(samples[: int(0.05 * rate)]).max() < 0.05  # the reference frame is silent
    tone = samples[int(0.1 * rate): int(0.35 * rate)]
    peak_hz = np.argmax(np.abs(np.fft.rfft(tone))) * rate / len(tone)
    assert abs(peak_hz - 440) < 10

    code, stdout, _ = run(capsys, "--ref", shared_data / "ref_controlnext_v2_01.jpeg", "--pose", clip_with_audio,
                          "--preset", "tiny", "--stride", "2", "--max-frames", "5", "--no-audio",
                          "-o", out, "--cache-dir", tmp_path / "cache")
    assert code == 0 and "5 frames at 14.5 fps" in stdout and "driving clip's audio" not in stdout
    with av.open(str(out)) as container:
        assert not container.streams.audio


def test_published_sampling_end_to_end(shared_data, clip_with_audio, tmp_path, capsys):
    """Frame count includes the reference pose (max 5 -> 4 driving + 1), fps floored (29 // 2), no audio;
    MediaPipe only when named."""
    out = tmp_path / "anim.mp4"
    args = ["--ref", shared_data / "ref_controlnext_v2_01.jpeg", "--pose", clip_with_audio, "--preset", "tiny",
            "--stride", "2", "--max-frames", "5", "--published-sampling", "-o", out, "--cache-dir", tmp_path / "c"]
    code, _, err = run(capsys, *args)
    assert code == 2 and "--published-sampling needs DWPose" in err and not out.exists()
    assert [line for line in err.splitlines() if line.startswith("svd-animate:")] == err.splitlines()[-1:]
    code, stdout, _ = run(capsys, *args, "--detector", "mediapipe")
    assert code == 0 and "5 frames at 14 fps" in stdout and "audio" not in stdout
    with av.open(str(out)) as container:
        assert not container.streams.audio and float(container.streams.video[0].average_rate) == 14


class RecordingPipe:
    def __init__(self):
        self.calls = []

    def to(self, device):
        self.calls.append(("to", device))

    def enable_model_cpu_offload(self, device):
        self.calls.append(("model", device))

    def enable_sequential_cpu_offload(self, device):
        self.calls.append(("sequential", device))


@pytest.mark.parametrize("device, offload, expected", [
    ("cuda", "model", ("model", "cuda")),
    ("cuda:1", "sequential", ("sequential", "cuda:1")),
    ("cuda", "none", ("to", "cuda")),
    ("cpu", "model", ("to", "cpu")),  # nothing to offload to: the models stay in RAM
])
def test_offload_modes(device, offload, expected):
    from svd_animate.animate import place_pipeline

    pipe = RecordingPipe()
    place_pipeline(pipe, device, offload)
    assert pipe.calls == [expected]
    with pytest.raises(InputError, match="unknown offload mode 'gpu'"):
        place_pipeline(pipe, device, "gpu")


def test_decode_chunk_is_fixed_unless_memory_is_short(monkeypatch, caplog):
    """The same seed gives the same video: 8 frames whatever the free memory (20 or 200 GiB), fewer only when
    half of it cannot hold 8, with a warning (2 GiB: half of it at 0.26 GiB a 256x256 frame is 3)."""
    from svd_animate import animate as animate_module
    from svd_animate.animate import Animator

    animator = Animator(AnimateConfig(width=256, height=256, dtype="fp32"), RunSettings(device="cpu"))
    for free in (20 * 2**30, 200 * 2**30):
        monkeypatch.setattr(animate_module, "free_memory", lambda device, free=free: (free, 0))
        assert animator.decode_chunk(animator.config) == 8
    assert not caplog.records
    monkeypatch.setattr(animate_module, "free_memory", lambda device: (2 * 2**30, 0))
    assert animator.decode_chunk(animator.config) == 3
    assert len(caplog.records) == 1 and "the pixels differ" in caplog.records[0].getMessage()
    assert animator.decode_chunk(animator.config.replace(decode_chunk_size=5)) == 5
    assert animator.decode_chunk(animator.config.replace(low_vram=True)) == 1


def test_low_vram_chunks_the_unet_feed_forward():
    from svd_animate.animate import load_pipeline
    from svd_animate.config import TINY

    def chunk_sizes(config):
        pipe = load_pipeline(config, None, "cpu", torch.float32)
        return {getattr(m, "_chunk_size", None) for m in pipe.unet.modules() if hasattr(m, "set_chunk_feed_forward")}

    assert chunk_sizes(AnimateConfig(base_model=TINY)) == {None}
    assert chunk_sizes(AnimateConfig(base_model=TINY, low_vram=True)) == {1}


def test_each_reference_is_detected_once_for_many_jobs(inputs, tmp_path, monkeypatch):
    from svd_animate import animate as animate_module
    from svd_animate.animate import Animator

    calls = []

    def detect(path, detector, image):
        calls.append(path)
        return (PoseSequence.stack([make_pose({0: (0.5, 0.3), 1: (0.5, 0.4)})], 64, 64, fps=1),
                np.full((64, 64, 3), 128, np.uint8))

    monkeypatch.setattr(animate_module, "detect_reference", detect)
    monkeypatch.setattr(Animator, "detector", lambda self: None)
    config = load_preset("tiny").replace(prepend_reference_pose=True, steps=1)
    with Animator(config, RunSettings(progress=False)) as animator:
        results = [animator(inputs["ref"], inputs["poses"], tmp_path / name) for name in ("a.mp4", "b.mp4")]
    assert [r.frames for r in results] == [4, 4] and calls == [inputs["ref"]]  # 3 poses + the reference's


def test_seed_minus_one_draws_a_seed_and_prints_it(inputs, tmp_path, capsys, monkeypatch):
    from svd_animate import animate as animate_module

    monkeypatch.setattr(animate_module.secrets, "randbelow", lambda n: 1234)
    code, stdout, _ = run(capsys, "--ref", inputs["ref"], "--pose", inputs["poses"], "--preset", "tiny", "--steps",
                          "1", "--seed", "-1", "-o", tmp_path / "a.mp4")
    assert code == 0 and ", seed 1234" in stdout
    code, stdout, _ = run(capsys, "--ref", inputs["ref"], "--pose", inputs["poses"], "--preset", "tiny", "--steps",
                          "1", "--seed", "1234", "-o", tmp_path / "b.mp4")
    assert code == 0 and ", seed" not in stdout
    assert run(capsys, "--ref", inputs["ref"], "--pose", inputs["poses"], "--seed", "-2")[0] == 2


@pytest.mark.parametrize("source, target, stride", [(30, 7.5, 4), (29.97, 15, 2), (7.5, 7.5, 1), (7.5, 30, 1),
                                                    (25, 10, 2), (60, 8, 8)])
def test_stride_for_fps_comes_closest_and_never_invents_frames(source, target, stride):
    from svd_animate.animate import stride_for_fps

    assert stride_for_fps(source, target) == stride


def test_target_fps_keeps_a_slow_clip_at_its_own_rate(shared_data, tmp_path, capsys):
    """A 7.5 fps clip: the tiny preset's stride 4 makes it 1.875 fps; `--fps 7.5` keeps every frame."""
    from itertools import islice

    from svd_common.video import iter_frames
    from tests.helpers import write_clip

    frames = [rgb for _, rgb in islice(iter_frames(shared_data / "driving_controlnext_v2_01.mp4"), 8)]
    clip = write_clip(tmp_path / "slow.mp4", frames, fps=7.5)
    common = ["--ref", shared_data / "ref_controlnext_v2_01.jpeg", "--pose", clip, "--preset", "tiny", "--steps",
              "1", "--detector", "mediapipe", "--cache-dir", tmp_path / "cache"]
    code, stdout, _ = run(capsys, *common, "-o", tmp_path / "strided.mp4")
    assert code == 0 and "2 frames at 1.875 fps" in stdout
    code, stdout, _ = run(capsys, *common, "--fps", "7.5", "-o", tmp_path / "native.mp4")
    assert code == 0 and "8 frames at 7.5 fps" in stdout
    with av.open(str(tmp_path / "native.mp4")) as container:
        assert float(container.streams.video[0].average_rate) == pytest.approx(7.5)
    code, _, err = run(capsys, *common, "--fps", "0", "-o", tmp_path / "zero.mp4")
    assert code == 2 and err == "svd-animate: error: --fps must be at least 0.01, got 0.0\n"


def test_the_same_run_twice_gives_the_same_bytes_in_the_container_the_name_asks(inputs, tmp_path, capsys):
    """Same seed, same file, byte for byte (x264 without mbtree, bit-exact muxing); `-o x.gif` writes a GIF."""
    common = ["--ref", inputs["ref"], "--pose", inputs["poses"], "--preset", "tiny", "--steps", "2", "--seed", "7"]
    for name in ("first.mp4", "second.mp4", "clip.gif"):
        code, stdout, _ = run(capsys, *common, "-o", tmp_path / name)
        assert code == 0 and f"{name}: 3 frames at 5 fps" in stdout
    assert (tmp_path / "first.mp4").read_bytes() == (tmp_path / "second.mp4").read_bytes()
    with av.open(str(tmp_path / "clip.gif")) as container:
        assert container.format.name == "gif"
        frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]
    with av.open(str(tmp_path / "first.mp4")) as container:
        reference = [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]
    assert len(frames) == 3 and frames[0].shape == (64, 64, 3)
    # the same frames through two lossy codecs: close on average (GIF: a 256-colour palette per frame)
    assert np.abs(np.stack(frames).astype(int) - np.stack(reference)).mean() < 12
