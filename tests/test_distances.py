"""eval/distances.py against hand-written formulas and planted distributions: KID equals the closed-form unbiased
MMD² with the cubic kernel and is about 0 for two draws of one distribution (FD is not); its interval covers the
large-sample value; FD∞ recovers a distance hidden under a planted 1/N term; precision and recall separate a
collapsed generator (faithful, not diverse) from a faithful one and a disjoint one."""

from __future__ import annotations

import numpy as np
import pytest

from addpipe.eval.distances import (bootstrap, frechet, frechet_infinity, kernel_scale, kid, paired_kid_margin, precision_recall,
                                    sizes_for)
from addpipe.eval.metrics import frechet_between


def mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    """Squared MMD, unbiased, kernel (x·y / D + 1)^3: the within-set sums leave out i = j."""
    d = x.shape[1]
    kxx, kyy, kxy = ((x @ x.T) / d + 1) ** 3, ((y @ y.T) / d + 1) ** 3, ((x @ y.T) / d + 1) ** 3
    m, n = len(x), len(y)
    return float((kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
                 - 2 * kxy.mean())


def gaussian(rng, n: int, d: int, shift: float = 0.0, scale: float = 1.0) -> np.ndarray:
    mean = np.zeros(d)
    mean[0] = shift
    return rng.normal(size=(n, d)) * scale + mean


def test_kid_equals_the_closed_form_unbiased_mmd2_on_random_features():
    rng = np.random.default_rng(1)
    x, y = gaussian(rng, 40, 5), gaussian(rng, 40, 5, shift=0.7, scale=1.3)
    # subsets as large as the sets: every subset is the whole set, so each subset's value is the formula's
    whole = kid(x, y, subsets=5, subset_size=40)
    assert whole.value == pytest.approx(mmd2_unbiased(x, y), rel=1e-9)
    assert whole.details["std"] == pytest.approx(0.0, abs=1e-9) and whole.low == pytest.approx(whole.value)
    # the default: half-size subsets, averaged; their mean estimates the same quantity
    half = kid(x, y, subsets=200, seed=3)
    assert half.details["subset_size"] == 20 and half.low < mmd2_unbiased(x, y) < half.high
    assert kid(x, y, seed=3).value == kid(x, y, seed=3).value  # seeded: the same subsets


def test_kid_is_about_zero_for_two_draws_of_one_distribution_and_fd_is_not():
    rng = np.random.default_rng(2)
    kids, fds = [], []
    for _ in range(12):
        a, b = gaussian(rng, 100, 16), gaussian(rng, 100, 16)
        kids.append(kid(a, b, subsets=20).value)
        fds.append(frechet_between(a, b))
    kids, fds = np.array(kids), np.array(fds)
    assert abs(kids.mean()) < 3 * kids.std(ddof=1) / np.sqrt(len(kids)) and (kids < 0).any()
    assert fds.min() > 1.0  # the 1/N term: d = 16 dimensions at N = 100 give an FD near 2.6 with nothing to find


def test_kid_interval_covers_the_large_sample_value():
    rng = np.random.default_rng(3)
    truth = mmd2_unbiased(gaussian(rng, 3000, 4), gaussian(rng, 3000, 4, shift=0.5))
    covered = sum(estimate.low <= truth <= estimate.high for estimate in
                  (kid(gaussian(rng, 200, 4), gaussian(rng, 200, 4, shift=0.5), subsets=50, seed=i) for i in range(30)))
    assert covered >= 24, covered  # a 95% interval: 30 tries, fewer than 24 covering would be p < 0.001


def test_fd_infinity_recovers_a_distance_under_a_planted_one_over_n_term():
    rng = np.random.default_rng(4)
    reference, generated = gaussian(rng, 2500, 32), gaussian(rng, 2500, 32, shift=1.0)  # true FD: 1.0
    # Two unit Gaussians of d dimensions at N samples each: E[FD_N] = FD + (d^2 + 5d) / (2N) to first order (2d/N
    # from the means, (d^2 + d)/(2N) from the covariances' square-root term): 592/N here, more than the distance at 500
    planted = (32 ** 2 + 5 * 32) / 2
    at_small_n = frechet(reference[:500], generated[:500], resamples=10)
    assert at_small_n.value - 1.0 == pytest.approx(planted / 500, rel=0.25)
    extrapolated = frechet_infinity(reference, generated, seed=0)
    assert extrapolated.low <= 1.0 <= extrapolated.high and abs(extrapolated.value - 1.0) < 0.2
    sizes, values = extrapolated.details["sizes"], extrapolated.details["fd"]
    assert sizes == sorted(sizes) and sizes[-1] == 2500 and values[0] > values[-1]  # FD falls as N grows
    assert extrapolated.details["slope"] == pytest.approx(planted, rel=0.25)


def test_sizes_are_even_in_one_over_n_and_errors_say_what_is_wrong():
    sizes = sizes_for(1000, points=5)
    assert sizes[0] == 200 and sizes[-1] == 1000
    steps = np.diff(1.0 / np.array(sizes[::-1]))
    assert np.allclose(steps, steps[0], rtol=0.05)
    with pytest.raises(ValueError, match="reference set: distances need at least 2 feature vectors .* got no"):
        kid(np.zeros(10), np.zeros((10, 2)))
    with pytest.raises(ValueError, match="generated set: distances need at least 2 feature vectors .* got 1 "):
        frechet(np.zeros((10, 2)), np.zeros((1, 2)))
    with pytest.raises(ValueError, match="subset size 50 must be between 2 and the smaller set's count \\(10\\)"):
        kid(np.zeros((10, 2)), np.zeros((12, 2)), subset_size=50)


def test_precision_and_recall_separate_fidelity_from_diversity():
    rng = np.random.default_rng(5)
    reference = gaussian(rng, 800, 8)
    faithful_p, faithful_r = precision_recall(reference, gaussian(rng, 800, 8))
    collapsed_p, collapsed_r = precision_recall(reference, gaussian(rng, 800, 8, scale=0.15))
    disjoint_p, disjoint_r = precision_recall(reference, gaussian(rng, 800, 8, shift=30.0))
    assert faithful_p.value > 0.8 and faithful_r.value > 0.8
    assert collapsed_p.value > 0.95 and collapsed_r.value < 0.15  # a mode-collapsed generator: faithful, not diverse
    assert disjoint_p.value == 0.0 and disjoint_r.value == 0.0 and 0.0 < disjoint_p.high < 0.01  # Wilson: open at 0
    assert faithful_p.low <= faithful_p.value <= faithful_p.high and faithful_p.high - faithful_p.low < 0.1
    assert faithful_p.details == {"k": 3, "samples": 800}


def test_precision_is_the_share_inside_k_nn_balls_by_hand():
    # 1-D, k = 1: reference at 0, 1, 2, 10 -> radii 1, 1, 1, 8 (to 2); generated at 0.5 (inside), 5 (inside the
    # ball of 10), 30 (outside): precision 2/3
    reference = np.array([[0.0], [1.0], [2.0], [10.0]])
    generated = np.array([[0.5], [5.0], [30.0], [31.0]])
    precision, recall = precision_recall(reference, generated, k=1)
    assert precision.value == pytest.approx(2 / 4)  # 0.5 and 5.0 inside; 30 and 31 outside
    # generated radii: 0.5 -> 4.5 (to 5), 5 -> 4.5, 30 -> 1, 31 -> 1: reference 0, 1, 2 within 4.5 of 0.5; 10 not
    assert recall.value == pytest.approx(3 / 4)


def test_bootstrap_interval_holds_the_value_and_narrows_with_more_samples():
    rng = np.random.default_rng(6)
    small, large = bootstrap(rng.random(50)), bootstrap(rng.random(5000))
    assert small.low <= small.value <= small.high and large.low <= large.value <= large.high
    assert (large.high - large.low) < (small.high - small.low) / 5
    fd = frechet(gaussian(rng, 300, 4), gaussian(rng, 300, 4, shift=1.0), resamples=20)
    assert fd.low < fd.value < fd.high and fd.details == {"generated": 300, "reference": 300}


def test_kid_kernel_scale_is_inceptions_for_inception_and_unit_mean_square_norm_elsewhere():
    rng = np.random.default_rng(7)
    x, y = gaussian(rng, 60, 6, shift=30.0) * 10, gaussian(rng, 60, 6, shift=31.0) * 10  # features far from unit scale
    assert kernel_scale(x, "inception") is None  # the published KID: gamma = 1/D
    gamma = kernel_scale(x, "classifier")
    assert gamma == pytest.approx(1.0 / np.mean(np.sum(x ** 2, axis=1)))
    # gamma on x is the default 1/D on x rescaled by sqrt(gamma D): the same kernel values, the same KID
    c = np.sqrt(gamma * x.shape[1])
    assert kid(x, y, subsets=10, seed=1, gamma=gamma).value == pytest.approx(kid(x * c, y * c, subsets=10, seed=1).value, rel=1e-9)
    assert kid(x, y, subsets=10, subset_size=60, gamma=gamma).value == pytest.approx(
        mmd2_unbiased(x * c, y * c), rel=1e-9)


def test_paired_kid_margin_is_the_difference_of_the_formulas_and_resolves_what_separate_intervals_cannot():
    rng = np.random.default_rng(9)
    reference, base = gaussian(rng, 40, 5), gaussian(rng, 40, 5)
    shifted = base + np.array([0.5, 0, 0, 0, 0])
    whole = paired_kid_margin(reference, shifted, base, scale=0.7, subsets=3, subset_size=40)
    assert whole.value == pytest.approx(mmd2_unbiased(reference, shifted) - 0.7 * mmd2_unbiased(reference, base), rel=1e-9)
    # two arms answering the same prompts from the same noise, one worse on every row: the two KIDs' intervals
    # overlap (judging by overlap adds both half-widths), the margin's own interval (one for the difference itself,
    # on shared subsets) does not reach 0
    rng = np.random.default_rng(9)
    reference, base = gaussian(rng, 600, 4), gaussian(rng, 600, 4)
    worse = base + np.array([0.4, 0, 0, 0])
    a, b = kid(reference, worse), kid(reference, base)
    assert a.low < b.high  # not told apart one at a time
    margin = paired_kid_margin(reference, worse, base)
    assert margin.low > 0 and margin.value == pytest.approx(a.value - b.value, abs=0.5 * (margin.high - margin.low))
    assert paired_kid_margin(reference, base, worse).high < 0  # base beats worse
    with pytest.raises(ValueError, match="one row per pair, got 600 and 599"):
        paired_kid_margin(reference, base, worse[:599])


def test_paired_margin_interval_covers_the_large_sample_margin():
    rng = np.random.default_rng(10)

    def arms(n):  # arm b, and arm a = b moved and squeezed a little on every row: paired rows
        b = gaussian(rng, n, 4, shift=0.3)
        return b * 0.9 + np.array([0.2, 0, 0, 0]), b

    big_a, big_b = arms(3000)
    big_reference = gaussian(rng, 3000, 4)
    truth = mmd2_unbiased(big_reference, big_a) - mmd2_unbiased(big_reference, big_b)
    covered = 0
    for i in range(30):
        a, b = arms(200)
        margin = paired_kid_margin(gaussian(rng, 200, 4), a, b, subsets=50, seed=i)
        covered += margin.low <= truth <= margin.high
    assert covered >= 24, covered


def test_fd_interval_is_as_wide_as_fd_varies_between_independent_draws():
    rng = np.random.default_rng(11)
    mixing = np.linalg.qr(rng.normal(size=(16, 16)))[0] * np.linspace(0.3, 2.0, 16)  # anisotropic features
    reference = rng.normal(size=(400, 16)) @ mixing

    def generated():
        return rng.normal(size=(400, 16)) @ mixing + np.r_[1.0, np.zeros(15)]

    spread = np.std([frechet_between(generated(), reference) for _ in range(25)], ddof=1)
    estimate = frechet(reference, generated(), resamples=40)
    assert 0.7 < (estimate.high - estimate.value) / 1.959963984540054 / spread < 1.6


def test_metrics_json_entries_for_small_sets_say_what_was_skipped():
    from addpipe.eval.analysis import distance_metrics

    rng = np.random.default_rng(12)
    reference = gaussian(rng, 50, 3)
    alone = distance_metrics(reference, gaussian(rng, 1, 3))
    assert "frechet_distance" not in alone and "fewer than 2 images" in alone["distances_skipped"]
    few = distance_metrics(reference, gaussian(rng, 5, 3), resamples=5)
    assert set(few["intervals"]) == {"frechet_distance"} and "need 8 samples per set" in few["distances_skipped"]
    full = distance_metrics(reference, gaussian(rng, 40, 3), resamples=5, network="classifier")
    assert set(full["intervals"]) == {"frechet_distance", "fd_infinity", "kid", "precision", "recall"}
    assert full["samples"]["kid_gamma"] == pytest.approx(kernel_scale(reference, "classifier"))
    with pytest.raises(ValueError, match="reference set: distances need at least 2"):
        distance_metrics(gaussian(rng, 1, 3), gaussian(rng, 40, 3))


def test_share_intervals_hold_the_share_at_zero_and_one():
    from addpipe.eval.ratings import wilson_interval

    for n in range(1, 400):  # before: rounding left the upper bound a hair below 1 for some n (a negative error bar)
        low, high = wilson_interval(n, n)
        assert low < 1.0 <= high and high == 1.0
        low, high = wilson_interval(0, n)
        assert low == 0.0 < high
