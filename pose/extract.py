"""Driving video -> `PoseSequence`: stream frames, detect, follow one person, fill gaps, cache."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Callable

import numpy as np
from tqdm.auto import tqdm

from svd_common.errors import InputError, NoPersonError
from svd_common.video import iter_frames, probe_video, read_image

from .align import VISIBLE, align
from .cache import PoseCache, cache_key, file_digest
from .detect.base import PoseDetector
from .skeleton import ARRAY_SHAPES, PoseSequence

logger = logging.getLogger(__name__)

FILL_MODES = ("interpolate", "hold")


@dataclasses.dataclass(frozen=True)
class ExtractSettings:
    stride: int = 1
    max_frames: int | None = None
    start: float = 0.0
    end: float | None = None
    fill: str = "interpolate"


@dataclasses.dataclass
class Extraction:
    poses: PoseSequence
    from_cache: bool
    cache_path: Path | None


def fill_gaps(frames: list[dict | None], mode: str = "interpolate") -> tuple[list[dict], np.ndarray]:
    """Fill frames where nobody was found (None) from the detected ones.

    `interpolate`: linear in time between the two nearest detected frames, each score the smaller of
    the two; before the first and after the last detection the nearest pose is held. `hold`: the
    previous detection (the first one for leading gaps). Returns the frames and the filled mask.
    Raises `NoPersonError` when no frame has a person.
    """
    if mode not in FILL_MODES:
        raise InputError(f"unknown fill mode {mode!r}; choose {' or '.join(FILL_MODES)}")
    found = np.array([f is not None for f in frames])
    if not found.any():
        raise NoPersonError("no person was found in any frame")
    known = np.flatnonzero(found)
    out = []
    for t, frame in enumerate(frames):
        if frame is not None:
            out.append(frame)
            continue
        after = known[known > t]
        before = known[known < t]
        if mode == "hold" or not len(before) or not len(after):
            source = before[-1] if len(before) else after[0]
            out.append({k: v.copy() for k, v in frames[source].items()})
            continue
        t0, t1 = before[-1], after[0]
        w = (t - t0) / (t1 - t0)
        a, b = frames[t0], frames[t1]
        out.append({name: (np.minimum(a[name], b[name]) if name.endswith("score")
                           else (1 - w) * a[name] + w * b[name]).astype(np.float32)
                    for name in ARRAY_SHAPES})
    return out, ~found


def extraction_key(video, detector: PoseDetector, settings: ExtractSettings) -> str:
    """The pose-cache key of extracting `video` with this detector and these settings: what a dry run
    checks and what `extract_video` stores under, from one place."""
    return cache_key(file_digest(video), detector.name, detector.settings(), dataclasses.asdict(settings))


def extract_video(
    video,
    detector: PoseDetector,
    settings: ExtractSettings = ExtractSettings(),
    cache: PoseCache | None = None,
    progress: bool = True,
    on_frame: Callable[[int, int | None], None] | None = None,
) -> Extraction:
    """Poses of the person in `video` (one per kept frame); a cache hit extracts nothing. `on_frame(done,
    expected)` is called after each frame (a page's progress bar; it may raise to stop the extraction)."""
    video = Path(video)
    info = probe_video(video)
    key = None
    if cache is not None:
        key = extraction_key(video, detector, settings)
        hit = cache.get(key)
        if hit is not None:
            logger.info("%s: poses from cache (%s)", video, cache.path(key))
            warn_about_the_dancer(video, hit)
            return Extraction(hit, True, cache.path(key))

    detector.reset()
    frames, indices, crowded = [], [], 0
    expected = expected_count(info, settings)
    bar = tqdm(total=expected, desc=f"poses {video.name}", unit="frame", disable=not progress, leave=False)
    try:
        for index, rgb in iter_frames(video, settings.stride, settings.max_frames, settings.start, settings.end):
            frames.append(detector.detect(rgb))
            indices.append(index)
            crowded += (detector.people_seen or 0) > 1
            bar.update(1)
            if on_frame is not None:
                on_frame(len(frames), expected)
    finally:
        bar.close()
        detector.reset()
    try:
        filled_frames, filled = fill_gaps(frames, settings.fill)
    except NoPersonError:
        raise NoPersonError(f"{video}: no person was found in any of its {len(frames)} frames") from None
    if filled.any():
        logger.warning("%s: no person in %d of %d frames (%s from neighbours)", video, int(filled.sum()),
                       len(frames), "interpolated" if settings.fill == "interpolate" else "held")
    fps = info.fps / settings.stride
    meta = {"source": video.name, "detector": detector.name, "detector_settings": detector.settings(),
            "source_fps": info.fps, "stride": settings.stride, "frames_with_others": crowded}
    poses = PoseSequence.stack(filled_frames, info.width, info.height, fps,
                               frame_index=np.array(indices), filled=filled, meta=meta)
    warn_about_the_dancer(video, poses)
    cache_path = cache.put(key, poses) if cache is not None else None
    return Extraction(poses, False, cache_path)


def partly_out_of_frame(poses: PoseSequence, threshold: float = VISIBLE) -> np.ndarray:
    """Frames where the followed dancer shows fewer than half the body points they usually show (the median
    over the clip): leaving the frame, or hidden. Frames with nobody found are reported apart (filled)."""
    visible = (poses.body_score > threshold).sum(axis=1)
    found = ~poses.filled
    typical = np.median(visible[found]) if found.any() else 0
    return (visible < typical / 2) & found


def warn_about_the_dancer(video, poses: PoseSequence) -> None:
    """What makes the driving poses less trustworthy without stopping the run, said once per extraction:
    another person in the frame (the first dancer is followed), the dancer partly leaving it."""
    others = poses.meta.get("frames_with_others", 0)
    if others:
        logger.warning("%s: another person is in %d of %d frames; the dancer who is largest at the start is "
                       "followed", video, others, len(poses))
    leaving = np.flatnonzero(partly_out_of_frame(poses))
    if len(leaving):
        logger.warning("%s: the dancer is partly out of the frame in %d of %d frames (from frame %d): the pose "
                       "control is weaker there", video, len(leaving), len(poses), int(poses.frame_index[leaving[0]]))


def extract_aligned(video, detector: PoseDetector, settings: ExtractSettings, cache: PoseCache | None,
                    reference: PoseSequence | None, method: str = "ls", reference_size: tuple[int, int] | None = None,
                    fit_threshold: float | None = VISIBLE, progress: bool = True,
                    on_frame: Callable[[int, int | None], None] | None = None) -> Extraction:
    """The driving poses of `video` in the reference's frame: aligned to the `reference` pose (`ls`, `bones`),
    or with `none` the driving frame laid over a `reference_size` (width, height) image as it is. Shared by
    `svd-animate pose` and the main job."""
    result = extract_video(video, detector, settings, cache, progress=progress, on_frame=on_frame)
    poses = result.poses
    if method != "none":
        poses = align(poses, reference, method, fit_threshold)
    elif reference_size is not None:
        poses = poses.replace(width=reference_size[0], height=reference_size[1])
    return dataclasses.replace(result, poses=poses)


def expected_count(info, settings: ExtractSettings) -> int | None:
    if not info.num_frames:
        return settings.max_frames
    first = int(settings.start * info.fps)
    last = int(settings.end * info.fps) if settings.end is not None else info.num_frames
    count = max(0, (min(last, info.num_frames) - first + settings.stride - 1) // settings.stride)
    return min(count, settings.max_frames) if settings.max_frames else count


def detect_reference(image_path, detector: PoseDetector, image: np.ndarray | None = None,
                     ) -> tuple[PoseSequence, np.ndarray]:
    """The reference image's pose (a one-frame sequence) and the image itself. `image` is the
    reference as it should be seen (e.g. already framed to the output size); default: the file."""
    image = read_image(image_path) if image is None else image
    pose = detector.detect_image(image)
    if pose is None or not (pose["body_score"] > 0.3).any():
        raise NoPersonError(
            f"{image_path}: no person found in the reference image; stylised characters often defeat pose "
            "detectors: use --align none to skip alignment"
        )
    if (detector.people_seen or 0) > 1:
        logger.warning("%s: %d people in the reference image; the largest is taken as the character (crop the "
                       "image to choose another)", image_path, detector.people_seen)
    height, width = image.shape[:2]
    seq = PoseSequence.stack([pose], width, height, fps=1.0, meta={"source": Path(image_path).name})
    return seq, image
