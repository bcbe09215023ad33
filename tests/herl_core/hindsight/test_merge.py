"""herl_core.hindsight.merge: guided choice, fallback, random slot (spec §3.9). Run: .venv/bin/pytest <this file>"""

from __future__ import annotations

import numpy as np
import pytest

from herl_core.hindsight.merge import MergePlan, choose_guided, fallback_index, pick_slot, plan_merge


def test_strictly_better_first():
    # group_best 0.5; rewrites [0.5, 0.75, 1.0]: by dense desc → 2 (1.0) > 0.5 → 2
    assert choose_guided([0.5, 0.75, 1.0], group_best=0.5) == 2
    # ties in dense keep index order: [0.75, 0.75] → 0
    assert choose_guided([0.75, 0.75], group_best=0.5) == 0


def test_tie_fallback_ge():
    # nothing > 0.5, rewrite 1 equals it → 1 (≥); rewrite 0 is worse
    assert choose_guided([0.25, 0.5, None], group_best=0.5) == 1


def test_none_qualifies():
    assert choose_guided([0.25, None, 0.0], group_best=0.5) is None
    assert choose_guided([], group_best=0.5) is None
    assert choose_guided([None], group_best=0.0) is None  # an unscorable rewrite is never chosen


def test_fallback_index_ranks_by_dense_then_satisfied():
    # dense ties at 2/3 for 1 and 3; n_satisfied 2 vs 4 → 3
    assert fallback_index([0.0, 2 / 3, 1 / 3, 2 / 3], [0, 2, 1, 4]) == 3
    # full tie → first index
    assert fallback_index([0.5, 0.5], [1, 1]) == 0
    # None ranks below everything, even 0 with fewer satisfied
    assert fallback_index([None, 0.0], [5, 0]) == 1
    with pytest.raises(ValueError):
        fallback_index([], [])


def test_pick_slot_seeded_determinism():
    a = [pick_slot(8, np.random.default_rng(123)) for _ in range(3)]
    b = [pick_slot(8, np.random.default_rng(123)) for _ in range(3)]
    assert a == b and len(set(a)) == 1
    rng1, rng2 = np.random.default_rng(7), np.random.default_rng(7)
    assert [pick_slot(8, rng1) for _ in range(20)] == [pick_slot(8, rng2) for _ in range(20)]
    # it is slot 0 of a permutation of the slots
    assert pick_slot(8, np.random.default_rng(5)) == int(np.random.default_rng(5).permutation(8)[0])


def test_pick_slot_uniform():
    # 8000 draws over 8 slots: expected 1000 each. Chi-square with 7 dof: P(χ² > 24.32) = 0.001.
    rng = np.random.default_rng(0)
    counts = np.bincount([pick_slot(8, rng) for _ in range(8000)], minlength=8)
    chi2 = float(((counts - 1000) ** 2 / 1000).sum())
    assert counts.sum() == 8000 and chi2 < 24.32
    with pytest.raises(ValueError):
        pick_slot(0, rng)


def test_plan_merge_guided_and_fallback():
    rng_a, rng_b = np.random.default_rng(3), np.random.default_rng(3)
    slot = int(np.random.default_rng(3).permutation(4)[0])
    dense, n_sat = [0.5, 0.25, 0.5, 0.0], [1, 1, 2, 0]
    plan = plan_merge([0.75, 0.25], group_best=0.5, dense=dense, n_satisfied=n_sat, rng=rng_a)
    assert plan == MergePlan(outcome="guided", slot=slot, rewrite_index=0, source_index=None)
    # no rewrite ≥ 0.5 → fallback to the best original: dense 0.5 tie between 0 and 2, n_sat 2 wins → 2
    plan = plan_merge([0.25, None], group_best=0.5, dense=dense, n_satisfied=n_sat, rng=rng_b)
    assert plan == MergePlan(outcome="fallback", slot=slot, rewrite_index=None, source_index=2)


def test_plan_merge_append_draws_no_slot():
    rng = np.random.default_rng(0)
    before = rng.bit_generator.state
    plan = plan_merge([1.0], group_best=0.5, dense=[0.5, 0.5], n_satisfied=[1, 1], rng=rng, mode="append")
    assert plan.slot is None and plan.outcome == "guided"
    assert rng.bit_generator.state == before
    with pytest.raises(ValueError, match="append"):
        plan_merge([1.0], 0.5, [0.5], [1], rng, mode="insert")  # type: ignore[arg-type]
