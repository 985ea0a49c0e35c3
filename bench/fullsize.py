"""Full-size SVD-XT architectures with random weights (configs: ../shared/compat/diffusers_svd.md §3).

For benchmarks only: the weights cannot be downloaded here, and speed and memory depend on the
architecture, not on the values.
"""

from __future__ import annotations

import contextlib

import torch


def full_unet():
    from diffusers import UNetSpatioTemporalConditionModel

    return UNetSpatioTemporalConditionModel(sample_size=96, num_frames=25)  # diffusers' defaults are SVD-XT's


def full_vae():
    from diffusers import AutoencoderKLTemporalDecoder

    return AutoencoderKLTemporalDecoder(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
                                        block_out_channels=[128, 256, 512, 512], layers_per_block=2,
                                        latent_channels=4, sample_size=768, scaling_factor=0.18215,
                                        force_upcast=True)


def full_image_encoder():
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    return CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16, patch_size=14,
        image_size=224, projection_dim=1024, hidden_act="gelu", layer_norm_eps=1e-5))


def full_pose_encoder():
    from svd_controlnext.encoder import PoseEncoder

    return PoseEncoder()  # the published v2 encoder


def full_components(seed: int = 0, meta: bool = False) -> dict:
    """All SVD-XT components plus the published pose encoder, random weights, fp32 on the CPU
    (`meta=True`: the models on the meta device, without memory or values, for fake-tensor runs)."""
    from diffusers import EulerDiscreteScheduler
    from transformers import CLIPImageProcessor

    torch.manual_seed(seed)
    with torch.device("meta") if meta else contextlib.nullcontext():
        models = {"unet": full_unet(), "vae": full_vae(), "image_encoder": full_image_encoder(),
                  "pose_encoder": full_pose_encoder()}
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", interpolation_type="linear",
        num_train_timesteps=1000, prediction_type="v_prediction", sigma_max=700.0, sigma_min=0.002,
        steps_offset=1, timestep_spacing="leading", timestep_type="continuous", use_karras_sigmas=True)
    return {**models, "scheduler": scheduler, "feature_extractor": CLIPImageProcessor()}


def published_settings(pipe) -> None:
    """Make `pipe` do the published pipeline's control work: the encoder on the doubled guidance batch,
    and no reuse of the features of frames shared by overlapping windows."""
    encoder_forward = pipe.pose_encoder.forward
    pipe.pose_encoder.forward = lambda frames, t: encoder_forward(torch.cat([frames] * 2), t)[:frames.shape[1]]
    window_control = pipe._window_control
    pipe._window_control = lambda poses, start, end, t, first, previous: window_control(
        poses, start, end, t, first, {})
