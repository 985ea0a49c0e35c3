"""Training data: `prepare-data` (poses extracted once, nothing rendered) and the clip dataset.

Our layout: DATASET/dataset.json lists each clip's video and its poses (.npz, all frames); skeleton
frames are drawn on the fly at the training size. The published layout (a `meta_info.json` list of
{video_path, guide_path, meta_info}: pre-rendered pose videos and per-frame detection JSON) is read as
the published `utils/vid_dataset.py` reads it: pose frames get its BGR->RGB swap (its pose videos are
stored with red and blue exchanged), and the per-frame `hands_boxes` / `hands_score` give the hand
loss weights.

A sample, as the published loader makes it: a clip of `num_frames` frames `interval` apart at a random
start; frame 0 replaced (RGB and pose) by a random frame of the same video, which is also the reference
image; a random crop to the target aspect, scaled to the target size. The crop is inference's framing
(`svd_animate/framing.py`: resize to cover the target, PIL bicubic, then cut) with the cut at a random
offset instead of the centre, so a sample cut at the centre is exactly what inference would feed the model
(pixels and pose coordinates). Hand loss weights: `hand_loss_weight` (1 + 4 x 0.8 = 4.2 as published)
inside the box of each hand whose mean keypoint score is > 0.5, widened by 10 px at the source size,
framed like the frames; 1 elsewhere and on frame 0.
Randomness comes from (seed, epoch, index), so a resumed run sees the same samples as an uninterrupted one.

Differences from `utils/vid_dataset.py` (the README's training differences table):
- a clip shorter than a sample's span, (num_frames - 1) x interval + 1 frames, is skipped and counted when
  the dataset loads (published: under num_frames x interval frames the interval shrinks to
  length // num_frames; under num_frames frames another clip is drawn at random instead);
- a sample starts anywhere its frames fit, 0 to frames - span (published: 0 to length - num_frames x
  interval, so its last interval - 1 starts are never drawn);
- frames and the published layout's pose videos are resized with PIL's antialiased bicubic as inference
  resizes the reference, our layout's skeletons are drawn at the training size, hand weights are resized with
  OpenCV's area filter (published: a crop to the target aspect, then torchvision's antialiased bilinear for
  all three);
- a hand box below the score threshold is skipped (published: drawn with weight 0, which erases an
  overlapping confident box).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from pose.align import apply_linear
from pose.render import draw_pose
from pose.skeleton import PoseSequence
from svd_common.atomic import write_json
from svd_common.errors import InputError
from svd_common.video import VIDEO_SUFFIXES, iter_frames, probe_video

from ..framing import cover_crop

logger = logging.getLogger(__name__)

DATASET_FILE = "dataset.json"
PUBLISHED_FILE = "meta_info.json"
FORMAT = {"format": "svd-animate.dataset", "version": 1}
HAND_MARGIN = 10  # px at the source size (vid_dataset.py, draw_mask)
MIN_HAND_SCORE = 0.5  # a hand counts when the mean of its keypoint scores is above this (vid_dataset.py)
MIN_POINT_SCORE = 0.3  # a keypoint counts for its hand's box above this (DWPose's visibility threshold)


# ---- prepare-data ------------------------------------------------------------------------------

def prepare_dataset(videos_dir, output, detector, cache=None, max_frames: int | None = None,
                    progress: bool = True) -> dict:
    """Extract the poses of every video in `videos_dir` (through the pose cache) into
    OUTPUT/poses/*.npz and write OUTPUT/dataset.json. Videos that fail are listed, not fatal."""
    from pose.extract import ExtractSettings, extract_video

    videos_dir, output = Path(videos_dir), Path(output)
    if not videos_dir.is_dir():
        raise InputError(f"{videos_dir}: no such folder")
    videos = sorted(p for p in videos_dir.iterdir() if p.suffix.lower() in VIDEO_SUFFIXES and not p.name.startswith("."))
    if not videos:
        raise InputError(f"{videos_dir}: no videos in it ({', '.join(sorted(VIDEO_SUFFIXES))})")
    clips, skipped = [], []
    for video in tqdm(videos, desc="prepare-data", unit="video", disable=not progress):
        try:
            poses = extract_video(video, detector, ExtractSettings(max_frames=max_frames), cache,
                                  progress=progress).poses
        except InputError as e:
            skipped.append({"video": str(video), "reason": str(e)})
            continue
        (output / "poses").mkdir(parents=True, exist_ok=True)  # only once a clip gave poses: no empty folders
        pose_file = poses.save(output / "poses" / f"{video.stem}.npz")
        clips.append({"video": str(video.resolve()), "poses": str(pose_file.relative_to(output)),
                      "frames": len(poses), "fps": poses.fps, "width": poses.width, "height": poses.height})
    if not clips:
        reasons = "; ".join(s["reason"] for s in skipped)
        raise InputError(f"{videos_dir}: no usable clip ({reasons})")
    manifest = {**FORMAT, "clips": clips, "skipped": skipped}
    write_json(output / DATASET_FILE, manifest)
    return manifest


# ---- clips ---------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Clip:
    video: Path
    frames: int
    poses: Path | None = None  # our layout
    guide: Path | None = None  # the published layout: a rendered pose video (stored BGR)
    meta: Path | None = None  # the published layout: per-frame detections (hands_boxes, hands_score)


def read_clips(dataset) -> list[Clip]:
    """The clips of a dataset folder in either layout."""
    dataset = Path(dataset)
    if not dataset.is_dir():
        raise InputError(f"{dataset}: no such dataset folder")
    if (dataset / DATASET_FILE).is_file():
        manifest = _read_json(dataset / DATASET_FILE)
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT["format"]:
            raise InputError(f"{dataset / DATASET_FILE}: not an svd-animate dataset manifest")
        return [Clip(_resolve(dataset, c["video"]), int(c["frames"]), poses=_resolve(dataset, c["poses"]))
                for c in manifest["clips"]]
    if (dataset / PUBLISHED_FILE).is_file():
        entries = _read_json(dataset / PUBLISHED_FILE)
        if not isinstance(entries, list):
            raise InputError(f"{dataset / PUBLISHED_FILE}: expected a list of {{video_path, guide_path}}")
        clips = [_published_clip(dataset, entry) for entry in entries]
        return [clip for clip in clips if clip is not None]
    raise InputError(f"{dataset}: has neither {DATASET_FILE} (from `svd-animate prepare-data`) nor {PUBLISHED_FILE}")


def _published_clip(dataset: Path, entry: dict) -> Clip | None:
    """One `meta_info.json` entry as a clip; None (with a warning) when a file it names is unusable."""
    video, guide = _resolve(dataset, entry["video_path"]), _resolve(dataset, entry["guide_path"])
    meta = _resolve(dataset, entry["meta_info"]) if entry.get("meta_info") else None
    if meta is not None and not meta.is_file():
        logger.warning("%s: no such meta_info file (clip %s skipped)", meta, video)
        return None
    try:
        frames = min(probe_video(video).num_frames, probe_video(guide).num_frames)
    except InputError as e:
        logger.warning("%s (skipped)", e)
        return None
    return Clip(video, frames, guide=guide, meta=meta)


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise InputError(f"{path}: not readable JSON ({e})") from None


def _resolve(root: Path, path: str) -> Path:
    path = Path(path)
    return path if path.is_absolute() else root / path


# ---- pure helpers ----------------------------------------------------------------------------------

def clip_span(num_frames: int, interval: int) -> int:
    """Source frames one sample covers."""
    return (num_frames - 1) * interval + 1


@dataclasses.dataclass(frozen=True)
class Framing:
    """Where a sample's target frame lies in its source: the source (`width` x `height`) resized by `scale`
    to `size`, as inference's `cover_crop` sizes the reference, then cut at (`left`, `top`)."""
    width: int
    height: int
    scale: float
    left: int
    top: int

    @property
    def size(self) -> tuple[int, int]:
        """(w, h) of the resized source, rounded as `crop_reference` rounds it."""
        return round(self.width * self.scale), round(self.height * self.scale)


def centre_framing(width: int, height: int, target_w: int, target_h: int) -> Framing:
    """Inference's framing (`framing.cover_crop`): cover the target, keep the centre."""
    scale, left, top = cover_crop(width, height, target_w, target_h)
    return Framing(width, height, scale, left, top)


def random_framing(width: int, height: int, target_w: int, target_h: int, rng: np.random.Generator) -> Framing:
    """Inference's framing with the cut anywhere along the side that overflows, instead of at the centre."""
    centre = centre_framing(width, height, target_w, target_h)
    resized_w, resized_h = centre.size
    left = int(rng.integers(0, resized_w - target_w + 1))
    top = int(rng.integers(0, resized_h - target_h + 1))
    return dataclasses.replace(centre, left=left, top=top)


def frame_image(image: np.ndarray, framing: Framing, target_w: int, target_h: int) -> np.ndarray:
    """The target frame of an RGB uint8 image, with `crop_reference`'s resize (PIL bicubic, antialiased),
    so that training sees the pixels inference feeds the model."""
    resized = np.asarray(Image.fromarray(image).resize(framing.size, Image.BICUBIC))
    return resized[framing.top:framing.top + target_h, framing.left:framing.left + target_w]


def frame_weights(weights: np.ndarray, framing: Framing, target_w: int, target_h: int) -> np.ndarray:
    """The target frame of a float loss-weight map. Area averaging, not bicubic: a weight must stay
    between the values it mixes (bicubic overshoots at a box's edge)."""
    resized = cv2.resize(weights, framing.size, interpolation=cv2.INTER_AREA)
    return resized[framing.top:framing.top + target_h, framing.left:framing.left + target_w]


def frame_poses(seq: PoseSequence, framing: Framing, target_w: int, target_h: int) -> PoseSequence:
    """Poses normalised to the source -> normalised to the target frame: `crop_poses`'s transform, at the
    framing's offset."""
    new_w, new_h = framing.width * framing.scale, framing.height * framing.scale
    return apply_linear(seq, (new_w / target_w, new_h / target_h), (-framing.left / target_w, -framing.top / target_h),
                        target_w, target_h)


def hand_weight_map(boxes, width: int, height: int, inside: float, margin: int = HAND_MARGIN) -> np.ndarray:
    """(H, W) loss weights at the source size: `inside` within each normalised box ((x0, y0), (x1, y1)),
    its corners truncated to pixels and widened by `margin` px, clipped to the frame; 1 elsewhere
    (vid_dataset.py, `draw_mask`, then 1 + 4 x mask)."""
    weights = np.ones((height, width), np.float32)
    for (x0, y0), (x1, y1) in boxes:
        left, top = max(int(x0 * width) - margin, 0), max(int(y0 * height) - margin, 0)
        right, bottom = min(int(x1 * width) + margin, width), min(int(y1 * height) + margin, height)
        weights[top:bottom, left:right] = inside
    return weights


def published_hand_boxes(detections: dict, min_score: float = MIN_HAND_SCORE) -> list:
    """The `hands_boxes` of one published meta_info frame whose hand has a mean score > `min_score`.
    The published loader also draws the other boxes, with weight 0, which erases a confident box
    where they overlap; here they are skipped."""
    if "hands_boxes" not in detections or "hands_score" not in detections:
        return []
    return [box for box, scores in zip(detections["hands_boxes"], detections["hands_score"])
            if float(np.mean(scores)) > min_score]


def pose_hand_boxes(frame: dict, min_score: float = MIN_HAND_SCORE, min_point_score: float = MIN_POINT_SCORE) -> list:
    """Normalised boxes around the confident keypoints (score > `min_point_score`) of each hand whose
    mean keypoint score is > `min_score` (our layout: boxes from the poses, as the published
    meta_info holds them)."""
    boxes = []
    for points, scores in zip(frame["hands"], frame["hands_score"]):
        confident = np.isfinite(points).all(axis=1) & (scores > min_point_score)
        if confident.any() and float(np.mean(scores)) > min_score:
            seen = points[confident]
            boxes.append((tuple(seen.min(axis=0)), tuple(seen.max(axis=0))))
    return boxes


# ---- the dataset -----------------------------------------------------------------------------------

class PoseVideoDataset(torch.utils.data.Dataset):
    """Samples of `num_frames` frames: pixels (F, 3, H, W) in [-1, 1], poses (F, 3, H, W) in [0, 1],
    reference (3, H, W) in [-1, 1] (= frame 0), hand_weights (F, H, W) (1 on frame 0)."""

    def __init__(self, dataset, num_frames: int, interval: int, width: int, height: int, seed: int = 0,
                 hand_loss_weight: float = 1.0):
        clips = read_clips(dataset)
        span = clip_span(num_frames, interval)
        self.clips = [clip for clip in clips if clip.frames >= span]
        self.too_short = len(clips) - len(self.clips)
        if self.too_short:
            logger.warning("%d of %d clips are shorter than %d frames (%d frames %d apart) and are skipped",
                           self.too_short, len(clips), span, num_frames, interval)
        if not self.clips:
            raise InputError(f"{dataset}: no usable clip: {len(clips)} clips, {self.too_short} shorter than "
                             f"{span} frames ({num_frames} frames {interval} apart)")
        self.num_frames, self.interval, self.width, self.height = num_frames, interval, width, height
        self.seed, self.hand_loss_weight = seed, hand_loss_weight
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.clips)

    def sample_rng(self, index: int) -> np.random.Generator:
        """The sample's random draws (frames, then framing) come from (seed, epoch, index) only."""
        return np.random.default_rng([self.seed, self.epoch, index])

    def choose_frames(self, index: int, rng: np.random.Generator | None = None) -> list[int]:
        """Source frame indices of a sample (position 0: the reference frame)."""
        rng = self.sample_rng(index) if rng is None else rng
        clip = self.clips[index]
        start = int(rng.integers(0, clip.frames - clip_span(self.num_frames, self.interval) + 1))
        frames = [start + k * self.interval for k in range(self.num_frames)]
        frames[0] = int(rng.integers(0, clip.frames))
        return frames

    def __getitem__(self, index: int) -> dict:
        clip = self.clips[index]
        rng = self.sample_rng(index)
        frames = self.choose_frames(index, rng)
        rgb = _read_frames(clip.video, frames)
        framing = random_framing(rgb[0].shape[1], rgb[0].shape[0], self.width, self.height, rng)
        pixels = np.stack([frame_image(f, framing, self.width, self.height) for f in rgb])
        if clip.poses is not None:
            poses = PoseSequence.load(clip.poses).select(np.array(frames))
            skeletons = self._draw(frame_poses(poses, framing, self.width, self.height))
            boxes = [pose_hand_boxes(poses.frame(t)) for t in range(len(frames))]
        else:
            skeletons = self._published_skeletons(clip, frames, framing)
            boxes = self._published_hand_boxes(clip, frames)
        pixels = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1
        return {
            "pixels": pixels,
            "poses": torch.from_numpy(skeletons).permute(0, 3, 1, 2).float() / 255.0,
            "reference": pixels[0].clone(),
            "hand_weights": torch.from_numpy(self._hand_weights(boxes, framing)),
            "index": index,
        }

    def _draw(self, poses: PoseSequence) -> np.ndarray:
        """Skeletons drawn at the training size, as inference draws them."""
        return np.stack([draw_pose(poses.frame(t), self.height, self.width) for t in range(len(poses))])

    def _published_skeletons(self, clip: Clip, frames: list[int], framing: Framing) -> np.ndarray:
        """The pose video's frames, framed like the video's, with the published BGR->RGB swap."""
        guide = _read_frames(clip.guide, frames)
        return np.stack([frame_image(np.ascontiguousarray(f[..., ::-1]), framing, self.width, self.height)
                         for f in guide])

    def _published_hand_boxes(self, clip: Clip, frames: list[int]) -> list:
        """The meta_info hand boxes of each frame (none without meta_info or without a hand weight)."""
        if clip.meta is None or self.hand_loss_weight == 1.0:
            return [[] for _ in frames]
        detections = _read_json(clip.meta)
        if not isinstance(detections, list):
            raise InputError(f"{clip.meta}: expected a list of per-frame detections")
        return [published_hand_boxes(detections[f]) if f < len(detections) else [] for f in frames]

    def _hand_weights(self, boxes: list, framing: Framing) -> np.ndarray:
        """(F, H, W): the hand weight maps built at the source size, framed like the frames; frame 0
        (the reference frame) stays 1, as published."""
        weights = np.ones((len(boxes), self.height, self.width), np.float32)
        if self.hand_loss_weight == 1.0:
            return weights
        for t, frame_boxes in enumerate(boxes[1:], start=1):
            if frame_boxes:
                source = hand_weight_map(frame_boxes, framing.width, framing.height, self.hand_loss_weight)
                weights[t] = frame_weights(source, framing, self.width, self.height)
        return weights


def _read_frames(video: Path, indices: list[int]) -> list[np.ndarray]:
    """The frames at `indices` (any order, repeats allowed), decoding the video once up to the last."""
    wanted = set(indices)
    found = {}
    for index, rgb in iter_frames(video, max_frames=max(indices) + 1):
        if index in wanted:
            found[index] = rgb
    missing = wanted - set(found)
    if missing:
        raise InputError(f"{video}: has fewer frames than its manifest says (no frame {min(missing)})")
    return [found[i] for i in indices]
