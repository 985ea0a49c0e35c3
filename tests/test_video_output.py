"""What VideoWriter writes: the container the file name's extension names, and the same bytes for the same frames.

glibc's M_PERTURB fills every malloc'd block with a chosen byte: two encodes under different bytes differ
exactly when the encoder reads memory nobody wrote (x264's AVX-512 mbtree path, see `_encoder_options`).
"""

import ctypes
import logging
import platform

import av
import numpy as np
import pytest

from svd_common.errors import InputError
from svd_common.video import VIDEO_OUTPUT_SUFFIXES, AudioClip, VideoWriter, check_output_container, remove_stale_parts
from tests.helpers import read_audio, square_frames, write_clip

M_PERTURB = -6  # glibc mallopt parameter


def _glibc():
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if platform.system() == "Linux" and libc.mallopt(M_PERTURB, 0) == 1 else None
    except OSError:
        return None


def _noise_frames(width, height, count=16):
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    return [np.roll(base, 2 * t, axis=1) // 2 + rng.integers(0, 128, (height, width, 3), dtype=np.uint8)
            for t in range(count)]


def _smooth_frames(count=6, height=48, width=64):
    """A colour gradient with a yellow square moving right by 4 px per frame: a frame out of place or
    repeated is far off on average, while lossy coding stays close."""
    y, x = np.mgrid[0:height, 0:width]
    frames = []
    for t in range(count):
        frame = np.stack([x * 3, y * 4, np.full_like(x, 100)], axis=-1).astype(np.uint8)
        frame[16:32, 8 + 4 * t:24 + 4 * t] = (250, 240, 20)
        frames.append(frame)
    return frames


@pytest.fixture(scope="module")
def tone(tmp_path_factory):
    """One second of a 440 Hz tone (16 kHz mono AAC) under 10 frames."""
    return write_clip(tmp_path_factory.mktemp("tone") / "tone.mp4", square_frames(10), fps=10, tone_hz=440)


def _write(path, frames, fps=8, audio=None):
    with VideoWriter(path, fps=fps, audio=audio) as writer:
        for frame in frames:
            writer.write(frame)
    return path


def test_all_five_containers_are_available():
    """PyPI's PyAV wheels carry every encoder needed; a build without one would silently lose an extension."""
    assert VIDEO_OUTPUT_SUFFIXES == (".mp4", ".mov", ".mkv", ".webm", ".gif")
    assert {"libx264", "libvpx-vp9", "libopus", "aac", "gif"} <= av.codecs_available


# extension: demuxer name, a marker in the first bytes (mp4 and mov, mkv and webm share a demuxer), video and
# audio codecs, and the allowed mean / max pixel error (a GIF palette is exact for the square and coarse for the
# gradient; H.264 and VP9 ring around the square's edges).
CONTAINERS = {
    ".mp4": ("mov,mp4,m4a,3gp,3g2,mj2", b"ftypisom", "h264", "aac", 4, 60),
    ".mov": ("mov,mp4,m4a,3gp,3g2,mj2", b"ftypqt  ", "h264", "aac", 4, 60),
    ".mkv": ("matroska,webm", b"matroska", "h264", "aac", 4, 60),
    ".webm": ("matroska,webm", b"webm", "vp9", "opus", 4, 60),
    ".gif": ("gif", b"GIF89a", "gif", None, 3, 24),
}


@pytest.mark.parametrize("suffix", CONTAINERS)
def test_the_extension_names_the_container(tmp_path, tone, suffix, caplog):
    demuxer, marker, video_codec, audio_codec, mean_error, max_error = CONTAINERS[suffix]
    frames = _smooth_frames()
    with caplog.at_level(logging.WARNING, logger="svd_common.video"):
        with VideoWriter(tmp_path / f"out{suffix}", fps=8, audio=AudioClip(tone, 0.0, 0.75)) as writer:
            for frame in frames:
                writer.write(frame)
            assert (writer.audio is None) == (audio_codec is None)
            # the temporary file keeps the extension (its container), and the name a killed run's cleanup looks for
            assert [p.name.endswith(f".part{suffix}") for p in tmp_path.iterdir()] == [True]
    path = tmp_path / f"out{suffix}"
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]
    assert marker in path.read_bytes()[:64]
    with av.open(str(path)) as container:
        assert container.format.name == demuxer
        stream = container.streams.video[0]
        assert (stream.codec_context.name, stream.width, stream.height) == (video_codec, 64, 48)
        decoded = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(stream)]).astype(int)
        audio = [s.codec_context.name for s in container.streams.audio]
    assert decoded.shape == (6, 48, 64, 3)
    error = np.abs(decoded - np.stack(frames))
    assert error.mean() < mean_error and error.max() <= max_error
    if audio_codec is None:
        assert audio == [] and "the audio is left out (no sound in GIF)" in caplog.text
        return
    assert audio == [audio_codec] and not caplog.records
    samples, rate = read_audio(path)
    assert abs(len(samples) / rate - 0.75) < 0.05
    middle = samples[int(0.1 * rate):int(0.6 * rate)]
    assert abs(np.argmax(np.abs(np.fft.rfft(middle))) * rate / len(middle) - 440) < 10


@pytest.mark.parametrize("name, message", [
    ("out.avi", "out.avi: cannot write .avi videos; end the name with .mp4, .mov, .mkv, .webm or .gif"),
    ("out.txt", "out.txt: cannot write .txt videos; end the name with .mp4, .mov, .mkv, .webm or .gif"),
    ("out", "out: no extension to choose the video format from; end the name with .mp4, .mov, .mkv, .webm or .gif"),
])
def test_other_extensions_are_refused_in_one_line(tmp_path, name, message):
    with pytest.raises(InputError) as refused:
        check_output_container(name)
    assert str(refused.value) == message
    with pytest.raises(InputError, match="cannot write|no extension"):
        VideoWriter(tmp_path / name, fps=8)
    assert list(tmp_path.iterdir()) == []  # refused before any file is made
    check_output_container(tmp_path / "OUT.MP4")  # the case of the extension does not matter


def test_gif_keeps_odd_sizes(tmp_path):
    """A GIF has no half-resolution colour, so unlike H.264 it needs no even width and height."""
    frame = np.zeros((33, 47, 3), np.uint8)
    frame[10:20, 10:20] = 255
    path = _write(tmp_path / "odd.gif", [frame] * 3)
    with av.open(str(path)) as container:
        decoded = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(decoded) == 3 and all(np.array_equal(d, frame) for d in decoded)  # two colours: exact


def test_a_killed_runs_part_file_is_removed_whatever_the_container(tmp_path):
    import os
    import time

    stale_gif, stale_mp4 = tmp_path / ".out.abc.part.gif", tmp_path / ".out.def.part.mp4"
    for path in (stale_gif, stale_mp4):
        path.write_bytes(b"")
        os.utime(path, (time.time() - 3600,) * 2)
    assert remove_stale_parts(tmp_path / "out.gif") == [stale_gif]  # the mp4 writer's own is left to it
    assert stale_mp4.exists()


@pytest.mark.skipif(_glibc() is None, reason="needs glibc's mallopt(M_PERTURB)")
@pytest.mark.parametrize("name, width", [("out.mp4", 64), ("out.mp4", 192), ("out.mov", 64), ("out.mkv", 64),
                                         ("out.webm", 64), ("out.gif", 64)])  # 4 and 12 macroblocks wide
def test_same_frames_same_file_whatever_the_heap_holds(tmp_path, tone, name, width):
    libc, frames = _glibc(), _noise_frames(width, 64)
    outputs = []
    for fill in (0x01, 0xFE):
        libc.mallopt(M_PERTURB, fill)
        try:
            _write(tmp_path / name, frames, audio=AudioClip(tone, 0.0, 1.0))
        finally:
            libc.mallopt(M_PERTURB, 0)
        outputs.append((tmp_path / name).read_bytes())
    assert outputs[0] == outputs[1]


def test_x264_runs_without_mbtree(tmp_path):
    """Runs on any CPU: x264 writes its settings into the stream (SEI), and the AVX-512 path the test above
    catches is only reached with mbtree on."""
    data = _write(tmp_path / "out.mp4", _noise_frames(64, 64, count=3)).read_bytes()
    assert b"x264 - core" in data and b"mbtree=0" in data
