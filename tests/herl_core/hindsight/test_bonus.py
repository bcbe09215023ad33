"""herl_core.hindsight.bonus: r' = r + α(r_rw − r) (spec §3.8). Run: .venv/bin/pytest <this file>"""

from __future__ import annotations

import pytest

from herl_core.hindsight.bonus import bonus, shaped_reward


def test_positive_bonus():
    # r = 1/3, r_rw = 1, α = 0.05: delta = 0.05·(2/3) = 0.033333, r' = 0.366667
    r_new, delta = shaped_reward(1 / 3, [1.0], alpha=0.05)
    assert delta == pytest.approx(0.05 * 2 / 3) and r_new == pytest.approx(1 / 3 + 0.05 * 2 / 3)


def test_negative_bonus():
    # r = 0.5, r_rw = 0.0, α = 0.05: delta = 0.05·(−0.5) = −0.025, r' = 0.475
    assert bonus(0.5, 0.0, 0.05) == pytest.approx(-0.025)
    assert shaped_reward(0.5, [0.0], 0.05) == pytest.approx((0.475, -0.025))


def test_max_over_rewrites():
    # rewrites [0.2, 0.8, None, 0.5] → r_rw = 0.8 (None skipped); r = 0.4: delta = 0.05·0.4 = 0.02, r' = 0.42
    assert shaped_reward(0.4, [0.2, 0.8, None, 0.5], 0.05) == pytest.approx((0.42, 0.02))


def test_no_rewrites_leaves_reward_unchanged():
    assert shaped_reward(0.4, [], 0.05) == (0.4, 0.0)
    assert shaped_reward(0.4, [None], 0.05) == (0.4, 0.0)


def test_alpha_zero_and_invalid_alpha():
    assert shaped_reward(0.4, [1.0], 0.0) == (0.4, 0.0)
    with pytest.raises(ValueError, match="alpha"):
        bonus(0.4, 1.0, -0.1)
