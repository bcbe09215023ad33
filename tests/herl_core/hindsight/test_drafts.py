"""herl_core.hindsight.drafts: failed groups and draft selection (spec §3.4). Run: .venv/bin/pytest <this file>"""

from __future__ import annotations

import pytest

from herl_core.hindsight.drafts import is_failed, select_drafts


def test_is_failed_threshold():
    assert is_failed([0.5, 2 / 3, 0.0], threshold=1.0)  # best 2/3 < 1
    assert not is_failed([0.5, 1.0, 0.0], threshold=1.0)  # one perfect response → not failed (§9-A7)
    assert not is_failed([0.5, 0.7], threshold=0.7)  # best == threshold → not failed (strict <)
    assert is_failed([0.5, None, 0.2], threshold=1.0)  # None skipped: best 0.5


def test_group_with_no_scorable_response_is_not_failed():
    assert not is_failed([None, None], threshold=1.0)
    assert not is_failed([], threshold=1.0)
    assert select_drafts([None, None], [0, 0], threshold=1.0, candidate_limit=16) == []


def test_not_failed_gives_no_drafts():
    assert select_drafts([1.0, 0.5], [3, 1], threshold=1.0, candidate_limit=16) == []


def test_ties_within_tol_sorted_by_satisfied_count():
    # best = 2/3 (index 1). Index 3 is 2/3 − 5e-7 (tied within 1e-6), index 4 is 2/3 − 2e-6 (not tied).
    # tied = [1, 3, 5] with n_satisfied [2, 4, 2] → sorted desc, stable: 3 (4), then 1, 5 (2 each, index order)
    dense = [0.0, 2 / 3, 1 / 3, 2 / 3 - 5e-7, 2 / 3 - 2e-6, 2 / 3, None]
    n_sat = [0, 2, 1, 4, 2, 2, 0]
    assert select_drafts(dense, n_sat, threshold=1.0, candidate_limit=16) == [3, 1, 5]


def test_candidate_limit_caps_after_sorting():
    # all 8 tied at 0.5; n_satisfied [1,3,1,3,2,1,3,2] → order 1,3,6 (3), 4,7 (2), 0,2,5 (1); cap 4 → [1,3,6,4]
    dense = [0.5] * 8
    n_sat = [1, 3, 1, 3, 2, 1, 3, 2]
    assert select_drafts(dense, n_sat, threshold=1.0, candidate_limit=4) == [1, 3, 6, 4]
    assert select_drafts(dense, n_sat, threshold=1.0, candidate_limit=16) == [1, 3, 6, 4, 7, 0, 2, 5]


def test_all_zero_group_makes_every_scorable_response_a_draft():
    assert select_drafts([0.0, 0.0, None, 0.0], [0, 0, 0, 0], threshold=1.0, candidate_limit=16) == [0, 1, 3]


def test_bad_inputs():
    with pytest.raises(ValueError, match="same length"):
        select_drafts([0.5], [1, 2], threshold=1.0, candidate_limit=16)
    with pytest.raises(ValueError, match="candidate_limit"):
        select_drafts([0.5], [1], threshold=1.0, candidate_limit=0)
