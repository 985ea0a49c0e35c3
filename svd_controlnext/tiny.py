"""Tiny random SVD components built with the real diffusers / transformers classes.

Used by the tests and by the `tiny` preset so the whole tool runs with no downloaded weights.
Sizes follow diffusers' own SVD tests (shared/compat/diffusers_svd.md §4).
"""

from __future__ import annotations

import torch

from .encoder import PoseEncoder


def tiny_unet():
    from diffusers import UNetSpatioTemporalConditionModel

    return UNetSpatioTemporalConditionModel(
        block_out_channels=(32, 64), layers_per_block=2, sample_size=32, in_channels=8, out_channels=4,
        down_block_types=("CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal"),
        up_block_types=("UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal"),
        cross_attention_dim=32, num_attention_heads=8, projection_class_embeddings_input_dim=96,
        addition_time_embed_dim=32,
    )


def tiny_pose_encoder(site: str = "down_blocks.0", **config) -> PoseEncoder:
    """Channels sized for the tiny UNet: 32 at `down_blocks.0`, 64 at the `mid_block` input."""
    channels = 32 if site == "down_blocks.0" else 64
    return PoseEncoder(time_embed_dim=32, in_channels=(16, 16), out_channels=(16, 32), groups=(2, 4),
                       control_channels=channels, injection_site=site, **config)


def tiny_components(seed: int = 0) -> dict:
    """unet, vae, image_encoder, feature_extractor, scheduler and pose_encoder, seeded."""
    from diffusers import AutoencoderKLTemporalDecoder, EulerDiscreteScheduler
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(seed)
    unet = tiny_unet()
    torch.manual_seed(seed)
    vae = AutoencoderKLTemporalDecoder(block_out_channels=[32, 64], in_channels=3, out_channels=3,
                                       down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
                                       latent_channels=4)
    torch.manual_seed(seed)
    image_encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=32, projection_dim=32, num_hidden_layers=5, num_attention_heads=4, image_size=224,
        intermediate_size=37, patch_size=32))  # 224 like ViT-H/14: diffusers' CLIP input path runs unchanged
    torch.manual_seed(seed)
    pose_encoder = tiny_pose_encoder()
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", interpolation_type="linear",
        num_train_timesteps=1000, prediction_type="v_prediction", sigma_max=700.0, sigma_min=0.002,
        steps_offset=1, timestep_spacing="leading", timestep_type="continuous", trained_betas=None,
        use_karras_sigmas=True)
    return {"unet": unet, "vae": vae, "image_encoder": image_encoder, "scheduler": scheduler,
            "feature_extractor": CLIPImageProcessor(crop_size=224, size=224), "pose_encoder": pose_encoder}
