"""A plain reference of the published ControlNeXt-SVD-v2 sampling loop, written for the parity tests.

Written from the published algorithm (dvlab-research/ControlNeXt, `ControlNeXt-SVD-v2/pipeline/
pipeline_stable_video_diffusion_controlnext.py`, `StableVideoDiffusionPipelineControlNeXt.__call__` and
`decode_latents`; `models/unet_spatio_temporal_condition_controlnext.py` for the injection), step by step.
It shares only the models with our code (the tiny components and our `PoseEncoder`: the loop, not the
models, is what it checks) and the diffusers helpers that the published file copies
(`_resize_with_antialiasing`, `randn_tensor`), so that a difference in our loop shows up here. The tiny
CLIP takes the same 224-pixel input as ViT-H/14; the one addition is casting the reference to the VAE's
dtype, so that the comparison can run in fp64.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import EulerDiscreteScheduler
from diffusers.image_processor import VaeImageProcessor
from diffusers.pipelines.stable_video_diffusion.pipeline_stable_video_diffusion import _resize_with_antialiasing
from diffusers.utils.torch_utils import randn_tensor


def published_window_starts(num_frames: int, frames_per_batch: int, overlap: int) -> list[int]:
    """`range(0, num_frames - overlap, frames_per_batch - overlap)`, a start past the end clamped."""
    return [s if s + frames_per_batch <= num_frames else num_frames - frames_per_batch
            for s in range(0, num_frames - overlap, frames_per_batch - overlap)]


def published_injection_hook(control: dict):
    """The published edited UNet forward, after `down_blocks[0]`: the control, normalised per item over
    (C, H, W) to the sample's mean and unbiased std (eps 1e-5 on its std), average-pooled to the sample's
    size, times `scale` (a per-item tensor) and 0.2, added to the main path only."""
    def hook(module, args, output):
        sample, skips = output
        c = control["output"]
        mean_c, std_c = c.mean(dim=(1, 2, 3), keepdim=True), c.std(dim=(1, 2, 3), keepdim=True)
        mean_s, std_s = sample.mean(dim=(1, 2, 3), keepdim=True), sample.std(dim=(1, 2, 3), keepdim=True)
        c = (c - mean_c) * (std_s / (std_c + 1e-5)) + mean_s
        c = F.adaptive_avg_pool2d(c, sample.shape[-2:])
        return sample + c * control["scale"] * 0.2, skips
    return hook


@torch.no_grad()
def published_sample(components: dict, image, pose_frames: list[np.ndarray], height: int, width: int,
                     num_inference_steps: int, guidance_scale: float, frames_per_batch: int, overlap: int,
                     decode_chunk_size: int, seed: int) -> tuple[torch.Tensor, np.ndarray]:
    """(final latents (1, F, 4, h, w), frames (F, H, W, 3) uint8) as the published pipeline makes them,
    called as `run_controlnext.py` calls it (min = max guidance, fps 7, motion bucket 127: both ignored)."""
    unet, vae, controlnext = components["unet"], components["vae"], components["pose_encoder"]
    image_encoder, feature_extractor = components["image_encoder"], components["feature_extractor"]
    scheduler = EulerDiscreteScheduler.from_config(components["scheduler"].config)
    scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
    processor = VaeImageProcessor(vae_scale_factor=scale_factor)
    generator = torch.Generator().manual_seed(seed)
    num_frames = len(pose_frames)
    frames_per_batch = min(frames_per_batch, num_frames)
    cfg = guidance_scale >= 1.0

    # CLIP embedding of the reference: [-1, 1], anti-aliased resize to 224, back to [0, 1], CLIP statistics.
    pixels = processor.numpy_to_pt(processor.pil_to_numpy(image)) * 2.0 - 1.0
    pixels = (_resize_with_antialiasing(pixels, (224, 224)) + 1.0) / 2.0
    pixels = feature_extractor(images=pixels, do_normalize=True, do_center_crop=False, do_resize=False,
                               do_rescale=False, return_tensors="pt").pixel_values.to(image_encoder.dtype)
    embeddings = image_encoder(pixels).image_embeds.unsqueeze(1)
    embeddings = torch.cat([torch.zeros_like(embeddings), embeddings]) if cfg else embeddings

    # VAE latent of the noise-augmented reference (mode, unscaled), zeros for the unconditional half.
    reference = processor.preprocess(image, height=height, width=width)
    reference = reference + 0.02 * randn_tensor(reference.shape, generator=generator, dtype=reference.dtype)
    image_latents = vae.encode(reference.to(vae.dtype)).latent_dist.mode()
    image_latents = torch.cat([torch.zeros_like(image_latents), image_latents]) if cfg else image_latents
    image_latents = image_latents.unsqueeze(1).repeat(1, num_frames, 1, 1, 1)

    # Added time ids: hard-coded (6, 128, 0.02) whatever the caller passes.
    time_ids = torch.tensor([[6, 128, 0.02]], dtype=embeddings.dtype)
    time_ids = torch.cat([time_ids] * 2) if cfg else time_ids

    scheduler.set_timesteps(num_inference_steps)
    latents = randn_tensor((1, num_frames, 4, height // scale_factor, width // scale_factor), generator=generator, dtype=embeddings.dtype)
    latents_all = latents * scheduler.init_noise_sigma

    # Pose frames: through the VAE image processor to [-1, 1], then back to [0, 1]; doubled for guidance.
    condition = (processor.preprocess([_pil(frame) for frame in pose_frames], height=height, width=width) + 1.0) / 2
    condition_all = condition.unsqueeze(0).to(latents_all.dtype)
    condition_all = torch.cat([condition_all] * 2) if cfg else condition_all

    guidance = torch.linspace(guidance_scale, guidance_scale, frames_per_batch).unsqueeze(0).to(latents_all.dtype)
    guidance = guidance[(...,) + (None,) * 3]
    control = {}
    handle = unet.down_blocks[0].register_forward_hook(published_injection_hook(control))
    try:
        for t in scheduler.timesteps:
            total = torch.zeros_like(latents_all)
            counter = torch.zeros((1, num_frames, 1, 1, 1), dtype=latents_all.dtype)
            for start in published_window_starts(num_frames, frames_per_batch, overlap):
                scheduler._step_index = None
                latents = latents_all[:, start:start + frames_per_batch]
                window_condition = condition_all[:, start:start + frames_per_batch].clone()
                window_condition[:, 0] = condition_all[:, 0]  # the reference pose in every window
                model_input = torch.cat([latents] * 2) if cfg else latents
                model_input = scheduler.scale_model_input(model_input, t)
                control["output"] = controlnext(window_condition, t)
                n = control["output"].shape[0]
                control["scale"] = torch.ones(n, 1, 1, 1, dtype=latents.dtype)
                if cfg:
                    control["scale"][: n // 2] = 0  # control on the conditional half only
                model_input = torch.cat([model_input, image_latents[:, start:start + frames_per_batch]], dim=2)
                noise_pred = unet(model_input, t, encoder_hidden_states=embeddings, added_time_ids=time_ids,
                                  return_dict=False)[0]
                if cfg:
                    uncond, cond = noise_pred.chunk(2)
                    noise_pred = uncond + guidance * (cond - uncond)
                latents = scheduler.step(noise_pred, t, latents).prev_sample
                if start == 0:
                    total[:, start:start + frames_per_batch] += latents
                    counter[:, start:start + frames_per_batch] += 1
                else:  # later windows drop position 0, the slot fed the reference pose
                    total[:, start + 1:start + frames_per_batch] += latents[:, 1:]
                    counter[:, start + 1:start + frames_per_batch] += 1
            latents_all = total / counter
    finally:
        handle.remove()

    # decode_latents: chunks of the flattened frames, each decoded as its own clip.
    flat = latents_all.flatten(0, 1) / vae.config.scaling_factor
    decoded = torch.cat([vae.decode(flat[i:i + decode_chunk_size], num_frames=len(flat[i:i + decode_chunk_size])).sample
                         for i in range(0, len(flat), decode_chunk_size)]).float()
    frames = (decoded / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    return latents_all, (frames * 255).round().astype(np.uint8)


def _pil(frame: np.ndarray):
    from PIL import Image

    return Image.fromarray(frame)
