"""The SVD EDM training objective as published for ControlNeXt-SVD-v2 (shared/compat §5), as pure functions.

- sigma ~ the cosine-interpolated log-SNR distribution of "simple diffusion" (image size 64, noise size
  interpolated from 32 at the high-noise end to 64 at the low-noise end), limited to [sigma_min, sigma_max],
  sigma_data 0.5, stratified across the batch (train_svd.py, `rand_cosine_interpolated`);
- x_noisy = x0 + sigma * eps; UNet input x_noisy / sqrt(sigma^2 + 1); timestep 0.25 ln sigma (the pose
  encoder gets the same);
- denoised D = out * (-sigma / sqrt(sigma^2 + 1)) + x_noisy / (sigma^2 + 1) (v-prediction);
- loss = mean(w * (D - x0)^2 * hand_weights), w = (1 + sigma^2) / sigma^2.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F


@dataclasses.dataclass(frozen=True)
class SigmaDistribution:
    sigma_min: float = 0.002
    sigma_max: float = 700.0
    sigma_data: float = 0.5
    image_d: float = 64.0
    noise_d_low: float = 32.0
    noise_d_high: float = 64.0


def _cosine_logsnr(t: torch.Tensor, logsnr_at_0: float, logsnr_at_1: float) -> torch.Tensor:
    """The cosine log-SNR schedule of "simple diffusion", going from logsnr_at_0 (t = 0) to logsnr_at_1 (t = 1)."""
    t_0 = math.atan(math.exp(-0.5 * logsnr_at_0))
    t_1 = math.atan(math.exp(-0.5 * logsnr_at_1))
    return -2 * torch.log(torch.tan(t_0 + t * (t_1 - t_0)))


def _shifted_cosine_logsnr(t, image_d, noise_d, logsnr_at_0, logsnr_at_1):
    """The cosine schedule shifted by 2 ln(noise_d / image_d) inside, so its ends stay where they are."""
    shift = 2 * math.log(noise_d / image_d)
    return _cosine_logsnr(t, logsnr_at_0 - shift, logsnr_at_1 - shift) + shift


def sigmas_from_uniform(u: torch.Tensor, dist: SigmaDistribution = SigmaDistribution()) -> torch.Tensor:
    """Map u in [0, 1] to sigmas, as train_svd.py's `rand_cosine_interpolated` (k-diffusion's) does:
    u = 0 gives sigma_max and u = 1 sigma_min, and the log-SNR is lerp(schedule(noise_d_low),
    schedule(noise_d_high), u), so noise_d_low governs the high-noise end."""
    logsnr_at_0 = -2 * math.log(dist.sigma_max / dist.sigma_data)
    logsnr_at_1 = -2 * math.log(dist.sigma_min / dist.sigma_data)
    low = _shifted_cosine_logsnr(u, dist.image_d, dist.noise_d_low, logsnr_at_0, logsnr_at_1)
    high = _shifted_cosine_logsnr(u, dist.image_d, dist.noise_d_high, logsnr_at_0, logsnr_at_1)
    return dist.sigma_data * torch.exp(-torch.lerp(low, high, u) / 2)


def stratified_uniform(batch: int, generator: torch.Generator | None = None,
                       dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """u_i ~ U[i / batch, (i + 1) / batch): one draw per stratum of [0, 1) across the batch, as
    train_svd.py draws it (k-diffusion's `stratified_uniform`, group 0 of 1, over the per-process batch)."""
    return (torch.arange(batch, dtype=dtype) + torch.rand(batch, generator=generator, dtype=dtype)) / batch


def sample_sigmas(batch: int, generator: torch.Generator | None = None,
                  dist: SigmaDistribution = SigmaDistribution()) -> torch.Tensor:
    """The published sigma draw for one (per-process) batch, computed in fp64, returned in fp32."""
    return sigmas_from_uniform(stratified_uniform(batch, generator), dist).float()


def _per_sample(sigma: torch.Tensor, ndim: int) -> torch.Tensor:
    return sigma.reshape(-1, *([1] * (ndim - 1)))


def unet_inputs(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor,
                                                                                    torch.Tensor]:
    """(noisy latents, scaled UNet input, timestep) for latents x0 (B, F, C, h, w) and sigmas (B,)."""
    s = _per_sample(sigma, x0.ndim)
    noisy = x0 + s * noise
    return noisy, noisy / torch.sqrt(s**2 + 1), 0.25 * torch.log(sigma)


def denoised(model_output: torch.Tensor, noisy: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    s = _per_sample(sigma, noisy.ndim)
    return model_output * (-s / torch.sqrt(s**2 + 1)) + noisy / (s**2 + 1)


def loss_weight(sigma: torch.Tensor) -> torch.Tensor:
    return (1 + sigma**2) / sigma**2


def edm_loss(model_output, noisy, x0, sigma, pixel_weights: torch.Tensor | None = None) -> torch.Tensor:
    """Weighted denoising loss; `pixel_weights` (B, F, 1, h, w) up-weights regions (hands)."""
    error = (denoised(model_output.float(), noisy.float(), sigma) - x0.float()) ** 2
    error = error * _per_sample(loss_weight(sigma), error.ndim)
    if pixel_weights is not None:
        error = error * pixel_weights
    return error.mean()


def conditioning_dropout(u: torch.Tensor, image_p: float = 0.2, reference_from: float = 0.1,
                         reference_to: float = 0.3) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep-masks (1 keep, 0 drop) per sample for the CLIP embedding (dropped when u < image_p) and the
    reference latent (dropped when reference_from <= u < reference_to), as published: the two
    overlap on [0.1, 0.2), so some samples lose both. The pose control is never dropped."""
    keep_image = (u >= image_p).float()
    keep_reference = 1 - ((u >= reference_from) & (u < reference_to)).float()
    return keep_image, keep_reference


def latent_weights(pixel_weights: torch.Tensor, latent_size: tuple[int, int]) -> torch.Tensor:
    """Pixel weights (B, F, H, W) average-pooled to the latent grid -> (B, F, 1, h, w); frame 0 (the
    reference frame) gets weight 1 everywhere, as published."""
    batch, frames = pixel_weights.shape[:2]
    pooled = F.adaptive_avg_pool2d(pixel_weights.flatten(0, 1).unsqueeze(1).float(), latent_size)
    pooled = pooled.reshape(batch, frames, 1, *latent_size).clone()
    pooled[:, 0] = 1.0
    return pooled
