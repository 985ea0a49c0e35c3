"""Read video frames as a stream (PyAV) and images (OpenCV); write videos atomically.

Frames are decoded one at a time and yielded as RGB uint8 arrays with the container's
rotation applied, so a phone clip comes out upright and memory does not grow with length.
Videos are written in the container their file name's extension names (mp4, mov, mkv, webm, gif).
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
import re
import shutil
import socket
import tempfile
import warnings
from fractions import Fraction
from pathlib import Path
from typing import Iterator

import av
import cv2
import numpy as np

from .atomic import publish
from .errors import InputError, InvalidValue, ResourceError, UserError

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
    frames. A stream that breaks off mid-way raises `InputError` naming the last good frame; one whose decoder
    runs out well before the container's declared count logs a warning (a truncated file), whatever the options.
    """
    if stride < 1:
        raise InputError(f"--stride must be at least 1, got {stride}")
    if max_frames is not None and max_frames < 1:
        raise InputError(f"--max-frames must be at least 1, got {max_frames}")
    if start < 0 or (end is not None and end <= start):
        raise InputError(f"invalid time range: start {start}s, end {end}s")
    yielded = 0
    ran_out = False  # the decoder had no more frames (not our cap, `end`, or the caller stopping)
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
            else:
                ran_out = True
        except av.error.FFmpegError as e:
            raise InputError(
                f"{path}: the video is damaged or truncated after frame {index} ({_reason(e)})"
            ) from None
    if yielded == 0:
        where = "" if start == 0 and end is None else f" between {start}s and {end}s"
        raise InputError(f"{path}: the video has no frames{where}")
    declared = int(stream.frames or 0)
    if ran_out and _looks_truncated(index + 1, declared):
        logger.warning("%s: only %d of %d declared frames could be decoded (truncated file?)",
                       path, index + 1, declared)


def _looks_truncated(decoded: int, declared: int) -> bool:
    """Whether a decoder that ran out after `decoded` frames (counted from the file's start) fell short of the
    container's count: 10% slack, since declared counts are estimates in some containers; 0 declares nothing."""
    return declared > 0 and decoded < declared * 0.9


# The most pixels read_image decodes: where PIL itself refuses a file as a decompression bomb (twice its
# MAX_IMAGE_PIXELS default of 89,478,485, above which it only warns). 179 MP is about 13,000 x 13,000, 537 MB as
# RGB: far beyond any reference, while a few hundred bytes of PNG can declare gigapixels that would take the
# machine's memory. Fixed here rather than read from PIL, whose setting is process-wide and anyone's to change.
MAX_IMAGE_PIXELS = 2 * 89_478_485


def read_image(path, orientation: bool = True, transparency: bool = True) -> np.ndarray:
    """An image file as RGB uint8 (H, W, 3), EXIF orientation applied by OpenCV and transparent pixels
    composited over white. `orientation=False, transparency=False` read it as PIL's plain RGB loader does.
    The size in the file's header is checked against MAX_IMAGE_PIXELS before anything is decoded."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file")
    if not path.is_file():
        raise InputError(f"{path}: not a file")
    if not os.access(path, os.R_OK):
        raise InputError(f"{path}: permission denied")
    size = _header_size(path)
    if size is not None and size[0] * size[1] > MAX_IMAGE_PIXELS:
        raise InputError(f"{path}: {size[0]}x{size[1]} pixels, more than the {MAX_IMAGE_PIXELS} this tool decodes "
                         "(a decompression bomb?); resize it")
    flags = cv2.IMREAD_COLOR if orientation else cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION
    try:
        image = cv2.imread(str(path), flags)
        composited = _over_background(path, orientation) if transparency and image is not None else None
    except cv2.error as e:  # OpenCV's own checks (its pixel limit on a format PIL does not know) raise
        raise InputError(f"{path}: not a readable image ({_one_line(getattr(e, 'err', None) or e)})") from None
    if image is None:
        raise InputError(f"{path}: not a readable image")
    return composited if composited is not None else cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def _one_line(text: str) -> str:
    """`text` with its line breaks and runs of spaces made single spaces: errors are printed as one line."""
    return " ".join(str(text).split())


def _header_size(path: Path) -> tuple[int, int] | None:
    """(width, height) as the file's header declares them, nothing decoded; None when PIL cannot identify the
    file (OpenCV, which reads a few formats PIL does not, then decides)."""
    try:
        with _open_pil(path) as image:
            return image.size
    except Exception:  # any failure to identify: OpenCV reads the file or says it is not an image
        return None


def _open_pil(path: Path):
    """PIL's lazy image of `path` without PIL's own decompression-bomb warning or error: read_image applies
    MAX_IMAGE_PIXELS itself, with a message naming the file, whatever PIL.Image.MAX_IMAGE_PIXELS is set to."""
    from PIL import Image

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            return Image.open(path)
        except Image.DecompressionBombError:
            return _open_pil_unchecked(path)


def _open_pil_unchecked(path: Path):
    """What Image.open does without its pixel check: the first registered format whose test accepts the file's
    first bytes reads the header (image data is only decoded on load)."""
    from PIL import Image, UnidentifiedImageError

    Image.init()
    with open(path, "rb") as file:
        prefix = file.read(16)
    for name in Image.ID:
        factory, accept = Image.OPEN[name]
        accepted = accept is None or accept(prefix)
        if accepted and not isinstance(accepted, str):  # a string is a warning, not an acceptance
            try:
                return factory(str(path))
            except (SyntaxError, IndexError, TypeError, ValueError, OSError):
                continue
    raise UnidentifiedImageError(f"cannot identify image file {str(path)!r}")


# What shows through transparent pixels of a reference: white, the background of most character sheets (the
# colour stored under transparent pixels is arbitrary, often black).
TRANSPARENCY_BACKGROUND = 255.0


def _over_background(path: Path, orientation: bool) -> np.ndarray | None:
    """An image with an alpha channel, composited over TRANSPARENCY_BACKGROUND (None when it has none)."""
    raw = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if raw is None or raw.ndim != 3 or raw.shape[2] != 4:
        return None
    from PIL import ImageOps

    with _open_pil(path) as image:
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


def host_tag(hostname: str) -> str:
    """`hostname` as it goes into a part file's name: characters other than letters, digits, _ and - become _, so
    the tag holds no dot (the name's separator) and the part's writer can be parsed back."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", hostname) or "_"


def _part_prefix(path: Path) -> str:
    """`.{stem}.{host}-{pid}.`: the start of the temporary file's name, saying which process writes it."""
    return f".{path.stem}.{host_tag(socket.gethostname())}-{os.getpid()}."


def parse_part_name(name: str, path) -> tuple[str, int] | None:
    """(host, pid) of the process that writes the part file `name` for the video `path`, from
    `.{stem}.{host}-{pid}.{random}.part{suffix}`; None for any other name (the older `.{stem}.{random}.part...`,
    another video's part), whose writer is unknown."""
    path = Path(path)
    head, tail = f".{path.stem}.", f".part{path.suffix.lower()}"
    if not (name.startswith(head) and name.endswith(tail)) or len(name) <= len(head) + len(tail):
        return None
    found = re.fullmatch(r"([A-Za-z0-9_-]+)-([1-9][0-9]*)\.[^.]+", name[len(head):-len(tail)])
    return (found[1], int(found[2])) if found else None


def _process_alive(pid: int) -> bool:
    """Whether process `pid` exists on this machine (signal 0 checks without sending anything; a process of
    another user exists too)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: alive, someone else's
        return True
    return True


def remove_stale_parts(path: Path, older_than: float = STALE_PART_SECONDS) -> list[Path]:
    """Temporary files for `path` left by a killed run (kill -9 skips every cleanup). A part written by a process
    of this host that no longer exists is removed at once, one whose writer is alive is kept however long it has
    been quiet (sampling can take an hour before the first frame). The writer of a part from another host (a
    shared folder) or of the older name cannot be asked: a writer touches its file with every frame, so one
    untouched for `older_than` seconds belongs to nobody. (Hosts are told apart by name: containers sharing a
    folder need their own host names, as Docker and Kubernetes give them.)"""
    import time

    path = Path(path)
    here = host_tag(socket.gethostname())
    now = time.time()
    stale = []
    for part in path.parent.glob(f".{path.stem}.*.part{path.suffix.lower()}"):
        writer = parse_part_name(part.name, path)
        try:
            if writer is not None and writer[0] == here:
                gone = not _process_alive(writer[1])
            else:
                gone = now - part.stat().st_mtime > older_than
        except FileNotFoundError:  # removed meanwhile by its writer or another cleanup
            continue
        if gone:
            part.unlink(missing_ok=True)
            stale.append(part)
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
    The temporary file's name says which process writes it (`parse_part_name`). Any OSError while opening,
    writing or closing (a full disk, a file size limit, an I/O error) removes the temporary file and becomes one
    line: `ResourceError` when space ran out (`expected_bytes`, when given, says how much the video needs),
    else `InputError`.
    """

    def __init__(self, path, fps: float, crf: int = 18, audio: AudioClip | None = None,
                 expected_bytes: int | None = None):
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
        self.expected_bytes = expected_bytes
        self._fps = Fraction(fps).limit_denominator(1001)
        self._crf = crf
        self._stream = None
        self.audio = audio  # what the file will carry: None when nothing, or dropped (GIF)
        self._audio_stream = None
        self.frames_written = 0
        self._tmp = self._container = None
        try:
            fd, tmp = tempfile.mkstemp(prefix=_part_prefix(self.path), suffix=f".part{suffix}",
                                       dir=self.path.parent)
            self._tmp = Path(tmp)
            os.close(fd)
            # bitexact: no random Matroska segment id and no library versions in the file, so the bytes depend
            # on the frames only.
            self._container = av.open(str(self._tmp), mode="w", format=self._kind.format,
                                      options={"fflags": "+bitexact"})
        except OSError as e:
            raise self._failed(e) from None

    def write(self, frame: np.ndarray) -> None:
        try:
            if self._stream is None:
                self._add_video_stream(*frame.shape[:2])
            frame = np.ascontiguousarray(frame[: self._stream.height, : self._stream.width])
            if self._kind.pix_fmt == "pal8":
                packet_frame = _paletted(frame)
            else:
                packet_frame = av.VideoFrame.from_ndarray(frame, format="rgb24")
            for packet in self._stream.encode(packet_frame):
                self._container.mux(packet)
        except OSError as e:  # PyAV's av.error.OSError and its kin derive from OSError
            raise self._failed(e) from None
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
            self._container.close()  # writes the trailer (mp4's index): it can meet a full disk too
            if self.frames_written:
                publish(self._tmp, self.path)
        except OSError as e:
            raise self._failed(e) from None
        except BaseException:
            self.abort()
            raise
        if self.frames_written == 0:
            self._tmp.unlink(missing_ok=True)
            raise InputError(f"{self.path}: no frames to write")
        return self.path

    def abort(self) -> None:
        """Drop the temporary file. Never raises: it runs while another error is on its way, and the container's
        close fails as the writing did (a full disk fails the trailer too)."""
        try:
            if self._container is not None:
                self._container.close()
        except Exception as e:
            logger.debug("%s: closing the abandoned temporary file failed too (%s)", self.path, _reason(e))
        finally:
            try:
                if self._tmp is not None:
                    self._tmp.unlink(missing_ok=True)
            except OSError as e:
                logger.warning("%s: the temporary file %s could not be removed (%s)", self.path, self._tmp,
                               _reason(e))

    def _failed(self, error: OSError) -> UserError:
        """The one-line error for `error`, the temporary file removed first (so the free space it reports is
        what the next try has)."""
        self.abort()
        return write_error(self.path, error, self.expected_bytes)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:
            self.abort()
        return False


# errno of a write that ran out of room: what to say about it.
_NO_ROOM = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "over the disk quota",
    errno.EFBIG: "larger than the file system or the file size limit (ulimit -f) allows",
}


def write_error(path, error: OSError, needed: int | None = None) -> UserError:
    """The one-line error for an OSError met writing the video `path`: `ResourceError` when it ran out of room
    (with the free space left and, when known, the `needed` bytes), else `InputError` with the system's reason."""
    code = getattr(error, "errno", None)
    if code not in _NO_ROOM:
        return InputError(f"{path}: cannot write ({_one_line(_reason(error))})")
    try:
        room = [f"{format_bytes(shutil.disk_usage(_existing_ancestor(Path(path).parent)).free)} free"]
    except OSError:
        room = []
    if needed is not None:
        room.append(f"the video needs about {format_bytes(needed)}")
    return ResourceError(f"{path}: {_NO_ROOM[code]}" + (f" ({'; '.join(room)})" if room else ""))


# Output bytes per frame, as a fraction of the raw RGB frame (width * height * 3 bytes): generous for anything
# this tool writes. At crf 18 a generated or filmed 576x1024 clip takes under 1% of raw in H.264 and VP9
# (measured: 0.9% and 0.8%), high-detail footage a few %; 1/8 covers those many times over. Only synthetic
# uniform noise, which no codec compresses, goes beyond (21% H.264, 27% VP9): a test pattern, not a video.
_VIDEO_FRACTION = (1, 8)
# GIF stores LZW-coded palette indices, one byte a pixel before coding: a real clip takes about 0.46 byte a
# pixel (measured), noise up to 1.4; one byte a pixel bounds real content.
_GIF_BYTES_PER_PIXEL = 1
_CONTAINER_OVERHEAD = 64 * 1024  # headers, index, and the sound track of a short clip


def estimate_video_bytes(frames: int, width: int, height: int, suffix: str) -> int:
    """A generous upper estimate of the size of a video VideoWriter writes, to check the free space before the
    work rather than fail at the end of it."""
    suffix = suffix.lower()
    if suffix not in _CONTAINERS:
        raise InvalidValue(f"no size estimate for {suffix or 'a name without extension'} videos")
    if suffix == ".gif":
        per_frame = width * height * _GIF_BYTES_PER_PIXEL
    else:
        numerator, denominator = _VIDEO_FRACTION
        per_frame = width * height * 3 * numerator // denominator
    return _CONTAINER_OVERHEAD + frames * per_frame


def format_bytes(count: int) -> str:
    """A byte count as people read it, in binary units as `df -h` prints them: 512 B, 1.5 KiB, 20.0 MiB."""
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if round(value, 1) < 1024:
            break
        value /= 1024
    else:
        unit = "TiB"
    return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"


def check_free_space(path, needed: int) -> None:
    """Refuse, before any work, to write `needed` bytes to `path` when its folder's file system has less free
    (`needed` from `estimate_video_bytes`); a full disk found after an hour of sampling loses that hour."""
    path = Path(path)
    folder = _existing_ancestor(path.parent)
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise ResourceError(f"{path}: {format_bytes(free)} free in {folder}, the video needs about "
                            f"{format_bytes(needed)}; free some space or write elsewhere")


def _existing_ancestor(folder: Path) -> Path:
    """`folder` itself or the nearest of its parents that exists (what a missing folder would be made in)."""
    for candidate in (folder, *folder.parents):
        if candidate.exists():
            return candidate
    return Path(".")


def check_writable(path) -> Path:
    """Fail early, before any work, when `path` cannot be written (probes with a real file, since
    permission bits say nothing for root or read-only mounts)."""
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        ancestor = _existing_ancestor(parent)
        if not ancestor.is_dir():
            raise InputError(f"{path}: {ancestor} is a file, not a folder")
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


def write_lossless_clip(frames: np.ndarray, fps: float, path) -> Path:
    """RGB uint8 frames (T, H, W, 3) as a lossless video (FFV1 in Matroska; `iter_frames` gives the same pixels
    back), written atomically: frames that arrive in memory (a ComfyUI `IMAGE` batch) handed to code that reads
    clips."""
    path = Path(path)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8 or not len(frames):
        raise InvalidValue(f"frames must be a non-empty uint8 array (T, H, W, 3), got {frames.dtype} "
                           f"{tuple(frames.shape)}")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".part.mkv", dir=path.parent)
    os.close(fd)
    try:
        with av.open(tmp, mode="w", format="matroska", options={"fflags": "+bitexact"}) as container:
            stream = container.add_stream("ffv1", rate=Fraction(fps).limit_denominator(1001))
            stream.height, stream.width = frames.shape[1:3]
            stream.pix_fmt = "bgr0"  # RGB kept as it is (no YUV conversion): lossless
            for frame in frames:
                container.mux(stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")))
            container.mux(stream.encode())
        return publish(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
