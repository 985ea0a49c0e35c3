"""Where svd-animate keeps what it computes once: extracted poses and converted weights.

`$SVD_ANIMATE_CACHE` moves both (poses directly in it, weights in its `weights/`); otherwise
`~/.cache/svd-animate/{poses,weights}`, with `$XDG_CACHE_HOME` honoured."""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "SVD_ANIMATE_CACHE"


def pose_cache_dir() -> Path:
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    return _user_cache() / "poses"


def weights_cache_dir() -> Path:
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]) / "weights"
    return _user_cache() / "weights"


def _user_cache() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "svd-animate"
