import numpy as np
import pytest
import torch

from svd_controlnext.cross_norm import cross_normalize


def reference(control, target, eps=1e-5):
    """The published formula, one sample at a time, in float64 numpy."""
    out = []
    for c, s in zip(control, target):
        c_mean, c_std = c.mean(), c.std(ddof=1)
        s_mean, s_std = s.mean(), s.std(ddof=1)
        out.append((c - c_mean) / (c_std + eps) * s_std + s_mean)
    return np.stack(out)


def test_matches_hand_written_reference_same_size():
    g = torch.Generator().manual_seed(0)
    control = torch.randn(3, 4, 6, 5, generator=g, dtype=torch.float64) * 3 + 2
    target = torch.randn(3, 4, 6, 5, generator=g, dtype=torch.float64) * 0.5 - 1
    out = cross_normalize(control, target)
    np.testing.assert_allclose(out.numpy(), reference(control.numpy(), target.numpy()), rtol=1e-12)
    # The result carries the target's per-sample statistics.
    np.testing.assert_allclose(out.mean(dim=(1, 2, 3)), target.mean(dim=(1, 2, 3)), atol=1e-10)
    np.testing.assert_allclose(out.std(dim=(1, 2, 3)), target.std(dim=(1, 2, 3)), rtol=1e-5)


def test_statistics_before_pooling_and_exact_2x2_pool():
    control = torch.arange(2 * 1 * 4 * 4, dtype=torch.float64).reshape(2, 1, 4, 4) ** 1.5
    target = torch.tensor([[[[1.0, 3.0], [5.0, 7.0]]], [[[0.0, 0.0], [0.0, 2.0]]]], dtype=torch.float64)
    out = cross_normalize(control, target)
    full = reference(control.numpy(), target.numpy())
    pooled = full.reshape(2, 1, 2, 2, 2, 2).mean(axis=(3, 5))  # 2x2 average of the normalised control
    np.testing.assert_allclose(out.numpy(), pooled, rtol=1e-12)


def test_non_integer_pool_matches_torch_adaptive_pool():
    control = torch.randn(2, 8, 127, 71)
    target = torch.randn(2, 8, 64, 36)
    out = cross_normalize(control, target)
    expected = torch.nn.functional.adaptive_avg_pool2d(torch.from_numpy(reference(control.numpy(), target.numpy())),
                                                       (64, 36))
    assert out.shape == (2, 8, 64, 36)
    torch.testing.assert_close(out, expected.float(), rtol=1e-4, atol=1e-4)


def test_constant_control_uses_epsilon():
    control = torch.full((1, 2, 3, 3), 4.0)
    target = torch.randn(1, 2, 3, 3)
    out = cross_normalize(control, target)
    torch.testing.assert_close(out, torch.full_like(out, target.mean().item()))


def test_mismatched_channels():
    with pytest.raises(ValueError, match="differ in batch or channels"):
        cross_normalize(torch.zeros(1, 3, 4, 4), torch.zeros(1, 4, 4, 4))
