import subprocess
import tracemalloc

import av
import numpy as np
import pytest

from svd_common.errors import InputError
from svd_common.video import VideoWriter, check_writable, iter_frames, probe_video, read_image
from tests.helpers import square_frames, write_clip


@pytest.fixture
def clip(tmp_path):
    return write_clip(tmp_path / "squares.mp4", square_frames(12), fps=10)


def _square_x(frame):
    columns = np.flatnonzero(frame[..., 0].max(axis=0) > 128)
    return int(columns[0]) if len(columns) else None


def test_probe(clip):
    info = probe_video(clip)
    assert (info.width, info.height, info.fps, info.num_frames, info.rotation) == (64, 48, 10.0, 12, 0)


def test_all_frames_in_order(clip):
    frames = list(iter_frames(clip))
    assert [i for i, _ in frames] == list(range(12))
    assert frames[0][1].shape == (48, 64, 3) and frames[0][1].dtype == np.uint8
    assert [_square_x(f) for _, f in frames] == pytest.approx([4 + 2 * t for t in range(12)], abs=1)


def test_stride_max_frames_and_time_range(clip):
    assert [i for i, _ in iter_frames(clip, stride=3)] == [0, 3, 6, 9]
    assert [i for i, _ in iter_frames(clip, stride=2, max_frames=3)] == [0, 2, 4]
    picked = list(iter_frames(clip, start=0.5, end=0.9))
    assert [i for i, _ in picked] == [5, 6, 7, 8]
    assert _square_x(picked[0][1]) == pytest.approx(14, abs=1)  # really frame 5, after the seek


def test_frames_are_streamed_not_accumulated(tmp_path):
    clip = write_clip(tmp_path / "long.mp4", square_frames(120, 96, 128), fps=30)
    frame_bytes = 96 * 128 * 3
    tracemalloc.start()
    count = sum(1 for _ in iter_frames(clip))
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert count == 120
    assert peak < 20 * frame_bytes  # a handful of frames alive at a time, not 120


def test_rotation_metadata_is_honoured(clip, tmp_path):
    imageio_ffmpeg = pytest.importorskip("imageio_ffmpeg")
    rotated = tmp_path / "rotated.mp4"
    subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-v", "error", "-display_rotation", "90", "-i", str(clip),
                    "-c", "copy", str(rotated)], check=True)
    info = probe_video(rotated)
    assert (info.width, info.height, info.rotation) == (48, 64, 90)
    _, upright = next(iter_frames(clip))
    _, frame = next(iter_frames(rotated))
    assert frame.shape == (64, 48, 3)
    # 90 degrees counter-clockwise: the square near the left edge ends up near the bottom.
    np.testing.assert_array_equal(frame, np.rot90(upright, 1))


def test_missing_file(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        list(iter_frames(tmp_path / "nope.mp4"))


def test_not_a_video(tmp_path):
    path = tmp_path / "notes.mp4"
    path.write_text("hello, this is text")
    with pytest.raises(InputError, match="not a readable video"):
        list(iter_frames(path))
    with pytest.raises(InputError, match="not a readable video"):
        probe_video(path)


def test_truncated_video(tmp_path):
    clip = write_clip(tmp_path / "full.mp4", square_frames(30), fps=10)
    data = clip.read_bytes()
    truncated = tmp_path / "truncated.mp4"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="truncated|not a readable video|no frames"):
        list(iter_frames(truncated))


def test_video_without_frames(tmp_path):
    path = tmp_path / "empty.mkv"  # Matroska keeps the track header with no frames
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.width, stream.height = 64, 48
        container.start_encoding()
        for packet in stream.encode():
            container.mux(packet)
    assert path.stat().st_size > 0
    with pytest.raises(InputError, match="no frames"):
        list(iter_frames(path))


def test_empty_time_range(clip):
    with pytest.raises(InputError, match="no frames between 5.0s and 6.0s"):
        list(iter_frames(clip, start=5.0, end=6.0))


def test_bad_options(clip):
    with pytest.raises(InputError, match="--stride"):
        list(iter_frames(clip, stride=0))
    with pytest.raises(InputError, match="invalid time range"):
        list(iter_frames(clip, start=2, end=1))


def test_read_image_errors(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        read_image(tmp_path / "none.png")
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(InputError, match="not a readable image"):
        read_image(bad)


def test_writer_is_atomic(tmp_path):
    target = tmp_path / "out.mp4"
    target.write_bytes(b"previous result")
    with pytest.raises(RuntimeError):
        with VideoWriter(target, fps=10) as writer:
            for frame in square_frames(3):
                writer.write(frame)
            raise RuntimeError("killed mid-way")
    assert target.read_bytes() == b"previous result"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.mp4"]

    with VideoWriter(target, fps=10) as writer:
        for frame in square_frames(5):
            writer.write(frame)
    info = probe_video(target)
    assert (info.width, info.height, info.num_frames) == (64, 48, 5)


def test_check_writable(tmp_path):
    assert check_writable(tmp_path / "ok.npz") == tmp_path / "ok.npz"
    with pytest.raises(InputError, match="does not exist"):
        check_writable(tmp_path / "missing" / "out.npz")
    with pytest.raises(InputError, match="is a folder"):
        check_writable(tmp_path)
    with pytest.raises(InputError, match="not writable"):
        check_writable("/proc/out.npz")
    assert list(tmp_path.iterdir()) == []  # the probe leaves nothing behind


def test_a_killed_runs_part_file_is_removed_by_the_next_writer(tmp_path):
    """kill -9 leaves `.out.XXXX.part.mp4`; the next writer of out.mp4 removes it once nobody has touched it
    for 10 minutes (a part file being written now is kept)."""
    import os
    import time

    stale, live, other = tmp_path / ".out.abc.part.mp4", tmp_path / ".out.def.part.mp4", tmp_path / ".b.x.part.mp4"
    for path in (stale, live, other):
        path.write_bytes(b"")
    hour_ago = time.time() - 3600
    os.utime(stale, (hour_ago, hour_ago))
    os.utime(other, (hour_ago, hour_ago))
    with VideoWriter(tmp_path / "out.mp4", fps=5) as writer:
        writer.write(np.zeros((16, 16, 3), np.uint8))
    assert not stale.exists() and live.exists() and other.exists()
    assert (tmp_path / "out.mp4").is_file()


def test_transparent_reference_is_composited_over_white(tmp_path):
    """RGBA red at alpha 0, 128, 255: white; 255 * 128/255 + 255 * 127/255 = 255 red and 255 * 127/255 = 127
    green and blue; red. The same pixels without alpha read unchanged."""
    from PIL import Image

    rgba = np.zeros((2, 3, 4), np.uint8)
    rgba[..., 0] = 255
    rgba[0, :, 3] = (0, 128, 255)
    rgba[1, :, 3] = 255
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    image = read_image(tmp_path / "a.png")
    assert image[0, 0].tolist() == [255, 255, 255]
    assert image[0, 1].tolist() == [255, 127, 127]
    assert image[0, 2].tolist() == [255, 0, 0] and image[1].tolist() == [[255, 0, 0]] * 3
    assert read_image(tmp_path / "a.png", transparency=False)[0, 0].tolist() == [255, 0, 0]  # as published
    Image.fromarray(rgba[..., :3]).save(tmp_path / "b.png")
    assert read_image(tmp_path / "b.png").tolist() == rgba[..., :3].tolist()
