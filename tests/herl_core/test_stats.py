"""herl_core.stats: the Student-t quantile against tables and closed forms, and mean ± CI half-width by hand."""

from __future__ import annotations

import math

import pytest

from herl_core.stats import mean_ci, t_quantile


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
