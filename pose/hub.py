"""The Hugging Face hub's offline switch, read when it matters (shared by the pose detectors and the weights)."""

from __future__ import annotations

import os

TRUE_VALUES = {"1", "ON", "YES", "TRUE"}  # huggingface_hub's spelling of a true environment flag


def hub_offline() -> bool:
    """HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) as set now.

    huggingface_hub reads the variable once, at import; a value set later (a wrapper script, a test)
    would otherwise cost ~25 s of connection retries before the same "not cached" error.
    """
    return any(os.environ.get(name, "").strip().upper() in TRUE_VALUES for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
