import pytest
import torch

from svd_controlnext.cross_norm import cross_normalize
from diffusers.hooks import HookRegistry

from svd_controlnext.injection import (CONTROL_HOOK, ControlConfig, ControlInjector, add_control, apply_control,
                                       inject_control)
from svd_controlnext.tiny import tiny_components, tiny_pose_encoder, tiny_unet

FRAMES = 3


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    model = tiny_unet().eval()
    model.set_default_attn_processor()
    return model


def unet_inputs(batch=1, seed=1):
    g = torch.Generator().manual_seed(seed)
    return dict(sample=torch.randn(batch, FRAMES, 8, 16, 16, generator=g), timestep=torch.tensor(0.5),
                encoder_hidden_states=torch.randn(batch, 1, 32, generator=g),
                added_time_ids=torch.tensor([[6.0, 127.0, 0.02]] * batch))


def control_for(site, batch=1, seed=2):
    torch.manual_seed(seed)
    encoder = tiny_pose_encoder(site).eval()
    with torch.no_grad():
        return encoder(torch.rand(batch, FRAMES, 3, 128, 128), 0.5)


def capture_down_block(unet):
    seen = {}
    handle = unet.down_blocks[0].register_forward_hook(lambda m, a, out: seen.update(hidden=out[0], skips=out[1]))
    return seen, handle


@torch.no_grad()
def test_down_block_site_changes_main_path_only(unet):
    control = control_for("down_blocks.0")
    seen, handle = capture_down_block(unet)
    plain_out = unet(**unet_inputs()).sample
    plain = dict(seen)
    with inject_control(unet, control, scale=1.5):
        seen_handle = unet.down_blocks[0].register_forward_hook(lambda m, a, out: seen.update(hidden=out[0], skips=out[1]))
        injected_out = unet(**unet_inputs()).sample
        seen_handle.remove()
    handle.remove()
    expected = plain["hidden"] + cross_normalize(control, plain["hidden"]) * 0.2 * 1.5
    torch.testing.assert_close(seen["hidden"], expected)
    for before, after in zip(plain["skips"], seen["skips"]):
        assert torch.equal(before, after)  # the skip connections stay untouched
    assert seen["skips"][-1] is not seen["hidden"]
    assert not torch.allclose(plain_out, injected_out)
    torch.testing.assert_close(unet(**unet_inputs()).sample, plain_out, rtol=0, atol=0)  # removed cleanly


@torch.no_grad()
def test_mid_block_site(unet):
    """The control reaches the mid block's first resnet: what the block computes on is `hidden + control`."""
    control = control_for("mid_block")
    seen = {}
    handle = unet.mid_block.resnets[0].register_forward_pre_hook(lambda module, args: seen.update(input=args[0]))
    unet(**unet_inputs())
    plain = seen["input"]
    with inject_control(unet, control, scale=1.0, site="mid_block", strength=1.0):
        unet(**unet_inputs())
    handle.remove()
    torch.testing.assert_close(seen["input"], plain + cross_normalize(control, plain))


@torch.no_grad()
def test_guidance_batch_gets_control_on_the_conditional_half_only(unet):
    control = control_for("down_blocks.0")
    single = unet_inputs(batch=1)
    doubled = {k: torch.cat([v, v]) if k != "timestep" else v for k, v in single.items()}
    plain = unet(**single).sample
    with inject_control(unet, control):
        cond_only = unet(**single).sample
        both = unet(**doubled).sample
    scale = plain.abs().max().item()  # a batch of 2 may take other kernels: tolerances scale with the values
    torch.testing.assert_close(both[:1], plain, rtol=1e-5, atol=1e-5 * scale)  # unconditional half untouched
    torch.testing.assert_close(both[1:], cond_only, rtol=1e-5, atol=1e-5 * scale)


@torch.no_grad()
def test_scale_zero_and_cleared_injector_change_nothing(unet):
    control = control_for("down_blocks.0")
    plain = unet(**unet_inputs()).sample
    with inject_control(unet, control, scale=0.0):
        torch.testing.assert_close(unet(**unet_inputs()).sample, plain, rtol=0, atol=0)
    injector = ControlInjector(unet)
    injector.set(control, 1.0)
    assert not torch.allclose(unet(**unet_inputs()).sample, plain)
    injector.clear()
    torch.testing.assert_close(unet(**unet_inputs()).sample, plain, rtol=0, atol=0)
    injector.remove()


def test_mismatched_rows_and_unknown_site(unet):
    with pytest.raises(ValueError, match="do not fit a UNet batch"):
        add_control(torch.zeros(6, 4, 2, 2), torch.zeros(4, 4, 2, 2), 0.2)
    with pytest.raises(ValueError, match="unknown injection site 'conv_in'; choose one of"):
        ControlInjector(unet, site="conv_in")
    with pytest.raises(ValueError, match="unknown injection site"):
        ControlConfig(site="up_blocks.0")


def test_apply_control_is_one_hook_per_model(unet):
    """A second `apply_control` with the same config returns the hook already there (a training loop's, used by
    its validation pipeline); another strength at the same site is refused; `remove` leaves no hook."""
    registry = HookRegistry.check_if_exists_or_initialize(unet.down_blocks[0])
    first = apply_control(unet, ControlConfig("down_blocks.0", 0.2))
    try:
        assert apply_control(unet, ControlConfig("down_blocks.0", 0.2)) is first
        assert registry.get_hook(CONTROL_HOOK).injector is first
        with pytest.raises(ValueError, match="already has a control hook"):
            apply_control(unet, ControlConfig("down_blocks.0", 1.0))
    finally:
        first.remove()
    assert registry.get_hook(CONTROL_HOOK) is None
    second = ControlInjector(unet)
    first.remove()  # an injector removed once does not take off the hook registered since
    assert registry.get_hook(CONTROL_HOOK).injector is second
    second.remove()
    assert registry.get_hook(CONTROL_HOOK) is None


@torch.no_grad()
def test_tiny_components_fit_together():
    from diffusers import AutoencoderKLTemporalDecoder, EulerDiscreteScheduler, UNetSpatioTemporalConditionModel
    from transformers import CLIPVisionModelWithProjection

    parts = tiny_components()
    assert isinstance(parts["unet"], UNetSpatioTemporalConditionModel)
    assert isinstance(parts["vae"], AutoencoderKLTemporalDecoder)
    assert isinstance(parts["image_encoder"], CLIPVisionModelWithProjection)
    assert isinstance(parts["scheduler"], EulerDiscreteScheduler)
    assert parts["scheduler"].config.prediction_type == "v_prediction"
    # 128x128 pose frames -> 16x16 latents; the tiny encoder's features inject at down_blocks.0.
    features = parts["pose_encoder"](torch.rand(1, FRAMES, 3, 128, 128), 0.5)
    assert features.shape[1] == parts["unet"].config.block_out_channels[0]
    unet = parts["unet"].eval()
    plain = unet(**unet_inputs()).sample
    with inject_control(unet, features):
        assert unet(**unet_inputs()).sample.shape == plain.shape == (1, FRAMES, 4, 16, 16)
