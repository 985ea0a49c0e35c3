"""Hub failures as one actionable line, and an offline run that does not touch the network."""

import importlib

import huggingface_hub
import pytest
from huggingface_hub import errors as hub
from huggingface_hub.utils import hf_raise_for_status

from svd_common.errors import WeightsError
from svd_controlnext.weights import BASE_MODEL, UNET_FILE, hub_error_message, load_unet, resolve_file

# the HTTP client huggingface_hub answers with (httpx2 in huggingface_hub 2.x)
http = importlib.import_module(hub.HfHubHTTPError.__mro__[1].__module__.split(".")[0])


def hub_error(status: int, code: str | None, url: str) -> Exception:
    """The exception huggingface_hub raises for this hub answer (built by its own status parser)."""
    headers = {"X-Error-Code": code} if code else {}
    response = http.Response(status, headers=headers, request=http.Request("GET", url))
    with pytest.raises(hub.HfHubHTTPError) as info:
        hf_raise_for_status(response)
    return info.value


def one_line(message: str) -> str:
    assert len(message.splitlines()) == 1
    return message


def test_a_gated_model_says_accept_the_licence_and_log_in():
    gated = hub_error(401, "GatedRepo", f"https://huggingface.co/api/models/{BASE_MODEL}")
    assert isinstance(gated, hub.GatedRepoError)
    message = one_line(hub_error_message(gated, BASE_MODEL))
    assert f"accept its licence at https://huggingface.co/{BASE_MODEL}" in message
    assert "HF_TOKEN" in message and "hf auth login" in message
    try:  # diffusers re-raises hub errors as OSError; the cause is still found
        try:
            raise gated
        except hub.RepositoryNotFoundError:
            raise OSError(f"{BASE_MODEL} is not a local folder and is not a valid model identifier") from None
    except OSError as wrapped:
        assert hub_error_message(wrapped, BASE_MODEL) == message


def test_not_found_and_offline_messages(monkeypatch):
    repo = "someone/nothing-here"
    missing_repo = hub_error(404, "RepoNotFound", f"https://huggingface.co/api/models/{repo}")
    assert "not found on the hub" in one_line(hub_error_message(missing_repo, repo))
    url = f"https://huggingface.co/{repo}/resolve/main/{UNET_FILE}"
    missing_file = hub_error(404, "EntryNotFound", url)
    assert f"file was not found in this hub repository ({url})" in one_line(hub_error_message(missing_file, repo))
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    unreachable = hub.LocalEntryNotFoundError("An error happened while trying to locate the file on the Hub")
    assert "offline (huggingface.co cannot be reached)" in one_line(hub_error_message(unreachable, repo))
    assert "offline" in hub_error_message(ConnectionError("Name or service not known"), repo)


def test_offline_fails_at_once_without_the_network(monkeypatch, tmp_path):
    """HF_HUB_OFFLINE=1 set after huggingface_hub was imported (as conftest does) is still honoured:
    no metadata request, so none of the ~25 s of retries an unreachable hub costs."""
    import huggingface_hub.file_download as download

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)  # as if read before the variable was set
    requests = []
    monkeypatch.setattr(download, "get_hf_file_metadata", lambda *a, **k: requests.append(a) or pytest.fail("network"))
    with pytest.raises(WeightsError) as info:
        resolve_file(None, UNET_FILE)
    message = one_line(str(info.value))
    assert message.startswith(f"cannot fetch ControlNeXt-SVD/v2/{UNET_FILE}: Pbihao/ControlNeXt is not in the local")
    assert "offline (HF_HUB_OFFLINE=1 is set)" in message
    with pytest.raises(WeightsError, match=f"cannot load the UNet of the base model {BASE_MODEL}: .*offline"):
        load_unet(BASE_MODEL, None)
    (tmp_path / "unet.bin").write_bytes(b"")
    with pytest.raises(WeightsError, match=f"cannot read the UNet config of the base model {BASE_MODEL}: .*offline"):
        load_unet(BASE_MODEL, tmp_path / "unet.bin")
    assert requests == []


def test_a_gated_base_model_through_load_unet(monkeypatch):
    from diffusers import UNetSpatioTemporalConditionModel

    gated = hub_error(401, "GatedRepo", f"https://huggingface.co/api/models/{BASE_MODEL}")

    def refuse(*args, **kwargs):
        try:
            raise gated
        except hub.HfHubHTTPError:
            raise OSError("There was a specific connection error when trying to load the model") from None

    monkeypatch.setattr(UNetSpatioTemporalConditionModel, "from_pretrained", refuse)
    with pytest.raises(WeightsError) as info:
        load_unet(BASE_MODEL, None)
    message = one_line(str(info.value))
    assert "is a gated model: accept its licence" in message and "hf auth login" in message


def test_an_unreachable_hub_fails_at_once_without_hf_hub_offline(monkeypatch):
    """No HF_HUB_OFFLINE, but the hub does not answer the one short probe: every hub call becomes local-only,
    so there are none of huggingface_hub's minutes of retries, and the line says the hub cannot be reached."""
    import huggingface_hub.file_download as download

    import svd_common.hub

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(svd_common.hub, "_reachable", {})
    probes = []
    monkeypatch.setattr(svd_common.hub, "hub_reachable", lambda url: probes.append(url) or False)
    monkeypatch.setattr(download, "get_hf_file_metadata", lambda *a, **k: pytest.fail("network"))
    for _ in range(2):
        with pytest.raises(WeightsError) as info:
            resolve_file(None, UNET_FILE)
        assert "huggingface.co cannot be reached" in one_line(str(info.value))
    assert len(probes) == 1  # probed once per process
