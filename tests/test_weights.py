import pickle

import pytest
import torch
from safetensors.torch import save_file

from svd_animate import cli
from svd_common.errors import WeightsError
from svd_controlnext.encoder import PoseEncoder
from svd_controlnext.weights import convert, load_pose_encoder, load_state_dict_file


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    """A controlnet.bin in the published format: a pickled OrderedDict of the 52 fp32 tensors."""
    torch.manual_seed(0)
    encoder = PoseEncoder().eval()
    folder = tmp_path_factory.mktemp("published")
    torch.save(encoder.state_dict(), folder / "controlnet.bin")
    return encoder, folder / "controlnet.bin"


def outputs_equal(a, b):
    """Same weights, same outputs (from_pretrained's parameter layout can move the last float bits)."""
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    clip = torch.rand(1, 2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        return torch.allclose(a.eval()(clip, 0.4), b.eval()(clip, 0.4), rtol=1e-5, atol=1e-5)


def test_published_bin_and_safetensors_load(published, tmp_path):
    encoder, path = published
    loaded = load_pose_encoder(path)
    assert not loaded.training  # in inference mode, as a diffusers from_pretrained model
    assert outputs_equal(loaded, encoder)
    save_file(encoder.state_dict(), str(tmp_path / "controlnet.safetensors"))
    assert outputs_equal(load_pose_encoder(tmp_path / "controlnet.safetensors"), encoder)


def test_convert_writes_a_folder_that_from_pretrained_loads(published, tmp_path):
    encoder, path = published
    out = convert(path, tmp_path / "weights")
    assert (out / "pose_encoder" / "diffusion_pytorch_model.safetensors").is_file()
    assert outputs_equal(PoseEncoder.from_pretrained(out / "pose_encoder"), encoder)
    assert outputs_equal(load_pose_encoder(out), encoder)  # the folder itself is accepted too
    assert [p.name for p in out.iterdir()] == ["pose_encoder"]  # no staging folder left


class Payload:
    """Unpickling this runs code: a checkpoint must never do that."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('x')",))


def test_pickle_with_code_is_refused_and_not_run(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "controlnet.bin"
    torch.save({"embedding.0.weight": Payload(marker)}, path)  # how a malicious checkpoint is made
    with pytest.raises(WeightsError, match=r"refused, the pickle carries code.*GLOBAL (builtins\.)?exec\); nothing was executed"):
        load_state_dict_file(path)
    with open(path, "wb") as f:  # the same in a newer pickle protocol
        pickle.dump({"embedding.0.weight": Payload(marker)}, f, protocol=4)
    with pytest.raises(WeightsError, match="not a safetensors or PyTorch checkpoint|refused"):
        load_state_dict_file(path)
    assert not marker.exists()


class SystemPayload:
    """A blocked module's function (os.system): torch words this refusal differently from `exec`'s."""

    def __reduce__(self):
        import os

        return (os.system, ("true",))


@pytest.mark.parametrize("payload", [Payload("never-written"), SystemPayload()], ids=["exec", "os.system"])
def test_refusal_never_passes_on_torchs_advice_to_load_unsafely(tmp_path, payload):
    path = tmp_path / "controlnet.bin"
    torch.save({"embedding.0.weight": payload}, path)
    with pytest.raises(WeightsError) as refused:
        load_state_dict_file(path)
    message = str(refused.value)
    assert "refused, the pickle carries code" in message and "nothing was executed" in message
    assert "weights_only" not in message and "False" not in message and len(message.splitlines()) == 1


def test_wrong_model_keys_are_named(published, tmp_path):
    encoder, _ = published
    state = dict(encoder.state_dict())
    state["scale"] = torch.tensor(1.0)  # v1 had a learned scale
    state["mid_convs.1.weight"] = torch.zeros(1280, 256, 1, 1)  # and another output width
    del state["down_res.1.conv_shortcut.bias"]
    torch.save(state, tmp_path / "v1.bin")
    with pytest.raises(WeightsError) as info:
        load_pose_encoder(tmp_path / "v1.bin")
    message = str(info.value)
    assert "missing 1 keys (down_res.1.conv_shortcut.bias)" in message
    assert "unexpected 1 keys (scale)" in message
    assert "mid_convs.1.weight has shape (1280, 256, 1, 1), expected (320, 256, 1, 1)" in message


def test_garbage_and_missing_files(tmp_path):
    (tmp_path / "junk.bin").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(WeightsError, match="not a safetensors or PyTorch checkpoint"):
        load_state_dict_file(tmp_path / "junk.bin")
    with pytest.raises(WeightsError, match="no such checkpoint file"):
        load_pose_encoder(tmp_path / "nope.bin")
    torch.save([torch.zeros(1)], tmp_path / "list.bin")
    with pytest.raises(WeightsError, match="not a plain"):
        load_state_dict_file(tmp_path / "list.bin")


def test_convert_command(published, tmp_path, capsys):
    assert cli.main(["-q", "convert", "--controlnet", str(published[1]), "-o", str(tmp_path / "w")]) == 0
    assert "pose_encoder/" in capsys.readouterr().out
    (tmp_path / "bad.bin").write_bytes(b"nope")
    assert cli.main(["-q", "convert", "--controlnet", str(tmp_path / "bad.bin"), "-o", str(tmp_path / "w2")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("svd-animate: error: ") and len(err.splitlines()) == 1
    assert not (tmp_path / "w2").exists()
