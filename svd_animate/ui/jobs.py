"""The work behind the web page, without Gradio: what step 1 (poses) and step 2 (animate) do.

One `JobRunner` per server process keeps one `Animator`, so the models load once and stay loaded while the
visitors' settings leave the model choice alone. Each job writes into its own folder under the output folder,
built under a hidden `.partial` name and renamed when the job has finished: a failed or cancelled job leaves
nothing behind, and every file in it is written atomically as the CLI writes it.
"""

from __future__ import annotations

import dataclasses
import gc
import itertools
import logging
import re
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable

import torch

from pose.preview import write_preview
from svd_common.atomic import publish_folder
from svd_common.errors import Cancelled, InputError
from svd_common.video import is_image_path, probe_video, read_image

from ..animate import Animator, extract_settings, job_config, saved_poses
from ..config import LOAD_KEYS, TINY, AnimateConfig
from ..options import config_from_values
from ..run import RunSettings

logger = logging.getLogger(__name__)

# on_progress(stage, done, total): stage is "poses", "preview", "sampling" or "decoding"; total may be None
Progress = Callable[[str, int, "int | None"], None]

POSES_FILE = "poses.npz"
STALE_AFTER_S = 6 * 3600
PREVIEW_FILE = "pose_preview.mp4"


@dataclasses.dataclass
class PoseJob:
    folder: Path
    poses: Path
    preview: Path
    frames: int
    fps: float
    summary: str


@dataclasses.dataclass
class AnimationJob:
    folder: Path
    video: Path
    poses: Path
    frames: int
    fps: float
    seed: int
    summary: str
    random_weights: bool = False  # the tiny preset: the pixels are noise


class CancelFlag:
    """Set by the Cancel button, checked by the running job after every frame and step."""

    def __init__(self):
        self._event = threading.Event()

    def cancel(self) -> None:
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    def check(self) -> None:
        if self._event.is_set():
            raise Cancelled("cancelled: the job was stopped and nothing was written")


def _stem(path: Path) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "-", path.stem)[:40] or "job"


class JobRunner:
    """Runs the page's jobs one at a time with models loaded once. `fixed` holds the server's own settings
    (`svd-animate ui --weights/--device/--detector/...`), which a visitor's values cannot change."""

    def __init__(self, output_dir: Path, weights: Path | None = None, device: str | None = None,
                 cache_dir: Path | None = None, dwpose_dir: Path | None = None, fixed: dict | None = None,
                 progress: bool = False):
        self.output_dir = Path(output_dir)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        for stale in self.output_dir.glob(".*.partial"):  # jobs of a server killed mid-job (not another's running)
            if time.time() - stale.stat().st_mtime > STALE_AFTER_S:
                shutil.rmtree(stale, ignore_errors=True)
        self.run = RunSettings(weights=weights, device=device, cache_dir=cache_dir, dwpose_dir=dwpose_dir,
                               progress=progress)
        self.fixed = {key: value for key, value in (fixed or {}).items() if value is not None}
        self.progress = progress
        self._animator: Animator | None = None
        self._lock = threading.Lock()  # one job at a time, whatever the page's queue does
        self._numbers = itertools.count(1)

    def config(self, values: dict) -> AnimateConfig:
        """The page's values (None: not given) over the preset, as the CLI makes a config from its flags."""
        return config_from_values({**values, **self.fixed})

    def animator(self, config: AnimateConfig) -> Animator:
        """The loaded models when `config` keeps them, else new ones (the old ones are let go first)."""
        if self._animator is not None:
            same = all(getattr(config, key) == getattr(self._animator.config, key) for key in LOAD_KEYS)
            if same:
                self._animator.reconfigure(config)
                return self._animator
            self.close()  # the old models go before the new ones load (two would not fit on one GPU)
        self._animator = Animator(config, self.run)
        return self._animator

    def close(self) -> None:
        if self._animator is not None:
            self._animator.close()
            self._animator = None
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    def poses(self, reference, video, values: dict, on_progress: Progress | None = None,
              cancel: CancelFlag | None = None) -> PoseJob:
        """Step 1: the driving poses aligned to the reference, saved, and the preview video
        (source | skeleton | skeleton over the reference)."""
        report = self._reporter(on_progress, cancel)
        with _JobFolder(self, reference, video, values) as job:
            stages = job.animator.job(reference, video, on_progress=report)
            stages.check()
            poses = saved_poses(stages.poses(), Path(reference), job.config)
            poses.save(job.folder / POSES_FILE)
            write_preview(job.folder / PREVIEW_FILE, video, poses, extract_settings(job.config), read_image(reference),
                          progress=self.progress, on_frame=lambda done, total: report("preview", done, total))
        summary = f"{len(poses)} frames at {poses.fps:g} fps, align {job.config.align}"
        return PoseJob(job.final, job.final / POSES_FILE, job.final / PREVIEW_FILE, len(poses), poses.fps, summary)

    def animate(self, reference, video, values: dict, on_progress: Progress | None = None,
                cancel: CancelFlag | None = None) -> AnimationJob:
        """Step 2: the animation (with the driving clip's audio), and the poses it followed."""
        report = self._reporter(on_progress, cancel)
        side_by_side = bool(values.get("side_by_side"))
        with _JobFolder(self, reference, video, values) as job:
            name = f"{_stem(Path(video))}_{_stem(Path(reference))}.mp4"
            result = job.animator(reference, video, job.folder / name, side_by_side=side_by_side, on_progress=report)
            saved_poses(result.poses, Path(reference), job.config).save(job.folder / POSES_FILE)
        audio = ", with the driving clip's audio" if result.audio else ""
        summary = f"{result.frames} frames at {result.fps:g} fps{audio}, seed {result.seed}"
        return AnimationJob(job.final, job.final / name, job.final / POSES_FILE, result.frames, result.fps,
                            result.seed, summary, job.config.base_model == TINY)

    @staticmethod
    def _reporter(on_progress: Progress | None, cancel: CancelFlag | None) -> Progress:
        def report(stage: str, done: int, total: int | None) -> None:
            if cancel is not None:
                cancel.check()
            if on_progress is not None:
                on_progress(stage, done, total)

        return report


class _JobFolder:
    """A job's setup and its folder: checks the inputs before anything loads, takes the one-job lock, builds
    the folder under a hidden name and renames it when the job ends well (removes it otherwise)."""

    def __init__(self, runner: JobRunner, reference, video, values: dict):
        self.runner, self.values = runner, values
        self.reference, self.video = Path(reference or ""), Path(video or "")

    def __enter__(self) -> "_JobFolder":
        config = self.runner.config(self.values)
        for path, what in ((self.reference, "reference image"), (self.video, "driving video")):
            if not path.is_file():
                raise InputError(f"no {what}: upload one, or pick an example")
        if is_image_path(self.video):
            raise InputError(f"{self.video.name}: is an image; the driving input must be a video")
        probe_video(self.video)  # not a video: one line now, before any model loads
        self.config = job_config(config, self.video)  # the job's own (--fps as this clip's stride), for the summary
        self.runner._lock.acquire()
        try:
            self.animator = self.runner.animator(self.config)
            name = f"{time.strftime('%Y%m%d-%H%M%S')}-{next(self.runner._numbers):03d}-{_stem(self.video)}"
            self.folder = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".partial", dir=self.runner.output_dir))
            self.final = self.runner.output_dir / name
        except BaseException:
            self.runner._lock.release()
            raise
        return self

    def __exit__(self, kind, error, trace):
        try:
            if kind is None:
                for n in itertools.count(2):  # another server on this folder, or a restart within the second
                    if not self.final.exists():
                        break
                    self.final = self.final.with_name(f"{self.final.name.rsplit('~', 1)[0]}~{n}")
                publish_folder(self.folder, self.final)
        finally:
            shutil.rmtree(self.folder, ignore_errors=True)  # (gone already when published)
            self.runner._lock.release()
        return False
