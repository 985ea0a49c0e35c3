"""Whether the Hugging Face hub can be used now, decided in seconds (shared by the pose detectors and the weights)."""

from __future__ import annotations

import os
import threading

TRUE_VALUES = {"1", "ON", "YES", "TRUE"}  # huggingface_hub's spelling of a true environment flag


def hub_offline() -> bool:
    """HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) as set now.

    huggingface_hub reads the variable once, at import; a value set later (a wrapper script, a test)
    would otherwise cost ~25 s of connection retries before the same "not cached" error.
    """
    return any(os.environ.get(name, "").strip().upper() in TRUE_VALUES for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


# One HEAD request with this deadline (DNS included) decides whether the hub answers at all; see hub_reachable.
PROBE_TIMEOUT = 5.0


def hub_endpoint() -> str:
    """$HF_ENDPOINT read now (a mirror or a private hub), else the library's default."""
    from huggingface_hub import constants

    return (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def probe_timeout() -> float:
    """$HF_HUB_ETAG_TIMEOUT when set: the hub's own knob for its first metadata request, which a user on a
    slow link raises already; else PROBE_TIMEOUT."""
    try:
        return float(os.environ.get("HF_HUB_ETAG_TIMEOUT") or PROBE_TIMEOUT)
    except ValueError:
        return PROBE_TIMEOUT


def _answers(url: str, timeout: float) -> bool:
    """One HEAD through the hub client's own session (its proxies, certificates and client factory, so the
    probe fails exactly when the download would); any status, even 401/404/5xx, is an answer."""
    from huggingface_hub.utils import get_session

    try:
        get_session().head(url, timeout=timeout)
        return True
    except Exception:
        return False


def hub_reachable(url: str, timeout: float | None = None) -> bool:
    """Does anything answer HTTP at `url` within `timeout` seconds? One request, no retries.

    huggingface_hub retries an unreachable hub with backoff (23 s of waiting with huggingface_hub 2.4 when
    DNS fails; minutes when connections hang), so an offline run would stall before falling back. The
    deadline is enforced around the whole request, DNS lookup included (a socket timeout does not cover
    it). Only this probe is short: the download itself keeps the hub's timeouts and retries, so a slow
    but working connection is not cut short.
    """
    timeout = probe_timeout() if timeout is None else timeout
    result: list[bool] = []
    thread = threading.Thread(target=lambda: result.append(_answers(url, timeout)), daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(result and result[0])


_reachable: dict[str, bool] = {}


def hub_local_only() -> bool:
    """`local_files_only` for a hub call now: offline, or the hub does not answer (probed once per process).
    Files already in the cache still load; anything else fails at once instead of after minutes of retries."""
    if hub_offline():
        return True
    endpoint = hub_endpoint()
    if endpoint not in _reachable:
        _reachable[endpoint] = hub_reachable(f"{endpoint}/api/models")
    return not _reachable[endpoint]
