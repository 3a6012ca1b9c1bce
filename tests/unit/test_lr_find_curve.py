"""The range test's arithmetic: its learning rates, the bias-corrected smoothing, and the three
suggestions on curves whose answers are known by construction."""

import math

import numpy as np
import pytest

from lmforge.config import LrFindConfig
from lmforge.engine.lr_find import _valley, exponential_lrs, smooth, suggest


def test_learning_rates_grow_exponentially_from_start_to_end():
    lrs = exponential_lrs(LrFindConfig(start_lr=1e-6, end_lr=1.0, num_steps=7))
    assert lrs[0] == pytest.approx(1e-6) and lrs[-1] == pytest.approx(1.0)
    assert np.allclose(np.diff(np.log10(lrs)), 1.0)  # one decade per step


def test_smoothing_is_bias_corrected_and_a_nan_poisons_the_rest():
    assert smooth([5.0, 5.0, 5.0], 0.98) == pytest.approx([5.0, 5.0, 5.0])  # no pull towards 0
    values = smooth([4.0, 2.0], 0.5)
    assert values == pytest.approx([4.0, (0.5 * 0.5 * 4 + 0.5 * 2) / (1 - 0.25)])
    assert math.isnan(smooth([1.0, float("nan"), 1.0], 0.9)[-1])


def test_the_three_suggestions_on_a_curve_with_known_answers():
    # loss flat at 10 until lr 1e-4, falls linearly in log10(lr) to 2 at lr 1e-1 (steepest in the
    # middle of the fall when made smooth), lowest at 1e-1, then rises
    lrs = list(np.logspace(-7, 1, 81))
    x = np.log10(lrs)
    loss = np.where(x < -4, 10.0, np.where(x <= -1, 10 - 8 * (1 - np.cos(np.pi * (x + 4) / 3)) / 2, 2 + 5 * (x + 1)))
    found = suggest(lrs, list(loss), num_steps=81)
    assert found["minimum"] == pytest.approx(1e-2, rel=0.01)  # the lowest loss's lr, / 10
    assert found["steepest"] == pytest.approx(10**-2.5, rel=0.15)  # where the cosine falls fastest
    assert 1e-4 < found["valley"] < 1e-1  # inside the fall


def test_valley_follows_fastai():
    # the longest decreasing subsequence ends at index 7 (5, 4, 3.5, 3, 2.5, 2, 1.5: 7 points), so
    # fastai's max_start = 7 - 7 = 0, and the index is 0 + int(7 / 3) + int(7 / 3 / 2) = 3
    losses = np.array([5.0, 6.0, 4.0, 3.5, 3.0, 2.5, 2.0, 1.5, 3.0, 9.0])
    assert _valley(losses) == 3
    # fastai's max_start is one before the run (2 - 3 = -1 here): -1 + int(3 / 3) + int(3 / 3 / 2) = 0
    assert _valley(np.array([3.0, 2.0, 1.0])) == 0


def test_too_few_finite_points_is_an_error():
    with pytest.raises(ValueError, match="start_lr"):
        suggest([1e-3, 1e-2, 1e-1], [1.0, float("nan"), float("nan")], num_steps=3)
