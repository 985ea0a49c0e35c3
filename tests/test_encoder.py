from pathlib import Path

import pytest
import torch

from svd_controlnext.encoder import PoseEncoder

MANIFEST = Path(__file__).parent / "data" / "controlnext_svd_v2_controlnet_keys.tsv"


def published_keys():
    rows = [line.split("\t") for line in MANIFEST.read_text().splitlines() if line]
    return {key: tuple(int(d) for d in shape.split("x")) for key, shape in rows}


def test_state_dict_is_the_published_controlnet_bin():
    encoder = PoseEncoder()
    state = encoder.state_dict()
    assert {k: tuple(v.shape) for k, v in state.items()} == published_keys()
    assert sum(p.numel() for p in encoder.parameters()) == 3_526_400
    # The published checkpoint's keys load strictly.
    PoseEncoder().load_state_dict({k: torch.zeros(s) for k, s in published_keys().items()}, strict=True)


@pytest.mark.parametrize("padding, size", [(0, (15, 7)), (1, (16, 8))])
def test_output_shape_per_padding_variant(padding, size):
    # 128x64 input: stride-2 conv -> 64x32; two 3x3 convs pad 0 -> 60x28 (pad 1 keeps 64x32); two downsamples.
    encoder = PoseEncoder(embedding_padding=padding).eval()
    with torch.no_grad():
        out = encoder(torch.rand(2, 3, 3, 128, 64), torch.tensor(0.5))
    assert out.shape == (6, 320, *size)


def test_timestep_is_per_batch_item_and_matters():
    torch.manual_seed(0)
    encoder = PoseEncoder().eval()
    clip = torch.rand(1, 2, 3, 64, 64)
    with torch.no_grad():
        both = encoder(torch.cat([clip, clip]), torch.tensor([0.1, 1.5]))
        first = encoder(clip, 0.1)
        second = encoder(clip, 1.5)
    torch.testing.assert_close(both[:2], first)
    torch.testing.assert_close(both[2:], second)
    assert not torch.allclose(first, second)


def test_temporal_layers_start_as_the_published_encoder():
    torch.manual_seed(0)
    plain = PoseEncoder().eval()
    temporal = PoseEncoder(temporal_layers=True).eval()
    missing, unexpected = temporal.load_state_dict(plain.state_dict(), strict=False)
    assert unexpected == [] and all(k.startswith("temporal.") for k in missing)
    clip = torch.rand(1, 4, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(temporal(clip, 0.3), plain(clip, 0.3))


def test_frames_mix_only_with_temporal_layers():
    torch.manual_seed(0)
    clip = torch.rand(1, 3, 3, 64, 64)
    changed = clip.clone()
    changed[0, 0] = torch.rand(3, 64, 64)  # only frame 0 differs
    plain = PoseEncoder().eval()
    temporal = PoseEncoder(temporal_layers=True).eval()
    temporal.load_state_dict(plain.state_dict(), strict=False)
    for mixer in temporal.temporal:  # as if fine-tuned
        torch.nn.init.normal_(mixer.conv_out.weight, std=0.1)
    with torch.no_grad():
        torch.testing.assert_close(plain(clip, 0.3)[1:], plain(changed, 0.3)[1:])  # frames independent
        assert not torch.allclose(temporal(clip, 0.3)[1], temporal(changed, 0.3)[1])  # frame 1 sees frame 0


def test_save_and_load_pretrained_round_trip(tmp_path):
    torch.manual_seed(0)
    encoder = PoseEncoder(temporal_layers=True, injection_site="mid_block", control_strength=1.0)
    encoder.save_pretrained(tmp_path / "pose_encoder")
    assert (tmp_path / "pose_encoder" / "diffusion_pytorch_model.safetensors").is_file()
    loaded = PoseEncoder.from_pretrained(tmp_path / "pose_encoder").eval()
    assert loaded.config.injection_site == "mid_block" and loaded.config.control_strength == 1.0
    clip = torch.rand(1, 2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(clip, 0.7), encoder.eval()(clip, 0.7))


def test_bad_config():
    with pytest.raises(ValueError, match="injection_site"):
        PoseEncoder(injection_site="up_blocks.1")
    with pytest.raises(ValueError, match="embedding_padding"):
        PoseEncoder(embedding_padding=2)
