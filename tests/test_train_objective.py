import math

import numpy as np
import pytest
import torch

from svd_controlnext.train.data import clip_span, crop_box, hand_weight_map
from svd_controlnext.train.objective import (SigmaDistribution, conditioning_dropout, denoised, edm_loss,
                                             latent_weights, loss_weight, sigmas_from_uniform, unet_inputs)
from tests.helpers import make_pose


def test_sigma_distribution_ends_and_a_hand_computed_middle():
    sigmas = sigmas_from_uniform(torch.tensor([0.0, 1.0], dtype=torch.float64))
    torch.testing.assert_close(sigmas, torch.tensor([0.002, 700.0], dtype=torch.float64))
    u = torch.linspace(0, 1, 101, dtype=torch.float64)
    assert (sigmas_from_uniform(u).diff() > 0).all()  # more noise as u grows
    # u = 0.5 by hand: logSNR range [-2 ln(700/0.5), -2 ln(0.002/0.5)] = [-14.4894, 11.0429];
    # noise_d 32: shift 2 ln(1/2) = -1.3863, noise_d 64: shift 0; cosine midpoint of the shifted range, mean of both.
    lo, hi = -2 * math.log(1400), -2 * math.log(0.004)

    def cosine_mid(shift):
        t_min, t_max = math.atan(math.exp(-0.5 * (hi - shift))), math.atan(math.exp(-0.5 * (lo - shift)))
        return -2 * math.log(math.tan((t_min + t_max) / 2)) + shift

    logsnr = 0.5 * (cosine_mid(2 * math.log(0.5)) + cosine_mid(0.0))
    expected = 0.5 * math.exp(-logsnr / 2)
    assert sigmas_from_uniform(torch.tensor([0.5], dtype=torch.float64)).item() == pytest.approx(expected, rel=1e-9)
    narrow = SigmaDistribution(sigma_min=0.1, sigma_max=10.0)
    assert sigmas_from_uniform(torch.tensor([0.0, 1.0]), narrow).tolist() == pytest.approx([0.1, 10.0], rel=1e-5)


def test_edm_preconditioning_and_loss_hand_computed():
    x0 = torch.full((1, 1, 1, 1, 1), 2.0)
    noise = torch.full_like(x0, 0.5)
    sigma = torch.tensor([3.0])
    noisy, scaled, timestep = unet_inputs(x0, noise, sigma)
    assert noisy.item() == pytest.approx(3.5) and scaled.item() == pytest.approx(3.5 / math.sqrt(10))
    assert timestep.item() == pytest.approx(0.25 * math.log(3))
    # D = out * (-3 / sqrt(10)) + 3.5 / 10; the output that gives D = x0 has zero loss.
    perfect = (3.5 / 10 - 2.0) * math.sqrt(10) / 3
    assert denoised(torch.full_like(x0, perfect), noisy, sigma).item() == pytest.approx(2.0)
    assert loss_weight(sigma).item() == pytest.approx(10 / 9)
    assert edm_loss(torch.full_like(x0, perfect), noisy, x0, sigma).item() == pytest.approx(0.0, abs=1e-10)
    # output 0: D = 0.35, error (0.35 - 2)^2 = 2.7225, weighted x 10/9, then x 2 inside a hand weight of 2
    assert edm_loss(torch.zeros_like(x0), noisy, x0, sigma).item() == pytest.approx(2.7225 * 10 / 9)
    assert edm_loss(torch.zeros_like(x0), noisy, x0, sigma, torch.full_like(x0, 2.0)).item() == pytest.approx(
        2 * 2.7225 * 10 / 9)


def test_conditioning_dropout_as_published():
    u = torch.tensor([0.05, 0.15, 0.25, 0.35])
    keep_image, keep_reference = conditioning_dropout(u)
    assert keep_image.tolist() == [0, 0, 1, 1]  # u < 0.2
    assert keep_reference.tolist() == [1, 0, 0, 1]  # 0.1 <= u < 0.3


def test_latent_weights_pool_and_leave_frame_zero_alone():
    pixels = torch.ones(1, 2, 4, 4)
    pixels[:, :, :2, :2] = 4.2
    pooled = latent_weights(pixels, (2, 2))
    assert pooled.shape == (1, 2, 1, 2, 2)
    assert pooled[0, 1, 0].flatten().tolist() == pytest.approx([4.2, 1.0, 1.0, 1.0])
    assert pooled[0, 0].unique().tolist() == [1.0]  # the reference frame gets no extra weight


def test_crop_box_and_span():
    rng = np.random.default_rng(0)
    x, y, w, h = crop_box(1080, 1920, 576, 1024, rng)  # same aspect: the whole frame
    assert (x, y, w, h) == (0, 0, 1080, 1920)
    x, y, w, h = crop_box(640, 360, 64, 64, rng)  # landscape to square: 360 x 360, anywhere along x
    assert (w, h, y) == (360, 360, 0) and 0 <= x <= 280
    assert clip_span(14, 3) == 40 and clip_span(1, 5) == 1


def test_hand_weight_map_hand_computed():
    hands = np.full((2, 21, 2), np.nan, np.float32)
    hands[0, :2] = [[0.25, 0.5], [0.5, 0.75]]  # pixels (16, 32) and (32, 48) in 64x64
    frame = make_pose(hands=hands)
    frame["hands_score"][1] = 0.2  # the right hand is not confident: no weight
    weights = hand_weight_map(frame, 64, 64, inside=4.2, margin=10)
    assert weights[22:58, 6:42].min() == pytest.approx(4.2) and weights[22:58, 6:42].max() == pytest.approx(4.2)
    assert weights.sum() == pytest.approx(64 * 64 + 36 * 36 * 3.2)
