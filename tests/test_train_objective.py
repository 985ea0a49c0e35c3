import math

import numpy as np
import pytest
import torch

from svd_animate.train.data import (centre_framing, clip_span, hand_weight_map, pose_hand_boxes, published_hand_boxes,
                                    random_framing)
from svd_animate.train.objective import (SigmaDistribution, conditioning_dropout, denoised, edm_loss, latent_weights,
                                         loss_weight, sample_sigmas, sigmas_from_uniform, stratified_uniform,
                                         unet_inputs)
from tests.helpers import make_pose


def published_sigma(u: float, sigma_min=0.002, sigma_max=700.0, sigma_data=0.5, image_d=64.0, noise_d_low=32.0,
                    noise_d_high=64.0) -> float:
    """A plain fp64 reading of train_svd.py's rand_cosine_interpolated for one u, names as published: its
    "logsnr_min" is the log-SNR of min_value (the high one) and its cosine schedule starts at "logsnr_max"."""
    logsnr_min = -2 * math.log(sigma_min / sigma_data)
    logsnr_max = -2 * math.log(sigma_max / sigma_data)

    def cosine(t, lmin, lmax):
        t_min, t_max = math.atan(math.exp(-0.5 * lmax)), math.atan(math.exp(-0.5 * lmin))
        return -2 * math.log(math.tan(t_min + t * (t_max - t_min)))

    def shifted(t, noise_d):
        shift = 2 * math.log(noise_d / image_d)
        return cosine(t, lmin=logsnr_min - shift, lmax=logsnr_max - shift) + shift

    low, high = shifted(u, noise_d_low), shifted(u, noise_d_high)
    return math.exp(-(low + u * (high - low)) / 2) * sigma_data


def test_sigma_quantiles_are_the_published_ones():
    # sigma falls as u grows, so the q-quantile of sigma is sigma(u = 1 - q).
    reference = [published_sigma(1 - q) for q in (0.1, 0.9, 0.99)]
    assert reference == pytest.approx([0.0867, 5.853, 58.09], rel=1e-3)  # issue 12: 0.087 / 5.85 / 58.1
    ours = sigmas_from_uniform(torch.tensor([0.9, 0.1, 0.01], dtype=torch.float64))
    assert ours.tolist() == pytest.approx(reference, rel=1e-12)
    # the reversed interpolation (u = 0 at sigma_min, lerp kept) gave 0.150 / 3.38 / 30.7
    assert not any(abs(s - old) < 0.01 * old for s, old in zip(ours.tolist(), (0.150, 3.38, 30.7)))
    # ... and what the sampler draws has those quantiles: 10^5 stratified draws pin each one to 1e-5 in u
    drawn = sample_sigmas(100_000, torch.Generator().manual_seed(0)).double()
    quantiles = torch.quantile(drawn, torch.tensor([0.1, 0.9, 0.99], dtype=torch.float64))
    assert quantiles.tolist() == pytest.approx(reference, rel=1e-3)


def test_sigma_ends_orientation_and_a_hand_computed_middle():
    u = torch.linspace(0, 1, 101, dtype=torch.float64)
    sigmas = sigmas_from_uniform(u)
    assert sigmas[[0, -1]].tolist() == pytest.approx([700.0, 0.002], rel=1e-12)  # u = 0: the most noise
    assert (sigmas.diff() < 0).all()
    assert sigmas.tolist() == pytest.approx([published_sigma(x) for x in u.tolist()], rel=1e-12)
    # noise_d_low governs the high-noise end: near u = 0 changing it moves sigma, changing noise_d_high barely does
    near_zero = torch.tensor([0.02], dtype=torch.float64)
    base = sigmas_from_uniform(near_zero).item()
    assert abs(sigmas_from_uniform(near_zero, SigmaDistribution(noise_d_low=64.0)).item() / base - 1) > 0.2
    assert abs(sigmas_from_uniform(near_zero, SigmaDistribution(noise_d_high=32.0)).item() / base - 1) < 0.05
    # u = 0.5 by hand: logSNR range [-2 ln(700/0.5), -2 ln(0.002/0.5)] = [-14.4894, 11.0429]; noise_d 32 shifts
    # by 2 ln(1/2), noise_d 64 by 0; each is the cosine midpoint of its shifted range, and the lerp is their mean.
    lo, hi = -2 * math.log(1400), -2 * math.log(0.004)

    def cosine_mid(shift):
        t_min, t_max = math.atan(math.exp(-0.5 * (hi - shift))), math.atan(math.exp(-0.5 * (lo - shift)))
        return -2 * math.log(math.tan((t_min + t_max) / 2)) + shift

    expected = 0.5 * math.exp(-0.5 * (cosine_mid(2 * math.log(0.5)) + cosine_mid(0.0)) / 2)
    assert sigmas_from_uniform(torch.tensor([0.5], dtype=torch.float64)).item() == pytest.approx(expected, rel=1e-9)
    narrow = SigmaDistribution(sigma_min=0.1, sigma_max=10.0)
    assert sigmas_from_uniform(torch.tensor([0.0, 1.0]), narrow).tolist() == pytest.approx([10.0, 0.1], rel=1e-5)


def test_sigma_draw_is_stratified_across_the_batch():
    generator = torch.Generator().manual_seed(1)
    for _ in range(50):
        u = stratified_uniform(8, generator)
        assert (torch.floor(u * 8) == torch.arange(8)).all()  # draw i lies in [i/8, (i+1)/8)
    single = torch.stack([stratified_uniform(1, generator) for _ in range(2000)])
    assert 0 <= single.min() and single.max() < 1 and abs(single.mean().item() - 0.5) < 0.03  # batch 1: U[0, 1)
    sigmas = sample_sigmas(4, torch.Generator().manual_seed(2))
    for i, sigma in enumerate(sigmas.tolist()):  # sample i between sigma((i+1)/4) and sigma(i/4)
        assert published_sigma((i + 1) / 4) * (1 - 1e-6) <= sigma <= published_sigma(i / 4) * (1 + 1e-6)


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


def test_random_framing_is_inference_framing_at_a_random_offset_and_span():
    rng = np.random.default_rng(0)
    framing = random_framing(1080, 1920, 576, 1024, rng)  # same aspect: the whole frame, scaled by 576 / 1080
    assert (framing.scale, framing.size, framing.left, framing.top) == (576 / 1080, (576, 1024), 0, 0)
    # landscape to square: 640 x 360 scaled by 64 / 360 to 114 x 64, cut anywhere along x (0..50); centre 25
    lefts = set()
    for _ in range(200):
        framing = random_framing(640, 360, 64, 64, rng)
        assert (framing.scale, framing.size, framing.top) == (64 / 360, (114, 64), 0) and 0 <= framing.left <= 50
        lefts.add(framing.left)
    assert min(lefts) == 0 and max(lefts) == 50  # both ends reachable
    assert (centre_framing(640, 360, 64, 64).left, centre_framing(640, 360, 64, 64).top) == (25, 0)
    assert clip_span(14, 3) == 40 and clip_span(1, 5) == 1


def test_hand_boxes_from_confident_keypoints_and_weights_hand_computed():
    hands = np.full((2, 21, 2), np.nan, np.float32)
    hands[0, :3] = [[0.25, 0.5], [0.5, 0.75], [0.9, 0.1]]  # pixels (16, 32), (32, 48) in 64x64; a doubtful third
    hands[1, :2] = [[0.1, 0.1], [0.2, 0.2]]
    frame = make_pose(hands=hands)
    frame["hands_score"][0, 2] = 0.2  # not confident: the box ignores it (the hand's mean stays > 0.5)
    frame["hands_score"][1] = 0.4  # the right hand's mean is not > 0.5: no box
    boxes = pose_hand_boxes(frame)
    assert boxes == [((0.25, 0.5), (0.5, 0.75))]
    weights = hand_weight_map(boxes, 64, 64, inside=4.2, margin=10)
    # x from 16 - 10 = 6 to 32 + 10 = 42, y from 32 - 10 = 22 to 48 + 10 = 58 (end excluded)
    assert weights[22:58, 6:42].min() == pytest.approx(4.2) and weights[22:58, 6:42].max() == pytest.approx(4.2)
    assert weights.sum() == pytest.approx(64 * 64 + 36 * 36 * 3.2)
    # corners truncated to pixels, widened, clipped to the frame: int(-3.2) - 10 -> 0, int(3.2) + 10 = 13
    edge = hand_weight_map([((-0.05, 0.0), (0.05, 0.05))], 64, 64, inside=2.0)
    assert edge[:13, :13].min() == 2.0 and edge.sum() == pytest.approx(64 * 64 + 13 * 13)


def test_published_hand_boxes_keep_confident_hands_only():
    detections = {"hands_boxes": [[[0.1, 0.1], [0.2, 0.2]], [[0.15, 0.15], [0.3, 0.3]]],
                  "hands_score": [[0.6] * 21, [0.5] * 21]}  # mean 0.5 is not > 0.5
    assert published_hand_boxes(detections) == [[[0.1, 0.1], [0.2, 0.2]]]
    assert published_hand_boxes({"boxes": [], "hands_boxes": detections["hands_boxes"]}) == []  # no scores: none
