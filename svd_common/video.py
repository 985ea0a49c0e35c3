"""Read video frames as a stream (PyAV) and images (OpenCV); write videos atomically.

Frames are decoded one at a time and yielded as RGB uint8 arrays with the container's
rotation applied, so a phone clip comes out upright and memory does not grow with length.
Videos are written in the container their file name's extension names (mp4, mov, mkv, webm, gif).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import tempfile
from fractions import Fraction
from pathlib import Path
from typing import Iterator

import av
import cv2
import numpy as np

from .atomic import publish
from .errors import InputError

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"}
# Driving and training videos looked for in folders (batch, prepare-data, the web page's examples)
VIDEO_SUFFIXES = {".mp4", ".mov", ".webm", ".mkv", ".avi", ".m4v"}


@dataclasses.dataclass(frozen=True)
class VideoInfo:
    path: Path
    width: int  # after rotation
    height: int
    fps: float
    num_frames: int  # as declared by the container (0 when unknown)
    duration: float | None
    rotation: int  # degrees counter-clockwise applied to each frame


def _open(path) -> av.container.InputContainer:
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file")
    if not path.is_file():
        raise InputError(f"{path}: not a file")
    try:
        container = av.open(str(path))
    except PermissionError:
        raise InputError(f"{path}: permission denied") from None
    except av.error.EOFError:
        raise InputError(f"{path}: the video has no frames (empty, or cut off before its first frame)") from None
    except av.error.FFmpegError as e:
        raise InputError(f"{path}: not a readable video ({_reason(e)})") from None
    if not container.streams.video:
        container.close()
        raise InputError(f"{path}: contains no video stream")
    return container


def _reason(error: Exception) -> str:
    return getattr(error, "strerror", None) or str(error)


def _stream_fps(stream) -> float:
    return float(stream.average_rate or stream.guessed_rate or 0) or 25.0


def _rotation_turns(frame: av.VideoFrame) -> int:
    """Quarter turns counter-clockwise that make the frame upright (0..3)."""
    return int(round(frame.rotation / 90.0)) % 4


def probe_video(path) -> VideoInfo:
    """Size, fps, frame count and rotation, reading at most the first frame."""
    with _open(path) as container:
        stream = container.streams.video[0]
        fps = _stream_fps(stream)
        duration = float(stream.duration * stream.time_base) if stream.duration and stream.time_base else None
        if duration is None and container.duration:
            duration = container.duration / av.time_base
        try:
            first = next(container.decode(stream), None)
        except av.error.FFmpegError as e:
            raise InputError(f"{path}: the video cannot be decoded ({_reason(e)})") from None
        if first is None:
            raise InputError(f"{path}: the video has no frames")
        turns = _rotation_turns(first)
        width, height = (first.height, first.width) if turns % 2 else (first.width, first.height)
        return VideoInfo(Path(path), width, height, fps, int(stream.frames or 0), duration, turns * 90)


def iter_frames(
    path,
    stride: int = 1,
    max_frames: int | None = None,
    start: float = 0.0,
    end: float | None = None,
) -> Iterator[tuple[int, np.ndarray]]:
    """Yield `(source_index, rgb_frame)` for every `stride`-th frame between `start` and `end` seconds.

    `source_index` counts decoded frames from the start of the file, so poses can be matched back to
    frames. A stream that breaks off mid-way raises `InputError` naming the last good frame.
    """
    if stride < 1:
        raise InputError(f"--stride must be at least 1, got {stride}")
    if max_frames is not None and max_frames < 1:
        raise InputError(f"--max-frames must be at least 1, got {max_frames}")
    if start < 0 or (end is not None and end <= start):
        raise InputError(f"invalid time range: start {start}s, end {end}s")
    yielded = 0
    with _open(path) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        if start > 0 and stream.time_base:
            container.seek(int(start / stream.time_base), stream=stream, backward=True, any_frame=False)
        fps = _stream_fps(stream)
        seeked = start > 0
        index = -1
        kept = 0
        try:
            for frame in container.decode(stream):
                time = frame.time
                # After a seek, count from the timestamp; otherwise count decoded frames.
                index = round(time * fps) if seeked and time is not None else index + 1
                if time is not None and time < start - 1e-6:
                    continue
                if end is not None and time is not None and time >= end:
                    break
                kept += 1
                if (kept - 1) % stride:
                    continue
                rgb = frame.to_ndarray(format="rgb24")
                turns = _rotation_turns(frame)
                if turns:
                    rgb = np.ascontiguousarray(np.rot90(rgb, turns))
                yield index, rgb
                yielded += 1
                if max_frames is not None and yielded >= max_frames:
                    return
        except av.error.FFmpegError as e:
            raise InputError(
                f"{path}: the video is damaged or truncated after frame {index} ({_reason(e)})"
            ) from None
    if yielded == 0:
        where = "" if start == 0 and end is None else f" between {start}s and {end}s"
        raise InputError(f"{path}: the video has no frames{where}")
    declared = int(stream.frames or 0)
    if declared and end is None and max_frames is None and start == 0 and index + 1 < declared * 0.9:
        logger.warning("%s: only %d of %d declared frames could be decoded (truncated file?)",
                       path, index + 1, declared)


def read_image(path, orientation: bool = True, transparency: bool = True) -> np.ndarray:
    """An image file as RGB uint8 (H, W, 3), EXIF orientation applied by OpenCV and transparent pixels
    composited over white. `orientation=False, transparency=False` read it as PIL's plain RGB loader does."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file")
    if not path.is_file():
        raise InputError(f"{path}: not a file")
    if not os.access(path, os.R_OK):
        raise InputError(f"{path}: permission denied")
    flags = cv2.IMREAD_COLOR if orientation else cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION
    image = cv2.imread(str(path), flags)
    if image is None:
        raise InputError(f"{path}: not a readable image")
    composited = _over_background(path, orientation) if transparency else None
    return composited if composited is not None else cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


# What shows through transparent pixels of a reference: white, the background of most character sheets (the
# colour stored under transparent pixels is arbitrary, often black).
TRANSPARENCY_BACKGROUND = 255.0


def _over_background(path: Path, orientation: bool) -> np.ndarray | None:
    """An image with an alpha channel, composited over TRANSPARENCY_BACKGROUND (None when it has none)."""
    raw = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if raw is None or raw.ndim != 3 or raw.shape[2] != 4:
        return None
    from PIL import Image, ImageOps

    with Image.open(path) as image:
        rgba = np.asarray((ImageOps.exif_transpose(image) if orientation else image).convert("RGBA"), np.float32)
    alpha = rgba[..., 3:] / 255.0
    return (rgba[..., :3] * alpha + TRANSPARENCY_BACKGROUND * (1 - alpha)).round().astype(np.uint8)


def is_image_path(path) -> bool:
    return Path(path).suffix.lower() in IMAGE_SUFFIXES


@dataclasses.dataclass(frozen=True)
class AudioClip:
    """The part of `source`'s audio track from `start` for `duration` seconds, delayed by `delay`."""

    source: Path
    start: float
    duration: float
    delay: float = 0.0


def has_audio(path) -> bool:
    with av.open(str(path)) as container:
        return bool(container.streams.audio)


def _audio_frames(clip: AudioClip, rate: int, layout: str) -> Iterator[av.AudioFrame]:
    """The clip's samples as planar float frames at `rate`, trimmed to the clip and delayed."""
    resampler = av.AudioResampler(format="fltp", layout=layout, rate=rate)
    first, last = round(clip.start * rate), round((clip.start + clip.duration) * rate)
    position = -round(clip.delay * rate)  # source sample index of the next output sample
    channels = len(av.AudioLayout(layout).channels)
    pts = 0

    def emit(samples: np.ndarray) -> av.AudioFrame:
        nonlocal pts
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(samples, np.float32), format="fltp", layout=layout)
        frame.sample_rate, frame.pts = rate, pts
        pts += samples.shape[1]
        return frame

    if position < 0:
        yield emit(np.zeros((channels, -position), np.float32))
        position = 0
    position += first
    seen = 0  # source samples decoded so far (resampled timeline, from 0)
    with av.open(str(clip.source)) as container:
        for decoded in container.decode(container.streams.audio[0]):
            for frame in resampler.resample(decoded):
                samples = frame.to_ndarray()
                begin, end = max(position, seen), min(last, seen + samples.shape[1])
                if end > begin:
                    yield emit(samples[:, begin - seen:end - seen])
                    position = end
                seen += samples.shape[1]
                if seen >= last:
                    return


STALE_PART_SECONDS = 600


def remove_stale_parts(path: Path, older_than: float = STALE_PART_SECONDS) -> list[Path]:
    """Temporary files for `path` left by a killed run (kill -9 skips every cleanup). A writer touches its
    file with every frame, so one untouched for `older_than` seconds belongs to nobody."""
    import time

    path = Path(path)
    now = time.time()
    stale = [part for part in path.parent.glob(f".{path.stem}.*.part{path.suffix.lower()}")
             if now - part.stat().st_mtime > older_than]
    for part in stale:
        part.unlink(missing_ok=True)
    return stale


@dataclasses.dataclass(frozen=True)
class _Container:
    """How VideoWriter fills one kind of file: the first encoder of each list that this PyAV build has."""

    format: str  # PyAV (FFmpeg) muxer
    video: tuple[str, ...]
    pix_fmt: str
    audio: tuple[str, ...] = ()  # empty: the format carries no sound


# By output extension. H.264 plays everywhere; WebM allows only VP8/VP9/AV1 video and Vorbis/Opus sound; GIF
# is 256 colours a frame and silent.
_CONTAINERS = {
    ".mp4": _Container("mp4", ("libx264", "mpeg4"), "yuv420p", ("aac",)),
    ".mov": _Container("mov", ("libx264", "mpeg4"), "yuv420p", ("aac",)),
    ".mkv": _Container("matroska", ("libx264", "mpeg4"), "yuv420p", ("aac",)),
    ".webm": _Container("webm", ("libvpx-vp9",), "yuv420p", ("libopus",)),
    ".gif": _Container("gif", ("gif",), "pal8"),
}


def _encoder(names: tuple[str, ...]) -> str | None:
    return next((name for name in names if name in av.codecs_available), None)


VIDEO_OUTPUT_SUFFIXES = tuple(suffix for suffix, kind in _CONTAINERS.items()
                              if _encoder(kind.video) and kind.format in av.formats_available)


def check_output_container(path) -> None:
    """Refuse, before any work, a file name whose extension names no container VideoWriter writes, rather
    than write another format under that name."""
    suffix = Path(path).suffix.lower()
    if suffix not in VIDEO_OUTPUT_SUFFIXES:
        what = f"cannot write {suffix} videos" if suffix else "no extension to choose the video format from"
        *others, last = VIDEO_OUTPUT_SUFFIXES
        raise InputError(f"{path}: {what}; end the name with {', '.join(others)} or {last}")


def _encoder_options(codec: str, crf: int) -> dict[str, str]:
    if codec == "libx264":
        # mbtree=0: x264's AVX-512 macroblock-tree kernels read uninitialised memory when the width in
        # macroblocks is not a multiple of 8 (64, 192, 576 px...), so the same frames encoded differently from
        # run to run on AVX-512 CPUs. Without mbtree the output depends on the frames only (costs about 5% in
        # size and 0.45 dB PSNR at crf 18).
        return {"crf": str(crf), "preset": "veryfast", "x264-params": "mbtree=0"}
    if codec == "libvpx-vp9":
        # Constant quality; the same crf number gives about x264's PSNR here (measured at 576x576), and
        # cpu-used 4 with row threads keeps it within a few times x264 veryfast's speed.
        return {"crf": str(crf), "b": "0", "deadline": "good", "cpu-used": "4", "row-mt": "1"}
    return {}


def _paletted(rgb: np.ndarray) -> av.VideoFrame:
    """A GIF frame with its own 256-colour palette. Median cut without dithering: deterministic, and flat
    areas stay flat instead of becoming noise."""
    from PIL import Image

    image = Image.fromarray(rgb).quantize(256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    colours = np.asarray(image.getpalette(), np.uint8).reshape(-1, 3)[:256]
    palette = np.full((256, 4), 255, np.uint8)  # ARGB, opaque
    palette[: len(colours), 1:] = colours
    return av.VideoFrame.from_ndarray((np.asarray(image), palette), format="pal8")


class VideoWriter:
    """Encode RGB frames, atomically, in the container `path`'s extension names, with an optional audio clip.

    .mp4, .mov and .mkv get H.264 (yuv420p) and AAC, .webm VP9 and Opus, .gif a palette per frame and no
    sound (the clip is dropped with a warning); any other name is refused (`check_output_container`).
    Frames go to a temporary file beside the target, renamed over it only by `close()` after the
    last frame; an exception inside the `with` block removes the temporary file and leaves any
    existing output untouched. The audio is encoded at `close()`. The same frames give the same bytes.
    """

    def __init__(self, path, fps: float, crf: int = 18, audio: AudioClip | None = None):
        self.path = Path(path)
        check_output_container(self.path)
        check_writable(self.path)
        suffix = self.path.suffix.lower()
        self._kind = _CONTAINERS[suffix]
        if audio is not None and _encoder(self._kind.audio) is None:
            why = f"no {self._kind.audio[0]} encoder in this PyAV build" if self._kind.audio else "no sound in GIF"
            logger.warning("%s: the audio is left out (%s)", self.path, why)
            audio = None
        remove_stale_parts(self.path)
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.stem}.", suffix=f".part{suffix}", dir=self.path.parent)
        os.close(fd)
        self._tmp = Path(tmp)
        self._fps = Fraction(fps).limit_denominator(1001)
        self._crf = crf
        # bitexact: no random Matroska segment id and no library versions in the file, so the bytes depend on
        # the frames only.
        self._container = av.open(str(self._tmp), mode="w", format=self._kind.format,
                                  options={"fflags": "+bitexact"})
        self._stream = None
        self.audio = audio  # what the file will carry: None when nothing, or dropped (GIF)
        self._audio_stream = None
        self.frames_written = 0

    def write(self, frame: np.ndarray) -> None:
        if self._stream is None:
            self._add_video_stream(*frame.shape[:2])
        frame = np.ascontiguousarray(frame[: self._stream.height, : self._stream.width])
        if self._kind.pix_fmt == "pal8":
            packet_frame = _paletted(frame)
        else:
            packet_frame = av.VideoFrame.from_ndarray(frame, format="rgb24")
        for packet in self._stream.encode(packet_frame):
            self._container.mux(packet)
        self.frames_written += 1

    def _add_video_stream(self, height: int, width: int) -> None:
        codec = _encoder(self._kind.video)
        self._stream = self._container.add_stream(codec, rate=self._fps)
        if self._kind.pix_fmt == "yuv420p":  # half-resolution colour: even sizes only
            width, height = width - width % 2, height - height % 2
        self._stream.width, self._stream.height = width, height
        self._stream.pix_fmt = self._kind.pix_fmt
        self._stream.options = _encoder_options(codec, self._crf)
        if self.audio is not None:  # every stream must exist before the first packet
            self._add_audio_stream()

    def _add_audio_stream(self) -> None:
        codec = _encoder(self._kind.audio)
        with av.open(str(self.audio.source)) as source:
            track = source.streams.audio[0].codec_context
            rate, layout = track.sample_rate, "mono" if track.channels == 1 else "stereo"
        rates = av.Codec(codec, "w").audio_rates
        if rates and rate not in rates:
            rate = max(rates)  # Opus: 48 kHz
        self._audio_stream = self._container.add_stream(codec, rate=rate)
        self._audio_stream.layout = layout

    def _write_audio(self) -> None:
        stream = self._audio_stream
        for frame in _audio_frames(self.audio, stream.rate, stream.layout.name):
            for packet in stream.encode(frame):
                self._container.mux(packet)
        for packet in stream.encode():
            self._container.mux(packet)

    def close(self) -> Path:
        try:
            if self._stream is not None:
                for packet in self._stream.encode():
                    self._container.mux(packet)
            if self._audio_stream is not None:
                self._write_audio()
        except BaseException:
            self.abort()
            raise
        self._container.close()
        if self.frames_written == 0:
            self._tmp.unlink(missing_ok=True)
            raise InputError(f"{self.path}: no frames to write")
        publish(self._tmp, self.path)
        return self.path

    def abort(self) -> None:
        try:
            self._container.close()
        finally:
            self._tmp.unlink(missing_ok=True)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:
            self.abort()
        return False


def check_writable(path) -> Path:
    """Fail early, before any work, when `path` cannot be written (probes with a real file, since
    permission bits say nothing for root or read-only mounts)."""
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise InputError(f"{path}: folder {parent} does not exist")
    if path.is_dir():
        raise InputError(f"{path}: is a folder, expected a file name")
    try:
        with tempfile.NamedTemporaryFile(prefix=f".{path.name}.", suffix=".probe", dir=parent):
            pass
    except OSError as e:
        raise InputError(f"{path}: not writable ({e.strerror or e})") from None
    if path.exists() and not os.access(path, os.W_OK):
        raise InputError(f"{path}: not writable")
    return path
