"""The `controlnext-svd-v2` preset with `--published-sampling` computes the published pipeline's frames.

`tests/published_reference.py` is a plain reference of the published sampling loop; here it runs on the
tiny components with the same weights, reference image, pose frames and seed as our pipeline, in fp64
(exactness is the point: in fp32 the two differ by ~1e-5 only because the encoder runs on a batch of
another size). Guidance, time ids, fusion, the reference-pose layout and decode chunks come from the
preset with `--published-sampling`; sizes, steps and windows are scaled down to run in seconds
(two windows of 8 overlapping by 2 exercise the same fusion as the preset's 24 / 6).
"""

import numpy as np
import pytest
import torch
from PIL import Image

from svd_animate.animate import pipeline_arguments
from svd_animate.config import load_preset, with_published_sampling
from svd_controlnext.decode import iter_decoded_frames
from svd_controlnext.pipeline import ControlNeXtSVDPipeline
from svd_controlnext.tiny import tiny_components
from tests.published_reference import published_sample, published_window_starts

SEED = 3
FRAMES = 14  # the reference pose + 13 driving frames: windows of 8 overlapping by 2 start at 0 and 6
HEIGHT, WIDTH = 32, 32


def tiny_preset(published: bool):
    config = load_preset("controlnext-svd-v2")
    config = with_published_sampling(config) if published else config
    return config.replace(width=WIDTH, height=HEIGHT, steps=3, window=8, overlap=2)


def tiny_fp64_components():
    return {name: part.to(torch.float64) if isinstance(part, torch.nn.Module) else part
            for name, part in tiny_components(SEED).items()}


@pytest.fixture(scope="module")
def inputs():
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8))
    poses = rng.integers(0, 256, (FRAMES, HEIGHT, WIDTH, 3), dtype=np.uint8)
    return image, poses


@pytest.fixture(scope="module")
def published(inputs):
    image, poses = inputs
    config = tiny_preset(published=True)
    return published_sample(tiny_fp64_components(), image, list(poses), config.height, config.width, config.steps,
                            config.max_guidance, config.window, config.overlap, config.decode_chunk_size, SEED)


def ours(inputs, config):
    image, poses = inputs
    pipe = ControlNeXtSVDPipeline(**tiny_fp64_components())
    pipe.set_progress_bar_config(disable=True)
    latents = pipe(image, poses, generator=torch.Generator().manual_seed(SEED), output_type="latent",
                   **pipeline_arguments(config)).frames
    return latents, np.stack(list(iter_decoded_frames(pipe.vae, latents, config.decode_chunk_size or 8)))


def test_published_settings_of_the_preset():
    config = with_published_sampling(load_preset("controlnext-svd-v2"))
    assert (config.window, config.overlap, config.min_guidance, config.max_guidance) == (24, 6, 3.0, 3.0)
    assert (config.fps_id - 1, config.motion_bucket_id, config.noise_aug_strength) == (6, 128, 0.02)
    assert (config.fusion, config.prepend_reference_pose, config.reference_pose_in_every_window) == (
        "uniform", True, True)
    assert (config.dtype, config.decode_chunk_size, config.max_frames) == ("fp32", 2, 240)
    assert published_window_starts(31, 24, 6) == [0, 7]
    assert published_window_starts(FRAMES, 8, 2) == [0, 6]
    assert published_window_starts(20, 8, 2) == [0, 6, 12]


def test_published_sampling_equals_the_published_pipeline(inputs, published):
    latents, frames = ours(inputs, tiny_preset(published=True))
    reference_latents, reference_frames = published
    assert latents.shape == reference_latents.shape == (1, FRAMES, 4, HEIGHT // 2, WIDTH // 2)  # tiny VAE: x2
    assert (latents - reference_latents).abs().max().item() <= 1e-5
    assert frames.shape == reference_frames.shape == (FRAMES, HEIGHT, WIDTH, 3)
    difference = np.abs(frames.astype(int) - reference_frames.astype(int))
    assert difference.max() <= 1 and (difference == 0).mean() > 0.999  # at most a rounding step, rarely


def test_our_defaults_differ_from_the_published_pipeline(inputs, published):
    latents, _ = ours(inputs, tiny_preset(published=False))
    assert (latents - published[0]).abs().max().item() > 1e-2


def test_time_ids_the_unet_sees(inputs):
    """Published conditioning (6, 128, 0.02) for both halves of the guidance batch."""
    image, poses = inputs
    pipe = ControlNeXtSVDPipeline(**tiny_components(SEED))
    pipe.set_progress_bar_config(disable=True)
    seen = []
    pipe.unet.register_forward_pre_hook(lambda module, args, kwargs: seen.append(kwargs["added_time_ids"]),
                                        with_kwargs=True)
    config = tiny_preset(published=True).replace(steps=1)
    pipe(image, poses[:4], output_type="latent", **pipeline_arguments(config))
    torch.testing.assert_close(seen[0], torch.tensor([[6.0, 128.0, 0.02]] * 2))
