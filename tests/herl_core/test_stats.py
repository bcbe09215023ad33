"""herl_core.stats: the Student-t quantile against tables and closed forms, mean ± CI half-width, the Wilson interval
and the cluster-robust interval, by hand."""

from __future__ import annotations

import math

import pytest

from herl_core.stats import cluster_mean_ci, mean_ci, t_quantile, wilson, z_quantile


@pytest.mark.parametrize(
    ("p", "df", "expected"),
    [
        (0.975, 1, 12.7062),  # = tan(π·0.475), closed form for df = 1
        (0.975, 2, 4.3027),  # = (2p−1)/√(2p(1−p)) = 0.95/√0.04875 = 4.30265, closed form for df = 2
        (0.975, 4, 2.7764),  # printed t tables
        (0.975, 29, 2.0452),
        (0.95, 9, 1.8331),
        (0.5, 3, 0.0),  # the median
    ],
)
def test_t_quantile_matches_tables(p, df, expected):
    assert t_quantile(p, df) == pytest.approx(expected, abs=5e-4)


def test_t_quantile_closed_forms_exactly():
    assert t_quantile(0.975, 1) == pytest.approx(math.tan(math.pi * 0.475), rel=1e-7)
    assert t_quantile(0.9, 2) == pytest.approx(0.8 / math.sqrt(2 * 0.9 * 0.1), rel=1e-7)


def test_t_quantile_rejects_bad_arguments():
    with pytest.raises(ValueError, match="df >= 1"):
        t_quantile(0.975, 0)
    with pytest.raises(ValueError, match="0.5 <= p < 1"):
        t_quantile(0.2, 3)


def test_mean_ci_three_values_by_hand():
    # mean = 0.4; s² = (0.04 + 0 + 0.04) / 2 = 0.04 → s = 0.2; h = 4.3027 · 0.2 / √3 = 0.49683
    ci = mean_ci([0.2, 0.4, 0.6])
    assert ci["n"] == 3
    assert ci["mean"] == pytest.approx(0.4)
    assert ci["sd"] == pytest.approx(0.2)
    assert ci["half"] == pytest.approx(0.49683, abs=1e-5)


def test_mean_ci_one_seed_has_no_ci_and_skips_missing():
    assert mean_ci([0.7]) == {"n": 1, "mean": 0.7, "sd": None, "half": None, "values": [0.7]}
    # None and NaN are not seeds: [0.1, 0.3] → mean 0.2, s = 0.141421, h = 12.7062 · 0.141421 / √2 = 1.27062
    ci = mean_ci([0.1, None, float("nan"), 0.3])
    assert (ci["n"], ci["mean"]) == (2, pytest.approx(0.2))
    assert ci["half"] == pytest.approx(1.27062, abs=1e-4)
    assert mean_ci([])["mean"] is None


def test_t_quantile_equals_scipy_where_available():
    stats = pytest.importorskip("scipy.stats")
    for df in (1, 2, 3, 5, 8, 30, 120):
        for p in (0.9, 0.975, 0.995):
            assert t_quantile(p, df) == pytest.approx(float(stats.t.ppf(p, df)), rel=1e-9)


# z = z(0.975) = 1.959964, z² = 3.841459; Wilson: centre = (k + z²/2)/(n + z²), half = z/(n + z²)·√(k(n−k)/n + z²/4)


@pytest.mark.parametrize(
    ("k", "n", "lo", "hi"),
    [
        (0, 10, 0.0, 0.277533),  # centre = 1.920729/13.841459 = 0.138766 = half (= 0.141601 · √0.960365)
        (5, 10, 0.236593, 0.763407),  # centre 0.5, half = 0.141601 · √(2.5 + 0.960365) = 0.263407
        (10, 10, 0.722467, 1.0),  # the mirror of 0/10
        (3, 4, 0.300642, 0.954413),  # centre = 4.920729/7.841459 = 0.627527, half = 0.249949 · √1.710365 = 0.326885
        (1, 1, 0.206549, 1.0),  # centre = 2.920729/4.841459 = 0.603275, half = 0.404829 · √0.960365 = 0.396725
    ],
)
def test_wilson_by_hand(k, n, lo, hi):
    ci = wilson(k, n)
    assert (ci["k"], ci["n"], ci["rate"]) == (k, n, pytest.approx(k / n))
    assert (ci["lo"], ci["hi"]) == (pytest.approx(lo, abs=2e-6), pytest.approx(hi, abs=2e-6))


def test_wilson_level_empty_and_bad_counts():
    assert z_quantile(0.975) == pytest.approx(1.959964, abs=1e-6)
    # 90 %: z = 1.644854, z² = 2.705543; 5/10 → half = 1.644854/12.705543 · √(2.5 + 0.676386) = 0.230728
    ci = wilson(5, 10, level=0.90)
    assert (ci["lo"], ci["hi"]) == (pytest.approx(0.5 - 0.230728, abs=2e-6), pytest.approx(0.5 + 0.230728, abs=2e-6))
    assert wilson(0, 0) == {"k": 0, "n": 0, "rate": None, "lo": None, "hi": None}
    with pytest.raises(ValueError, match="0 <= k <= n"):
        wilson(3, 2)
    with pytest.raises(ValueError, match="0 <= k <= n"):
        wilson(-1, 2)


def test_wilson_equals_scipy_where_available():
    stats = pytest.importorskip("scipy.stats")
    for k, n in ((0, 7), (3, 11), (40, 213), (213, 213)):
        lo, hi = stats.binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
        ci = wilson(k, n)
        assert (ci["lo"], ci["hi"]) == (pytest.approx(lo, abs=1e-9), pytest.approx(hi, abs=1e-9))


def test_cluster_mean_ci_by_hand():
    # mean 0.75; residual sums a: 0.25 − 0.75 = −0.5, b: 0.25, c: 0.25 → Σ S² = 0.375
    # se² = 3/2 · 0.375 / 4² = 0.03515625 → se = 0.1875; half = t(0.975, 2) · 0.1875 = 4.302653 · 0.1875 = 0.806747
    ci = cluster_mean_ci([1.0, 0.0, 1.0, 1.0], ["a", "a", "b", "c"])
    assert (ci["n"], ci["clusters"]) == (4, 3)
    assert ci["mean"] == pytest.approx(0.75)
    assert ci["se"] == pytest.approx(0.1875)
    assert ci["half"] == pytest.approx(0.806747, abs=1e-6)
    assert (ci["lo"], ci["hi"]) == (pytest.approx(0.75 - 0.806747, abs=1e-6), pytest.approx(0.75 + 0.806747, abs=1e-6))


def test_cluster_mean_ci_with_one_value_per_cluster_is_the_student_t_interval():
    plain = mean_ci([0.2, 0.4, 0.6])
    ci = cluster_mean_ci([0.2, 0.4, 0.6], [1, 2, 3])
    assert ci["half"] == pytest.approx(plain["half"], rel=1e-12) == pytest.approx(0.49683, abs=1e-5)


def test_cluster_mean_ci_needs_two_clusters_and_equal_lengths():
    one = cluster_mean_ci([0.0, 1.0], ["a", "a"])
    assert (one["mean"], one["clusters"], one["half"], one["lo"]) == (0.5, 1, None, None)
    assert cluster_mean_ci([], [])["mean"] is None
    with pytest.raises(ValueError, match="same length"):
        cluster_mean_ci([1.0], ["a", "b"])
