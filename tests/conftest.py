import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("GLOG_minloglevel", "2")

from tests.helpers import SHARED_DATA  # noqa: E402


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    """Never touch the user's pose cache or hub cache."""
    monkeypatch.setenv("SVD_ANIMATE_CACHE", str(tmp_path / "pose-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    monkeypatch.delenv("SVD_ANIMATE_DWPOSE_DIR", raising=False)


@pytest.fixture(scope="session")
def shared_data():
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real clips not available: {SHARED_DATA} is absent (it sits beside the repo in CI)")
    return SHARED_DATA
