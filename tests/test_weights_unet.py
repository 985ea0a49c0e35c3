"""The published `unet.bin` laid over the base model's pretrained UNet, and its conversion cache.

Published behaviour (ControlNeXt-SVD-v2/run_controlnext.py): the base's UNet by from_pretrained, then
unet.bin by load_state_dict(strict=False), so keys missing from the checkpoint keep the base's values.
"""

import logging
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from svd_common.cache_dirs import weights_cache_dir
from svd_common.errors import WeightsError
from svd_controlnext.encoder import PoseEncoder
from svd_controlnext.tiny import tiny_unet
from svd_controlnext.weights import convert, load_unet, source_key, write_safetensors
from tests.test_weights import Payload

# Randomly initialised tensors, so base, checkpoint and a fresh model all differ there.
DROPPED = ("conv_in.weight", "down_blocks.1.resnets.0.temporal_res_block.conv1.weight",
           "down_blocks.0.attentions.1.proj_in.weight")


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    """A base model folder (unet/ written by save_pretrained) and a published-format unet.bin: a pickled
    full-UNet state dict with other values, minus the DROPPED keys."""
    torch.manual_seed(0)
    base_unet = tiny_unet()
    folder = tmp_path_factory.mktemp("base")
    base_unet.save_pretrained(folder / "unet")
    torch.manual_seed(1)
    full = tiny_unet().state_dict()
    published = {k: v for k, v in full.items() if k not in DROPPED}
    torch.save(published, folder / "unet.bin")
    return folder, base_unet.state_dict(), published, full


def same_values(unet, state, dtype=torch.float32) -> bool:
    loaded = unet.state_dict()
    return loaded.keys() == state.keys() and all(torch.equal(loaded[k], v.to(dtype)) for k, v in state.items())


def assert_overlaid(unet, base_state, published, dtype=torch.float32):
    loaded = unet.state_dict()
    assert all(v.dtype == dtype for v in loaded.values())
    for key, value in published.items():
        assert torch.equal(loaded[key], value.to(dtype)), key
    for key in DROPPED:
        assert torch.equal(loaded[key], base_state[key].to(dtype)), key
    assert not unet.training and not any(p.is_meta for p in unet.parameters())


def test_missing_keys_keep_the_base_values(tiny_base, tmp_path, caplog):
    folder, base_state, published, full = tiny_base
    for key in DROPPED:  # the test means something only if base and fine-tuned values differ there
        assert not torch.equal(base_state[key], full[key])
    with caplog.at_level(logging.WARNING, logger="svd_controlnext.weights"):
        unet = load_unet(str(folder), folder / "unet.bin", cache_dir=tmp_path / "cache")
    assert_overlaid(unet, base_state, published)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and f"3 of the UNet's {len(full)} tensors are not in it" in warnings[0]
    assert "keep the base model's pretrained values" in warnings[0] and "unet.bin" in warnings[0]


def test_a_complete_checkpoint_needs_only_the_base_config(tiny_base, tmp_path):
    """Every tensor from the checkpoint: the base's weights file is never read (nor, from the hub, fetched)."""
    folder, _, _, full = tiny_base
    config_only = tmp_path / "base"
    (config_only / "unet").mkdir(parents=True)
    (config_only / "unet" / "config.json").write_text((folder / "unet" / "config.json").read_text())
    torch.save(full, tmp_path / "unet.bin")
    unet = load_unet(str(config_only), tmp_path / "unet.bin", cache_dir=tmp_path / "cache")
    assert same_values(unet, full)
    assert not unet.training and not any(p.is_meta for p in unet.parameters())


def test_the_conversion_is_cached_and_reused(tiny_base, tmp_path, monkeypatch, caplog):
    folder, base_state, published, _ = tiny_base
    cache = tmp_path / "cache"
    caplog.set_level(logging.INFO, logger="svd_controlnext.weights")
    load_unet(str(folder), folder / "unet.bin", cache_dir=cache)
    [entry] = cache.iterdir()
    assert entry.name.startswith("unet-float32-") and entry.suffix == ".safetensors"
    assert load_file(str(entry)).keys() == published.keys()
    assert "converting" in caplog.text
    stamp = entry.stat().st_mtime_ns
    caplog.clear()

    def no_pickle(*args, **kwargs):
        raise AssertionError("the pickle was read again")

    monkeypatch.setattr(torch, "load", no_pickle)
    unet = load_unet(str(folder), folder / "unet.bin", cache_dir=cache)
    assert_overlaid(unet, base_state, published)
    assert [p.name for p in cache.iterdir()] == [entry.name] and entry.stat().st_mtime_ns == stamp
    assert "using its converted copy" in caplog.text and "converting" not in caplog.text


def test_a_changed_source_is_converted_again(tiny_base, tmp_path):
    folder, base_state, published, _ = tiny_base
    cache = tmp_path / "cache"
    source = tmp_path / "unet.bin"
    torch.save(published, source)
    load_unet(str(folder), source, cache_dir=cache)
    [first] = cache.iterdir()
    killed, running = cache / ".unet-float32-0.safetensors.a.tmp", cache / ".unet-float32-0.safetensors.b.tmp"
    killed.write_bytes(b"half")
    running.write_bytes(b"half")
    os.utime(killed, (killed.stat().st_atime, killed.stat().st_mtime - 7200))
    changed = {k: v + 1 if v.is_floating_point() else v for k, v in published.items()}
    torch.save(changed, source)
    unet = load_unet(str(folder), source, cache_dir=cache)
    assert_overlaid(unet, base_state, changed)
    # the stale conversion of the same file and a killed conversion's temporary file were removed
    [second] = cache.glob("*.safetensors")
    assert second.name != first.name and not killed.exists() and running.exists()


def test_fp16_lands_in_fp16(tiny_base, tmp_path):
    folder, base_state, published, _ = tiny_base
    cache = tmp_path / "cache"
    unet = load_unet(str(folder), folder / "unet.bin", torch.float16, cache_dir=cache)
    assert_overlaid(unet, base_state, published, torch.float16)
    [entry] = cache.iterdir()
    assert entry.name.startswith("unet-float16-")
    assert all(v.dtype == torch.float16 for v in load_file(str(entry)).values())
    assert_overlaid(load_unet(str(folder), folder / "unet.bin", torch.float16, cache_dir=cache), base_state,
                    published, torch.float16)


def test_default_cache_follows_the_pose_cache_root(tiny_base, tmp_path, monkeypatch):
    folder = tiny_base[0]
    assert weights_cache_dir() == tmp_path / "pose-cache" / "weights"  # conftest sets SVD_ANIMATE_CACHE
    load_unet(str(folder), folder / "unet.bin")
    assert len(list((tmp_path / "pose-cache" / "weights").glob("unet-float32-*.safetensors"))) == 1
    monkeypatch.delenv("SVD_ANIMATE_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert weights_cache_dir() == tmp_path / "xdg" / "svd-animate" / "weights"


def test_an_unwritable_cache_still_loads(tiny_base, tmp_path, caplog):
    folder, base_state, published, _ = tiny_base
    (tmp_path / "not-a-folder").write_text("")
    with caplog.at_level(logging.WARNING, logger="svd_controlnext.weights"):
        unet = load_unet(str(folder), folder / "unet.bin", cache_dir=tmp_path / "not-a-folder")
    assert_overlaid(unet, base_state, published)
    assert "conversion cache not written" in caplog.text


def test_the_other_forms_of_unet_weights(tiny_base, tmp_path):
    folder, base_state, published, full = tiny_base
    plain = load_unet(str(folder), None)
    assert same_values(plain, base_state)
    save_file(published, str(tmp_path / "unet.safetensors"))
    assert_overlaid(load_unet(str(folder), tmp_path / "unet.safetensors", cache_dir=tmp_path / "cache"), base_state,
                    published)
    assert not (tmp_path / "cache").exists()  # a safetensors file is used as it is
    holder = tmp_path / "holder"
    holder.mkdir()
    torch.save(published, holder / "unet.bin")
    assert_overlaid(load_unet(str(folder), holder, cache_dir=tmp_path / "cache"), base_state, published)
    torch.manual_seed(1)
    tiny_unet().save_pretrained(tmp_path / "weights" / "unet")  # what `convert` or training writes
    for source in (tmp_path / "weights", tmp_path / "weights" / "unet"):
        unet = load_unet(str(folder), source, torch.float16)
        assert same_values(unet, full, torch.float16)


def one_line_error(info, path):
    message = str(info.value)
    assert len(message.splitlines()) == 1 and str(path) in message
    return message


def test_a_checkpoint_of_another_model_is_named(tiny_base, tmp_path):
    folder, _, published, _ = tiny_base
    torch.save(PoseEncoder().state_dict(), tmp_path / "unet.bin")
    with pytest.raises(WeightsError) as info:
        load_unet(str(folder), tmp_path / "unet.bin", cache_dir=tmp_path / "cache")
    message = one_line_error(info, tmp_path / "unet.bin")
    assert "not an SVD UNet checkpoint for" in message and "unexpected 48 keys (embedding.0.weight" in message
    assert "time_embedding.linear_1.weight has shape (256, 128), expected (128, 32)" in message  # a shared name
    torch.save({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1)}, tmp_path / "ldm.bin")
    with pytest.raises(WeightsError, match="none of its keys is a UNet key; unexpected 1 keys"):
        load_unet(str(folder), tmp_path / "ldm.bin", cache_dir=tmp_path / "cache")
    state = dict(published)
    state["conv_out.weight"] = torch.zeros(4, 64, 3, 3)
    state["controlnext.extra"] = torch.zeros(1)
    torch.save(state, tmp_path / "other.bin")
    with pytest.raises(WeightsError) as info:
        load_unet(str(folder), tmp_path / "other.bin", cache_dir=tmp_path / "cache")
    message = one_line_error(info, tmp_path / "other.bin")
    assert "unexpected 1 keys (controlnext.extra)" in message
    assert "conv_out.weight has shape (4, 64, 3, 3), expected (4, 32, 3, 3)" in message
    torch.save({}, tmp_path / "empty.bin")
    with pytest.raises(WeightsError, match="it holds no tensors"):
        load_unet(str(folder), tmp_path / "empty.bin", cache_dir=tmp_path / "cache")
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())  # nothing converted


def test_a_pickle_carrying_code_is_refused(tiny_base, tmp_path):
    folder = tiny_base[0]
    marker = tmp_path / "pwned"
    torch.save({"conv_in.weight": Payload(marker)}, tmp_path / "unet.bin")
    with pytest.raises(WeightsError, match="refused, the pickle carries code.*nothing was executed"):
        load_unet(str(folder), tmp_path / "unet.bin", cache_dir=tmp_path / "cache")
    assert not marker.exists()
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())


def test_a_bad_base_folder_is_named(tiny_base, tmp_path):
    folder = tiny_base[0]
    with pytest.raises(WeightsError, match=r"no unet/config.json in it"):
        load_unet(str(tmp_path), folder / "unet.bin")
    with pytest.raises(WeightsError, match="no such checkpoint file"):
        load_unet(str(folder), tmp_path / "missing.bin")


def test_write_safetensors_is_read_back_exactly(tmp_path):
    state = {"f": torch.randn(3, 5), "scalar": torch.tensor(2.5), "empty": torch.zeros(0, 4),
             "bf": torch.randn(7, dtype=torch.bfloat16), "ints": torch.arange(6).reshape(2, 3),
             "mask": torch.tensor([True, False, True]), "view": torch.randn(4, 6)[:, 1:3]}
    write_safetensors(state, tmp_path / "a.safetensors", torch.float16, {"source": "test"})
    back = load_file(str(tmp_path / "a.safetensors"))
    assert back.keys() == state.keys()
    for key, value in state.items():
        expected = value.half() if value.is_floating_point() else value
        assert back[key].dtype == expected.dtype and torch.equal(back[key], expected), key


def test_source_key_follows_content_and_dtype(tmp_path):
    torch.save({"w": torch.zeros(3)}, tmp_path / "a.bin")
    (tmp_path / "copy.bin").write_bytes((tmp_path / "a.bin").read_bytes())
    torch.save({"w": torch.ones(3)}, tmp_path / "changed.bin")
    key = source_key(tmp_path / "a.bin", torch.float32)
    assert source_key(tmp_path / "copy.bin", torch.float32) == key  # a copy (new mtime) hits the same entry
    assert source_key(tmp_path / "changed.bin", torch.float32) != key
    assert source_key(tmp_path / "a.bin", torch.float16) != key


def test_convert_writes_the_overlaid_unet(tiny_base, tmp_path):
    from diffusers import UNetSpatioTemporalConditionModel

    folder, base_state, published, _ = tiny_base
    torch.manual_seed(0)
    torch.save(PoseEncoder().state_dict(), tmp_path / "controlnet.bin")
    out = convert(tmp_path / "controlnet.bin", tmp_path / "weights", unet=folder / "unet.bin", base=str(folder))
    assert_overlaid(UNetSpatioTemporalConditionModel.from_pretrained(out / "unet"), base_state, published)
    assert not (tmp_path / "pose-cache" / "weights").exists()  # convert's output is the conversion
