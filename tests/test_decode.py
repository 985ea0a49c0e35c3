import numpy as np
import pytest
import torch

from svd_common.video import VideoWriter, probe_video
from svd_controlnext.decode import iter_decoded_frames
from svd_controlnext.pipeline import ControlNeXtSVDPipeline
from svd_controlnext.tiny import tiny_components


@pytest.fixture(scope="module")
def pipe():
    parts = tiny_components()
    for name in ("unet", "vae", "image_encoder", "pose_encoder"):
        parts[name].eval()
    return ControlNeXtSVDPipeline(**parts)


def latents(frames=7, seed=0):
    return torch.randn(1, frames, 4, 16, 16, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("chunk", [1, 3, 7])
def test_streamed_frames_equal_the_pipelines_decoding(pipe, chunk):
    z = latents()
    with torch.no_grad():
        expected = pipe.decode_latents(z, 7, chunk)  # (1, 3, F, H, W) in [-1, 1]
    expected = pipe.video_processor.postprocess_video(video=expected, output_type="np")[0]  # (F, H, W, 3)
    frames = list(iter_decoded_frames(pipe.vae, z, chunk))
    assert len(frames) == 7 and frames[0].shape == (32, 32, 3) and frames[0].dtype == np.uint8
    assert np.abs(np.stack(frames).astype(int) - np.round(expected * 255).astype(int)).max() <= 1


def test_generator_is_lazy(pipe):
    decoded = []
    original = pipe.vae.decode

    def counting(*args, **kwargs):
        decoded.append(args[0].shape[0])
        return original(*args, **kwargs)

    pipe.vae.decode = counting
    try:
        frames = iter_decoded_frames(pipe.vae, latents(9), chunk_size=4)
        next(frames)
        assert decoded == [4]  # only the first chunk was decoded so far
        list(frames)
        assert decoded == [4, 4, 1]
    finally:
        pipe.vae.decode = original


def test_decode_into_video_file(pipe, tmp_path):
    with VideoWriter(tmp_path / "out.mp4", fps=7) as writer:
        for frame in iter_decoded_frames(pipe.vae, latents(5), chunk_size=2):
            writer.write(frame)
    info = probe_video(tmp_path / "out.mp4")
    assert (info.width, info.height, info.num_frames) == (32, 32, 5)


def test_bad_chunk_size(pipe):
    with pytest.raises(ValueError, match="chunk size"):
        next(iter_decoded_frames(pipe.vae, latents(2), chunk_size=0))


def test_the_vaes_own_latents_decode_to_the_same_pixels(pipe):
    """ComfyUI's LATENT: `unscaled_latents` (what the decoder takes), kept in fp32 off the VAE and decoded with
    `scaled=False`, gives the pipeline's latents' frames bit for bit."""
    from svd_controlnext.decode import unscaled_latents

    z = latents(frames=5, seed=3)
    raw = unscaled_latents(pipe.vae, z)
    assert raw.shape == (5, 4, 16, 16)
    assert torch.equal(raw, z[0] * (1 / pipe.vae.config.scaling_factor))
    expected = np.stack(list(iter_decoded_frames(pipe.vae, z, 2)))
    assert np.array_equal(np.stack(list(iter_decoded_frames(pipe.vae, raw.float().cpu(), 2, scaled=False))), expected)
