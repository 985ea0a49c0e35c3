"""Pose cache: extracted `PoseSequence`s keyed by the video's content and the detector settings.

Writes are atomic (unique temporary file + rename), so concurrent extractors of the same clip
never leave a corrupt entry: the last rename wins and both wrote the same poses. A corrupt entry
(a disk error, a killed copy) is treated as a miss and replaced.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

from svd_common.cache_dirs import pose_cache_dir
from svd_common.errors import InputError

from .skeleton import FORMAT_VERSION, PoseSequence

logger = logging.getLogger(__name__)

def file_digest(path, chunk_size: int = 1 << 20) -> str:
    """SHA-256 of the file's bytes: a renamed or copied clip still hits, an edited one does not."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk_size):
            digest.update(block)
    return digest.hexdigest()


def cache_key(video_digest: str, detector: str, detector_settings: dict, extract_settings: dict) -> str:
    spec = {"video": video_digest, "detector": detector, "detector_settings": detector_settings,
            "extract": extract_settings, "format": FORMAT_VERSION}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()


class PoseCache:
    def __init__(self, directory=None):
        self.directory = Path(directory) if directory else pose_cache_dir()

    def path(self, key: str) -> Path:
        return self.directory / key[:2] / f"{key}.npz"

    def get(self, key: str) -> PoseSequence | None:
        path = self.path(key)
        if not path.is_file():
            return None
        try:
            return PoseSequence.load(path)
        except InputError as e:
            logger.warning("ignoring a damaged pose cache entry: %s", e)
            return None

    def put(self, key: str, seq: PoseSequence) -> Path | None:
        path = self.path(key)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            return seq.save(path)
        except OSError as e:  # a cache that cannot be written must not fail the job
            logger.warning("pose cache not written (%s): %s", path, e)
            return None
