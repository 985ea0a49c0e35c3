import numpy as np
import pytest
import torch
from diffusers import StableVideoDiffusionPipeline
from diffusers.hooks import HookRegistry

from svd_controlnext.injection import CONTROL_HOOK
from svd_controlnext.pipeline import ControlNeXtSVDPipeline
from svd_controlnext.tiny import tiny_components

FRAMES, SIZE, STEPS = 4, 32, 3


@pytest.fixture(scope="module")
def components():
    parts = tiny_components()
    for name in ("unet", "vae"):
        parts[name].set_default_attn_processor()
    for name in ("unet", "vae", "image_encoder", "pose_encoder"):
        parts[name].eval()
    return parts


def reference_image():
    """A PIL image, as users pass it: diffusers resizes it for CLIP (a tensor would have to be 224 already)."""
    from PIL import Image

    pixels = torch.randint(0, 256, (SIZE, SIZE, 3), generator=torch.Generator().manual_seed(5), dtype=torch.uint8)
    return Image.fromarray(pixels.numpy())


def call_kwargs(**overrides):
    kwargs = dict(height=SIZE, width=SIZE, num_frames=FRAMES, num_inference_steps=STEPS, min_guidance_scale=1.0,
                  max_guidance_scale=2.5, output_type="pt", generator=torch.Generator().manual_seed(0))
    kwargs.update(overrides)
    return kwargs


def pose_frames(frames=FRAMES, size=SIZE * 4, seed=7):
    return torch.rand(frames, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_without_control_equals_diffusers_svd(components):
    parts = {k: v for k, v in components.items() if k != "pose_encoder"}
    expected = StableVideoDiffusionPipeline(**parts)(reference_image(), **call_kwargs()).frames
    ours = ControlNeXtSVDPipeline(**parts)(reference_image(), **call_kwargs()).frames
    assert ours.shape == expected.shape == (1, FRAMES, 3, SIZE, SIZE)
    assert (ours - expected).abs().max() <= 1e-5
    # An encoder at scale 0 is the same as none.
    zero = ControlNeXtSVDPipeline(**components)(reference_image(), pose_frames(), control_scale=0.0,
                                                **call_kwargs()).frames
    assert (zero - expected).abs().max() <= 1e-5


def test_control_scale_really_scales_and_encoder_runs_once_per_step(components):
    pipe = ControlNeXtSVDPipeline(**components)
    plain = pipe(reference_image(), **call_kwargs(output_type="latent")).frames
    result = pipe(reference_image(), pose_frames(), control_scale=0.5, **call_kwargs(output_type="latent"))
    weak = result.frames
    assert result.counts.control_calls == STEPS  # one window: once per step, on the conditional frames only
    strong = pipe(reference_image(), pose_frames(), control_scale=2.0, **call_kwargs(output_type="latent")).frames
    assert not torch.allclose(weak, plain) and not torch.allclose(weak, strong)
    assert (strong - plain).abs().mean() > (weak - plain).abs().mean()
    assert not pipe._injector.active  # nothing left attached between runs


def test_windows_cover_a_longer_video(components):
    pipe = ControlNeXtSVDPipeline(**components)
    result = pipe(reference_image(), pose_frames(7), window_size=4, window_overlap=2,
                  **call_kwargs(num_frames=7, output_type="np"))
    frames = result.frames
    assert frames.shape == (1, 7, SIZE, SIZE, 3) and np.isfinite(frames).all()
    assert result.counts.control_calls == STEPS * 3  # windows (0,4) (2,6) (3,7)
    assert result.counts.control_frames == STEPS * 7  # 4 + 2 + 1: overlapping frames are encoded once per step
    published = pipe(reference_image(), pose_frames(7), window_size=4, window_overlap=2, fusion="uniform",
                     reference_pose_in_every_window=True, **call_kwargs(num_frames=7, output_type="np")).frames
    assert published.shape == frames.shape and not np.allclose(published, frames)


def test_mismatched_pose_count(components):
    with pytest.raises(ValueError, match="got 3 pose frames for 4 video frames"):
        ControlNeXtSVDPipeline(**components)(reference_image(), pose_frames(3), **call_kwargs())


def test_save_and_load_pretrained(components, tmp_path):
    pipe = ControlNeXtSVDPipeline(**components)
    pipe.save_pretrained(tmp_path / "pipe")
    loaded = ControlNeXtSVDPipeline.from_pretrained(tmp_path / "pipe")
    assert (tmp_path / "pipe" / "pose_encoder" / "diffusion_pytorch_model.safetensors").is_file()
    for name in ("pose_encoder", "unet", "vae"):  # every weight survives the round trip
        saved, back = getattr(pipe, name).state_dict(), getattr(loaded, name).state_dict()
        assert saved.keys() == back.keys() and all(torch.equal(saved[k], back[k]) for k in saved), name


def test_plain_svd_folder_plus_a_pose_encoder(components, tmp_path):
    """How users load it: the SVD base model's folder, with our encoder passed in."""
    parts = {k: v for k, v in components.items() if k != "pose_encoder"}
    StableVideoDiffusionPipeline(**parts).save_pretrained(tmp_path / "svd")
    pipe = ControlNeXtSVDPipeline.from_pretrained(tmp_path / "svd", pose_encoder=components["pose_encoder"])
    assert pipe.pose_encoder is components["pose_encoder"]
    result = pipe(reference_image(), pose_frames(), **call_kwargs(output_type="latent"))
    assert result.frames.shape == (1, FRAMES, 4, SIZE // 2, SIZE // 2) and result.counts.control_calls == STEPS


def test_uint8_frames_equal_float_frames(components):
    """uint8 (F, H, W, 3) frames are converted per window; the result equals passing floats in [0, 1]."""
    frames = (pose_frames() * 255).round().to(torch.uint8)  # (F, 3, H, W)
    as_numpy = frames.permute(0, 2, 3, 1).numpy()
    pipe = ControlNeXtSVDPipeline(**components)
    from_uint8 = pipe(reference_image(), as_numpy, **call_kwargs(output_type="latent")).frames
    from_float = pipe(reference_image(), frames.float() / 255.0, **call_kwargs(output_type="latent")).frames
    torch.testing.assert_close(from_uint8, from_float, rtol=0, atol=0)


def test_model_cpu_offload_gives_the_same_frames(components):
    """accelerate's offload hooks wrap each model's forward; the control hook on the UNet's block must
    still see its features (moved to the block's device) and the result must not change."""
    expected = ControlNeXtSVDPipeline(**tiny_components())(reference_image(), pose_frames(),
                                                           **call_kwargs(output_type="latent")).frames
    pipe = ControlNeXtSVDPipeline(**tiny_components())
    pipe.enable_model_cpu_offload(device="cpu")  # the same hooks as on a GPU, with the CPU as accelerator
    try:
        result = pipe(reference_image(), pose_frames(), **call_kwargs(output_type="latent"))
    finally:
        pipe.remove_all_hooks()
    offloaded = result.frames
    assert result.counts.control_calls == STEPS
    torch.testing.assert_close(offloaded, expected, rtol=1e-6, atol=1e-6 * expected.abs().max().item())


def test_sequential_offload_gives_the_same_frames(components):
    """--offload sequential: diffusers installs accelerate's `cpu_offload` on each model (weights on the meta
    device, each layer's moved in for its own forward). On the UNet, the pose encoder and the VAE the control
    path is unchanged. (CLIP is left out: with the CPU as both devices, accelerate fails to re-wrap one of its
    parameters; on a GPU this is diffusers' usual SVD path.)"""
    from accelerate import cpu_offload

    expected = ControlNeXtSVDPipeline(**tiny_components())(reference_image(), pose_frames(),
                                                           **call_kwargs(output_type="latent")).frames
    pipe = ControlNeXtSVDPipeline(**tiny_components())
    for name in ("unet", "pose_encoder", "vae"):
        cpu_offload(getattr(pipe, name), execution_device=torch.device("cpu"))
    assert {p.device.type for p in pipe.unet.parameters()} == {"meta"}
    result = pipe(reference_image(), pose_frames(), **call_kwargs(output_type="latent"))
    offloaded = result.frames
    assert result.counts.control_calls == STEPS
    torch.testing.assert_close(offloaded, expected, rtol=1e-6, atol=1e-6 * expected.abs().max().item())


def test_compiled_unet_has_no_graph_break_and_no_recompile():
    """`unet.compile(fullgraph=True)` fails on any graph break; one graph for all steps and windows
    shows that setting new control features does not re-trace."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    kwargs = call_kwargs(num_frames=6, output_type="latent", window_size=4, window_overlap=2)
    expected = ControlNeXtSVDPipeline(**tiny_components())(reference_image(), pose_frames(6), **kwargs).frames
    pipe = ControlNeXtSVDPipeline(**tiny_components())
    torch._dynamo.reset()
    counters.clear()
    pipe.unet.compile(backend="eager", fullgraph=True)
    kwargs["generator"] = torch.Generator().manual_seed(0)
    result = pipe(reference_image(), pose_frames(6), **kwargs)
    compiled = result.frames
    assert result.counts.control_calls == STEPS * 2
    assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"]
    torch.testing.assert_close(compiled, expected, rtol=1e-6, atol=1e-6 * expected.abs().max().item())
    torch._dynamo.reset()


def test_overlap_features_reused_equal_encoding_every_window(components):
    """An encoder with (zero-initialised, so identity) temporal layers must encode every window in
    full; its frames equal those of the plain encoder, which encodes each frame once per step."""
    from svd_controlnext.tiny import tiny_pose_encoder

    temporal = tiny_pose_encoder(temporal_layers=True)
    temporal.load_state_dict(components["pose_encoder"].state_dict(), strict=False)
    kwargs = dict(window_size=4, window_overlap=2, **call_kwargs(num_frames=7, output_type="latent"))
    reused = ControlNeXtSVDPipeline(**components)
    once = reused(reference_image(), pose_frames(7), **kwargs)
    kwargs["generator"] = torch.Generator().manual_seed(0)
    every = ControlNeXtSVDPipeline(**{**components, "pose_encoder": temporal})
    full = every(reference_image(), pose_frames(7), **kwargs)
    assert (once.counts.control_frames, full.counts.control_frames) == (STEPS * 7, STEPS * 12)
    once, full = once.frames, full.frames
    # Same arithmetic on batches of other shapes: float32 rounding only, which differs between CPUs
    # (1.0e-5 seen on one); a bound relative to the latents' size holds on any of them.
    tolerance = 1e-5 * (1 + once.abs().max().item())
    torch.testing.assert_close(once, full, rtol=1e-5, atol=tolerance)
    kwargs["generator"] = torch.Generator().manual_seed(0)
    published = reused(reference_image(), pose_frames(7), reference_pose_in_every_window=True, **kwargs).frames
    kwargs["generator"] = torch.Generator().manual_seed(0)
    published_full = every(reference_image(), pose_frames(7), reference_pose_in_every_window=True, **kwargs).frames
    torch.testing.assert_close(published, published_full, rtol=1e-5, atol=tolerance)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_stays_close_to_fp32(dtype):
    """Stated bound for half precision: frames in [0, 1] within 0.05 (13 grey levels) everywhere and
    0.01 on average of the fp32 frames (measured on the tiny components: bf16 0.025 and 0.0035, fp16
    0.0035 and 0.0004). fp16 also runs the VAE encoder upcast to fp32, as diffusers' SVD pipeline does."""
    kwargs = call_kwargs(max_guidance_scale=2.5)
    full = ControlNeXtSVDPipeline(**tiny_components())(reference_image(), pose_frames(), **kwargs).frames
    half = ControlNeXtSVDPipeline(**tiny_components())
    half.to(dtype=dtype)
    kwargs["generator"] = torch.Generator().manual_seed(0)
    frames = half(reference_image(), pose_frames(), **kwargs).frames.float()
    difference = (frames - full).abs()
    assert difference.max() <= 0.05 and difference.mean() <= 0.01


def test_feed_forward_chunking_gives_the_same_frames(components):
    """--low-vram runs the UNet's feed-forward layers one frame at a time (diffusers' forward chunking);
    the control hook is unaffected and the latents do not change."""
    kwargs = dict(window_size=4, window_overlap=2, **call_kwargs(num_frames=6, output_type="latent"))
    expected = ControlNeXtSVDPipeline(**tiny_components())(reference_image(), pose_frames(6), **kwargs).frames
    pipe = ControlNeXtSVDPipeline(**tiny_components())
    pipe.unet.enable_forward_chunking()
    chunked = [m for m in pipe.unet.modules() if getattr(m, "_chunk_size", None) == 1]
    assert len(chunked) >= 2  # spatial and temporal transformer blocks
    kwargs["generator"] = torch.Generator().manual_seed(0)
    latents = pipe(reference_image(), pose_frames(6), **kwargs).frames
    torch.testing.assert_close(latents, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


@pytest.mark.parametrize("max_guidance, unet_batch", [(1.0, 1), (2.5, 2)])
def test_guidance_batch_decided_from_the_scales(components, max_guidance, unet_batch):
    """Classifier-free guidance (the doubled UNet batch) is on exactly when a scale is above 1, decided
    once per call rather than by asking the guidance tensor (a device sync) at every window."""
    pipe = ControlNeXtSVDPipeline(**components)
    batches = []
    handle = pipe.unet.register_forward_pre_hook(lambda module, args: batches.append(args[0].shape[0]))
    try:
        pipe(reference_image(), pose_frames(), **call_kwargs(min_guidance_scale=1.0, max_guidance_scale=max_guidance,
                                                             num_inference_steps=1, output_type="latent"))
    finally:
        handle.remove()
    assert batches == [unet_batch]
    assert pipe.do_classifier_free_guidance is (unet_batch == 2)


def control_hook(unet):
    return HookRegistry.check_if_exists_or_initialize(unet.down_blocks[0]).get_hook(CONTROL_HOOK)


def test_detach_control_leaves_the_plain_unet():
    components = tiny_components()
    pipe = ControlNeXtSVDPipeline(**components)
    pipe(reference_image(), pose_frames(), **call_kwargs(output_type="latent"))
    assert control_hook(pipe.unet) is not None  # kept between calls (inactive), so a compiled UNet is not traced again
    pipe.detach_control()
    assert control_hook(pipe.unet) is None
    pipe.detach_control()  # twice is harmless


def test_a_training_loops_control_hook_is_shared_and_kept():
    """A validation pipeline on a UNet that already has the control hook (a training loop's) uses that one hook,
    leaves it inactive, and does not take it off when detached."""
    from svd_controlnext.injection import ControlInjector

    expected = ControlNeXtSVDPipeline(**tiny_components())(reference_image(), pose_frames(),
                                                           **call_kwargs(output_type="latent")).frames
    components = tiny_components()
    config = components["pose_encoder"].config
    training = ControlInjector(components["unet"], config.injection_site, config.control_strength)
    pipe = ControlNeXtSVDPipeline(**components)
    result = pipe(reference_image(), pose_frames(), **call_kwargs(output_type="latent"))
    assert result.counts.control_calls == STEPS and pipe._injector is training and not training.active
    # exact on any CPU: the same models and calls in one process run the same kernels; the control went through that hook
    torch.testing.assert_close(result.frames, expected, rtol=0, atol=0)
    pipe.detach_control()
    assert control_hook(pipe.unet).injector is training
    training.remove()
