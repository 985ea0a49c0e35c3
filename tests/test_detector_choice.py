"""Which pose backend `load_detector` picks, and that it never waits on an unreachable hub.

No test reaches the network: the hub is either switched off (HF_HUB_OFFLINE, set by conftest),
replaced by fakes, or a silent / refusing socket on 127.0.0.1."""

import logging
import socket
import threading
import time

import pytest

import pose.detect.dwpose as dwpose
from pose.detect import load_detector
from pose.detect.dwpose import DETECTOR_FILE, HUB_REPO, POSE_FILE, hub_reachable
from svd_common.errors import WeightsError
from tests.test_dwpose import weights_dir  # noqa: F401  (fixture: tiny graphs in place of the real files)


def warnings_in(caplog):
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to reach the hub fails the test."""
    import huggingface_hub

    def forbidden(*args, **kwargs):
        pytest.fail("the hub was contacted")

    monkeypatch.setattr(dwpose, "hub_reachable", forbidden)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", forbidden)


@pytest.fixture
def online(monkeypatch, weights_dir):  # noqa: F811
    """A reachable hub whose downloads land in `weights_dir`; records what was asked."""
    import huggingface_hub

    calls = {"probe": [], "download": []}
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(dwpose, "hub_reachable", lambda url: calls["probe"].append(url) or True)

    def download(repo, filename, **kwargs):
        calls["download"].append((repo, filename, kwargs.get("endpoint")))
        return str(weights_dir / filename)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    return calls


@pytest.fixture
def hub_client_online(monkeypatch):
    """huggingface_hub reads HF_HUB_OFFLINE once at import (conftest had set it): let its client send."""
    import huggingface_hub.constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False, raising=False)


@pytest.fixture
def silent_hub(monkeypatch, hub_client_online):
    """HF_ENDPOINT pointing at a server that accepts connections and never answers; short probe."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.getsockname()[1]}")
    monkeypatch.setenv("HF_HUB_ETAG_TIMEOUT", "0.3")
    yield
    server.close()


def test_offline_auto_falls_back_to_mediapipe_with_one_warning(no_network, caplog):
    with load_detector("auto") as detector:
        assert detector.name == "mediapipe"
    (message,) = warnings_in(caplog)
    assert "\n" not in message
    assert "HF_HUB_OFFLINE" in message and "MediaPipe" in message and "weaker" in message


def test_offline_dwpose_is_a_one_line_error(no_network, caplog):
    with pytest.raises(WeightsError, match="from yzd-v/DWPose .HF_HUB_OFFLINE is set.*--dwpose-dir") as error:
        load_detector("dwpose")
    assert "\n" not in str(error.value)
    assert warnings_in(caplog) == []


def test_mediapipe_never_touches_the_network(no_network, monkeypatch, caplog):
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(dwpose, "find_weights", lambda *a, **k: pytest.fail("DWPose weights were looked up"))
    with load_detector("mediapipe") as detector:
        assert detector.name == "mediapipe"
    assert warnings_in(caplog) == []


def test_local_files_win_without_any_network(no_network, weights_dir, monkeypatch, caplog):  # noqa: F811
    monkeypatch.delenv("HF_HUB_OFFLINE")  # even online, files at hand are not fetched again
    assert load_detector("auto", dwpose_dir=weights_dir).name == "dwpose"
    monkeypatch.setenv("SVD_ANIMATE_DWPOSE_DIR", str(weights_dir))
    assert load_detector("auto").name == "dwpose"
    assert load_detector("dwpose").name == "dwpose"
    assert warnings_in(caplog) == []


def test_auto_downloads_dwpose_when_online(online, caplog):
    with load_detector("auto") as detector:
        assert detector.name == "dwpose"
    assert [(repo, name) for repo, name, _ in online["download"]] == [(HUB_REPO, DETECTOR_FILE), (HUB_REPO, POSE_FILE)]
    assert len(online["probe"]) == 1
    assert warnings_in(caplog) == []


def test_download_respects_hf_endpoint(online, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "https://mirror.example/")
    assert load_detector("dwpose").name == "dwpose"
    assert online["probe"] == [f"https://mirror.example/api/models/{HUB_REPO}"]
    assert {endpoint for *_, endpoint in online["download"]} == {"https://mirror.example"}


def test_hub_error_after_a_good_probe_falls_back_in_one_line(online, monkeypatch, caplog):
    import huggingface_hub

    def not_found(*args, **kwargs):
        raise OSError("404 Client Error.\n\nRepository Not Found")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", not_found)
    assert load_detector("auto").name == "mediapipe"
    (message,) = warnings_in(caplog)
    assert "Repository Not Found" in message and "\n" not in message
    with pytest.raises(WeightsError, match="Repository Not Found") as error:
        load_detector("dwpose")
    assert "\n" not in str(error.value)


def test_unresponsive_hub_falls_back_without_waiting(silent_hub, monkeypatch, caplog):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda *a, **k: pytest.fail("download after no answer"))
    start = time.monotonic()
    with load_detector("auto") as detector:
        assert detector.name == "mediapipe"
    with pytest.raises(WeightsError, match="127.0.0.1:[0-9]+ unreachable"):
        load_detector("dwpose")
    assert 0.5 < time.monotonic() - start < 3  # two probes that waited 0.3 s each, not the hub's retries
    (message,) = warnings_in(caplog)
    assert "unreachable" in message and "MediaPipe" in message


def test_hub_reachable_means_any_http_answer(hub_client_online):
    """A 404 is an answer (the download reports it); a refused connection is not, and is known at once."""
    from http.server import BaseHTTPRequestHandler, HTTPServer

    class NotFound(BaseHTTPRequestHandler):
        def do_HEAD(self):
            self.send_response(404)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), NotFound)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        assert hub_reachable(f"http://127.0.0.1:{server.server_port}/api/models/{HUB_REPO}", timeout=5)
    finally:
        server.shutdown()
        server.server_close()
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()
    start = time.monotonic()
    assert not hub_reachable(f"http://127.0.0.1:{port}/", timeout=5)
    assert time.monotonic() - start < 2
