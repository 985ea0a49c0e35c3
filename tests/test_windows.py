import itertools

import numpy as np
import pytest

from svd_controlnext.windows import WindowPlan, fusion_weights, plan_windows, position_weights


def test_published_plan_examples():
    # N=48, L=24, O=6: starts 0, 18, then 36 runs past the end and is clamped to 24.
    assert plan_windows(48, 24, 6) == [(0, 24), (18, 42), (24, 48)]
    assert plan_windows(30, 24, 6) == [(0, 24), (6, 30)]
    assert plan_windows(10, 24, 6) == [(0, 10)]  # the window is capped at N
    assert plan_windows(24, 24, 6) == [(0, 24)]
    assert plan_windows(5, 2, 0) == [(0, 2), (2, 4), (3, 5)]


@pytest.mark.parametrize("n, window, overlap", [
    (n, w, o) for n, w, o in itertools.product([1, 2, 7, 14, 24, 25, 49, 133], [1, 4, 14, 24], [0, 1, 3, 6]) if o < w
])
def test_plan_and_fusion_properties(n, window, overlap):
    windows = plan_windows(n, window, overlap)
    length = min(window, n)
    covered = np.zeros(n, int)
    for start, end in windows:
        assert 0 <= start < end <= n and end - start == length  # every window full-length, in range
        covered[start:end] += 1
    assert (covered >= 1).all()  # every frame covered
    assert windows[-1][1] == n  # the last window is clamped to end at the last frame
    assert len(set(windows)) == len(windows)
    for mode, drop_first in itertools.product(["ramp", "uniform"], [False, True]):
        weights = fusion_weights(windows, n, mode, drop_first)
        total = np.zeros(n)
        for (start, end), w in zip(windows, weights):
            assert w.shape == (end - start,) and (w >= 0).all()
            total[start:end] += w
        np.testing.assert_allclose(total, 1.0)  # weights sum to one for every frame


def test_uniform_is_the_published_mean_without_first_slots():
    windows = plan_windows(48, 24, 6)
    weights = fusion_weights(windows, 48, "uniform", drop_first=True)
    # Frame 18 is position 0 of window 2 (dropped): only window 1 counts.
    assert weights[0][18] == 1.0 and weights[1][0] == 0.0
    # Frame 19: window 1 and window 2 each 1/2; frame 30: windows 2 and 3 (position 6 of window 3) and 1 of 2.
    assert weights[0][19] == weights[1][1] == 0.5
    assert weights[1][12] == pytest.approx(0.5) and weights[2][0] == 0.0


def test_ramp_weights_hand_computed():
    np.testing.assert_array_equal(position_weights(5), [1, 2, 3, 2, 1])
    weights = fusion_weights([(0, 4), (2, 6)], 6, "ramp")
    # Frame 2: position 2 of window 1 (weight 2) and position 0 of window 2 (weight 1).
    assert weights[0][2] == pytest.approx(2 / 3) and weights[1][0] == pytest.approx(1 / 3)


def test_bad_plans():
    with pytest.raises(ValueError, match="overlap"):
        plan_windows(10, 4, 4)
    with pytest.raises(ValueError, match="at least one frame"):
        plan_windows(0, 4, 1)
    with pytest.raises(ValueError, match="unknown fusion mode"):
        fusion_weights([(0, 4)], 4, "cosine")


def test_bad_plans_are_user_errors_the_cli_prints_in_one_line():
    """A value a user can reach is an `InvalidValue`: a ValueError for library callers, a UserError for the CLI."""
    from svd_common.errors import InvalidValue, UserError

    with pytest.raises(InvalidValue) as info:
        plan_windows(10, 24, 30)
    assert isinstance(info.value, ValueError) and isinstance(info.value, UserError)
    assert str(info.value) == "overlap must be in [0, window), got 30 for window 24"


def test_window_plan_holds_the_windows_and_their_weights():
    plan = WindowPlan.make(6, 4, overlap=2, fusion="ramp")
    assert plan.windows == [(0, 4), (2, 6)] and len(plan) == 2 and plan.length == 4
    # Frame 2: position 2 of window 1 (ramp weight 2) and position 0 of window 2 (weight 1), as above.
    np.testing.assert_allclose(plan.weights[0], [1, 1, 2 / 3, 1 / 3])
    np.testing.assert_allclose(plan.weights[1], [1 / 3, 2 / 3, 1, 1])
    whole = WindowPlan.make(5, None)  # no window size: one window over the video, every weight 1
    assert whole.windows == [(0, 5)] and whole.length == 5
    np.testing.assert_array_equal(whole.weights[0], np.ones(5))
