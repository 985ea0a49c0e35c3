"""Hostile or unlucky inputs and outputs of svd_common.video: decompression bombs, truncated clips, part files of
killed writers, full disks and file size limits, folders that are files. Every failure is one line naming the path.
"""

import fnmatch
import logging
import os
import resource
import shutil
import socket
import struct
import subprocess
import sys
import textwrap
import time
import warnings
import zlib
from collections import namedtuple
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest

from svd_common.errors import InputError, ResourceError
from svd_common.video import (MAX_IMAGE_PIXELS, VideoWriter, check_free_space, check_writable,
                              estimate_video_bytes, format_bytes, host_tag, iter_frames, parse_part_name, read_image,
                              remove_stale_parts, write_error)
from tests.helpers import square_frames

ROOT = Path(__file__).resolve().parents[1]
HERE = host_tag(socket.gethostname())


# ---- decompression bombs -------------------------------------------------------------------------------------

def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _black_bilevel_png(path, width, height) -> Path:
    """A valid 1-bit greyscale PNG of `width` x `height` black pixels, built a thousand rows at a time: 40000 x
    40000 is 1.6 gigapixels (4.8 GB as RGB) in about 190 KB of file and a few MB of memory."""
    rows = bytes((1 + (width + 7) // 8) * 1000)  # each row: filter byte 0, then the packed bits
    compressor = zlib.compressobj(9)
    parts = [compressor.compress(rows) for _ in range(height // 1000)]
    parts += [compressor.compress(rows[: (1 + (width + 7) // 8) * (height % 1000)]), compressor.flush()]
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # bit depth 1, greyscale
    Path(path).write_bytes(b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header)
                           + _png_chunk(b"IDAT", b"".join(parts)) + _png_chunk(b"IEND", b""))
    return Path(path)


def test_a_decompression_bomb_is_refused_from_its_header(tmp_path):
    bomb = _black_bilevel_png(tmp_path / "bomb.png", 40000, 40000)
    assert bomb.stat().st_size < 300_000
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # PIL's DecompressionBombWarning would fail here
        with pytest.raises(InputError) as refused:
            read_image(bomb)
    assert str(refused.value) == (f"{bomb}: 40000x40000 pixels, more than the 178956970 this tool decodes "
                                  "(a decompression bomb?); resize it")
    assert MAX_IMAGE_PIXELS == 178956970
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before
    assert grown < 200 * 1024  # nothing decoded: 4.8 GB of RGB would show


def test_pils_own_bomb_limit_neither_warns_nor_refuses(tmp_path, monkeypatch):
    """A PIL limit lowered elsewhere in the process (12 pixels is over twice 4: PIL's error, not only its
    warning) does not reach read_image, which has its own; transparency is still composited (through PIL)."""
    from PIL import Image

    rgba = np.zeros((3, 4, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 255, 255
    rgba[0, 0, 3] = 0
    Image.fromarray(rgba, "RGBA").save(tmp_path / "small.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        image = read_image(tmp_path / "small.png")
    assert image.shape == (3, 4, 3)
    assert image[0, 0].tolist() == [255, 255, 255] and image[2, 3].tolist() == [255, 0, 0]


def test_opencv_errors_and_non_images_are_one_line(tmp_path):
    """A Radiance HDR header declaring 40000 x 40000: PIL does not know the format, OpenCV raises cv2.error at its
    own pixel limit. A text file named .png is no image to either."""
    hdr = tmp_path / "huge.hdr"
    hdr.write_bytes(b"#?RADIANCE\nFORMAT=32-bit_rle_rgbe\n\n-Y 40000 +X 40000\n")
    with pytest.raises(InputError) as refused:
        read_image(hdr)
    assert str(refused.value).startswith(f"{hdr}: not a readable image") and "\n" not in str(refused.value)
    text = tmp_path / "x.png"
    text.write_text("a note, not a picture\n")
    with pytest.raises(InputError) as refused:
        read_image(text)
    assert str(refused.value) == f"{text}: not a readable image"


# ---- truncated clips -----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def truncated_clip(tmp_path_factory):
    """40 frames at 10 fps with the index (moov) first, cut half-way through the frames: the container declares
    40, the decoder runs out after 17 without an error."""
    folder = tmp_path_factory.mktemp("truncated")
    full = folder / "full.mp4"
    rng = np.random.default_rng(0)
    with av.open(str(full), "w", options={"movflags": "faststart"}) as container:
        stream = container.add_stream("libx264", rate=Fraction(10))
        stream.height, stream.width, stream.pix_fmt = 48, 64, "yuv420p"
        for frame in square_frames(40):
            noisy = frame // 2 + rng.integers(0, 64, frame.shape, dtype=np.uint8)  # frames of similar size
            for packet in stream.encode(av.VideoFrame.from_ndarray(noisy, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    data = full.read_bytes()
    frames_start = data.index(b"mdat")
    assert data.index(b"moov") < frames_start
    cut = folder / "cut.mp4"
    cut.write_bytes(data[: frames_start + (len(data) - frames_start) // 2])
    return cut


def _truncation_warnings(caplog, **options):
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="svd_common.video"):
        count = len(list(iter_frames(options.pop("clip"), **options)))
    return count, [r.getMessage() for r in caplog.records if "declared frames" in r.getMessage()]


@pytest.mark.parametrize("options", [{}, {"max_frames": 100}, {"start": 0.3}, {"end": 3.5},
                                     {"stride": 2, "max_frames": 50, "end": 3.9}])
def test_running_out_of_frames_warns_whatever_the_options(truncated_clip, caplog, options):
    count, warned = _truncation_warnings(caplog, clip=truncated_clip, **options)
    assert 0 < count < 40
    assert len(warned) == 1 and "of 40 declared frames could be decoded (truncated file?)" in warned[0]
    assert warned[0].startswith(str(truncated_clip))


@pytest.mark.parametrize("options", [{"max_frames": 5}, {"end": 1.0}, {"start": 0.3, "max_frames": 2}])
def test_stopping_before_the_cut_does_not_warn(truncated_clip, caplog, options):
    count, warned = _truncation_warnings(caplog, clip=truncated_clip, **options)
    assert count > 0 and warned == []


# ---- part files that name their writer -----------------------------------------------------------------------

def test_part_names_parse_back_to_their_writer():
    assert host_tag("gpu-01.cluster.local") == "gpu-01_cluster_local"
    assert parse_part_name(".out.node-7-4242.k3j_x9q1.part.mp4", "out.mp4") == ("node-7", 4242)
    assert parse_part_name(".my.take-2.h-15.abc.part.webm", "/x/my.take-2.webm") == ("h", 15)  # dots in the stem
    assert parse_part_name(".out.abc.part.mp4", "out.mp4") is None  # the older name: writer unknown
    assert parse_part_name(".out.x.h-15.abc.part.mp4", "out.mp4") is None  # the part of out.x.mp4
    assert parse_part_name(".out.h-15.abc.part.gif", "out.mp4") is None  # another container's
    assert parse_part_name(".out.h-0.abc.part.mp4", "out.mp4") is None  # no process 0
    assert parse_part_name(".out.h-15.part.mp4", "out.mp4") is None  # no random part


def test_the_writer_names_its_part_file(tmp_path):
    with VideoWriter(tmp_path / "out.mp4", fps=5) as writer:
        writer.write(np.zeros((16, 16, 3), np.uint8))
        [part] = [p.name for p in tmp_path.iterdir()]
        assert parse_part_name(part, tmp_path / "out.mp4") == (HERE, os.getpid())
        assert fnmatch.fnmatch(part, ".out.*.part.mp4") and fnmatch.fnmatch(part, ".*.part.*")  # batch's glob


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()  # reaped: no zombie answers signal 0
    return child.pid


def _part(folder, writer, age=0.0) -> Path:
    path = Path(folder) / f".out.{writer}.r4nd0m.part.mp4"
    path.write_bytes(b"partial")
    os.utime(path, (time.time() - age,) * 2)
    return path


def test_a_part_is_judged_by_its_writer_on_this_host_and_by_age_elsewhere(tmp_path):
    dead = _part(tmp_path, f"{HERE}-{_dead_pid()}")  # fresh, but its writer is gone
    mine = _part(tmp_path, f"{HERE}-{os.getpid()}", age=3 * 3600)  # quiet for hours, but its writer lives
    other_fresh = _part(tmp_path, "elsewhere-1234", age=60)
    other_old = _part(tmp_path, "elsewhere-1235", age=3600)
    assert sorted(remove_stale_parts(tmp_path / "out.mp4")) == sorted([dead, other_old])
    assert not dead.exists() and not other_old.exists()
    assert mine.exists() and other_fresh.exists()


KILLED_WRITER = """
import os, signal, sys
import numpy as np
from svd_common.video import VideoWriter
writer = VideoWriter(sys.argv[1], fps=5)
writer.write(np.zeros((16, 16, 3), np.uint8))
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_writer_killed_by_sigkill_leaves_a_part_the_next_writer_removes(tmp_path):
    target = tmp_path / "out.mp4"
    killed = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(target)], cwd=ROOT, stderr=subprocess.PIPE,
                              text=True)
    _, stderr = killed.communicate(timeout=120)
    assert killed.returncode == -9, stderr
    [part] = tmp_path.iterdir()
    assert parse_part_name(part.name, target) == (HERE, killed.pid)
    with VideoWriter(target, fps=5) as writer:
        assert not part.exists()  # removed at once, although it is seconds old
        writer.write(np.zeros((16, 16, 3), np.uint8))
    assert [p.name for p in tmp_path.iterdir()] == ["out.mp4"]


# ---- output errors: one line, no part left -------------------------------------------------------------------

SIZE_LIMITED_WRITER = """
import os, resource, signal, sys
import numpy as np
from svd_common.errors import UserError
from svd_common.video import VideoWriter, estimate_video_bytes
path, frames = sys.argv[1], int(sys.argv[2])
resource.setrlimit(resource.RLIMIT_FSIZE, (20000, 20000))
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead of the process dying
rng = np.random.default_rng(0)
try:
    with VideoWriter(path, fps=10, expected_bytes=estimate_video_bytes(frames, 128, 128, os.path.splitext(path)[1])) as w:
        for _ in range(frames):
            w.write(rng.integers(0, 256, (128, 128, 3), dtype=np.uint8))
except UserError as e:
    print(e)
    sys.exit(2)
"""


@pytest.mark.parametrize("name", ["out.mp4", "out.webm"])  # H.264 fails in write(); VP9's lag reaches close()
def test_a_file_size_limit_is_one_line_and_leaves_no_part(tmp_path, name):
    target = tmp_path / name
    result = subprocess.run([sys.executable, "-c", SIZE_LIMITED_WRITER, str(target), "60"], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    needed = format_bytes(estimate_video_bytes(60, 128, 128, target.suffix))
    lines = result.stdout.splitlines()
    assert len(lines) == 1
    assert lines[0].startswith(f"{target}: larger than the file system or the file size limit (ulimit -f) allows (")
    assert lines[0].endswith(f" free; the video needs about {needed})")
    assert list(tmp_path.iterdir()) == []


ABORT_ON_A_FULL_DISK = """
import resource, signal, sys
from pathlib import Path
import numpy as np
from svd_common.video import VideoWriter
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
try:
    with VideoWriter(sys.argv[1], fps=10) as writer:
        for value in range(0, 250, 10):
            writer.write(np.full((64, 64, 3), value, np.uint8))
        [part] = Path(sys.argv[1]).parent.glob(".*.part.mp4")
        size = part.stat().st_size
        resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))  # the trailer written by abort cannot fit
        raise RuntimeError("stopped by the caller")
except RuntimeError as e:
    print(f"{type(e).__name__}: {e}")
"""


def test_abort_raises_nothing_of_its_own_and_removes_the_part(tmp_path):
    result = subprocess.run([sys.executable, "-c", ABORT_ON_A_FULL_DISK, str(tmp_path / "out.mp4")], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    assert result.stdout == "RuntimeError: stopped by the caller\n"
    assert list(tmp_path.iterdir()) == []


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 40 KiB tmpfs, when this process may mount one (root outside a restricted container)."""
    folder = tmp_path / "small"
    folder.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root and mount(8)")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=40k", "tmpfs", str(folder)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=True)


def test_a_full_disk_is_a_resource_error_and_leaves_no_part(small_tmpfs):
    target = small_tmpfs / "out.mp4"
    needed = estimate_video_bytes(60, 128, 128, ".mp4")
    rng = np.random.default_rng(0)
    with pytest.raises(ResourceError) as full:
        with VideoWriter(target, fps=10, expected_bytes=needed) as writer:
            for _ in range(60):
                writer.write(rng.integers(0, 256, (128, 128, 3), dtype=np.uint8))
    assert str(full.value) == (f"{target}: no space left on the device ({format_bytes(shutil.disk_usage(small_tmpfs).free)}"
                               f" free; the video needs about {format_bytes(needed)})")
    assert full.value.__cause__ is None and full.value.__suppress_context__
    assert list(small_tmpfs.iterdir()) == []


def test_other_write_errors_are_input_errors_naming_the_path(tmp_path):
    import errno

    error = write_error(tmp_path / "out.mp4", OSError(errno.EIO, "Input/output error"))
    assert type(error) is InputError and str(error) == f"{tmp_path / 'out.mp4'}: cannot write (Input/output error)"
    full = write_error(tmp_path / "out.mp4", OSError(errno.ENOSPC, "No space left on device"))
    assert type(full) is ResourceError and str(full).startswith(f"{tmp_path / 'out.mp4'}: no space left on the device (")
    assert "needs" not in str(full)  # no estimate given, none claimed


# ---- free space before work ----------------------------------------------------------------------------------

def test_size_estimates():
    """64 KiB of container, then 1/8 of the raw RGB frame (H.264, VP9) or one byte a pixel (GIF)."""
    assert estimate_video_bytes(14, 576, 1024, ".mp4") == 65536 + 14 * 576 * 1024 * 3 // 8 == 3162112
    assert estimate_video_bytes(14, 576, 1024, ".WEBM") == 3162112
    assert estimate_video_bytes(10, 64, 48, ".gif") == 65536 + 10 * 64 * 48 == 96256
    assert estimate_video_bytes(0, 576, 1024, ".mkv") == 65536
    with pytest.raises(ValueError, match=".avi"):
        estimate_video_bytes(1, 64, 64, ".avi")


@pytest.mark.parametrize("suffix", [".mp4", ".webm", ".gif"])
def test_the_estimate_bounds_a_real_clip(tmp_path, suffix):
    clip = ROOT.parent / "shared" / "data" / "driving_controlnext_v2_02.mp4"
    if not clip.is_file():
        pytest.skip(f"needs {clip}")
    frames = [frame[::2, ::2] for _, frame in iter_frames(clip, max_frames=8)]  # 288x512
    with VideoWriter(tmp_path / f"out{suffix}", fps=30) as writer:
        for frame in frames:
            writer.write(frame)
    written = (tmp_path / f"out{suffix}").stat().st_size
    assert written < estimate_video_bytes(8, 288, 512, suffix)


def test_format_bytes():
    assert [format_bytes(n) for n in (0, 1023, 1024, 1536, 20 * 2**20, int(3.25 * 2**30), 2**40 * 5)] == \
        ["0 B", "1023 B", "1.0 KiB", "1.5 KiB", "20.0 MiB", "3.2 GiB", "5.0 TiB"]
    assert format_bytes(1024 * 1024 - 1) == "1.0 MiB"  # never "1024.0 KiB"


def test_check_free_space(tmp_path, monkeypatch):
    usage = namedtuple("usage", "total used free")
    seen = []

    def disk_usage(folder):
        seen.append(Path(folder))
        return usage(10 * 2**30, 10 * 2**30 - 3 * 2**20, 3 * 2**20)

    monkeypatch.setattr(shutil, "disk_usage", disk_usage)
    check_free_space(tmp_path / "out.mp4", 3 * 2**20)  # exactly enough
    with pytest.raises(ResourceError) as short:
        check_free_space(tmp_path / "out.mp4", 5 * 2**20)
    assert str(short.value) == (f"{tmp_path / 'out.mp4'}: 3.0 MiB free in {tmp_path}, the video needs about 5.0 MiB; "
                                "free some space or write elsewhere")
    with pytest.raises(ResourceError, match=f"free in {tmp_path},"):  # a folder still to be made: its parent's disk
        check_free_space(tmp_path / "new" / "deeper" / "out.mp4", 2**30)
    assert seen == [tmp_path] * 3


# ---- a folder that is a file ---------------------------------------------------------------------------------

def test_a_file_in_the_folders_place_is_named(tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("not a folder")
    for target in (notes / "out.mp4", notes / "sub" / "deeper" / "out.mp4"):
        with pytest.raises(InputError) as refused:
            check_writable(target)
        assert str(refused.value) == f"{target}: {notes} is a file, not a folder"
    with pytest.raises(InputError, match=f"folder {tmp_path / 'missing'} does not exist"):
        check_writable(tmp_path / "missing" / "out.mp4")
