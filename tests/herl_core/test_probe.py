"""herl_core.probe: the readiness-probe summaries of the rollout and hindsight stages, on hand-built rows.

Run: .venv/bin/pytest tests/herl_core/test_probe.py
"""

from __future__ import annotations

import pytest

from herl_core.probe import hindsight_summary, rollout_summary
from herl_core.records import HindsightRecord, RewardResult, RolloutRecord, Verdict


def v(rubric: str, passed: bool | None) -> Verdict:
    return Verdict(rubric_id=rubric, description=rubric, passed=passed)


def row(prompt: str, k: int, score: float | None, verdicts: list[Verdict], finished: bool = True) -> RolloutRecord:
    failed = score is None
    reward = RewardResult(score=score, dense=score, verdicts=verdicts, failed=failed, error="x" if failed else None)
    return RolloutRecord(prompt_id=prompt, sample_index=k, response="r", reward=reward, n_tokens=3, finished=finished)


ROWS = [
    row("a", 0, 1.0, [v("c1", True), v("c2", True)]),
    row("a", 1, 0.5, [v("c1", True), v("c2", False)], finished=False),
    row("b", 0, 0.0, [v("c1", False)]),
    row("b", 1, 0.0, [v("c1", False)]),
    row("c", 0, 0.5, [v("ifeval/c2", True), v("c3", None)]),
    row("c", 1, None, []),  # a failed reward call
]


def test_rollout_summary_hand_counts():
    s = rollout_summary(ROWS)
    assert (s["prompts"], s["samples"], s["reward/failed_calls"]) == (3, 6, 1)
    assert s["reward/mean"] == pytest.approx((1 + 0.5 + 0 + 0 + 0.5) / 5)  # = 0.4, the failed call left out
    # zero std: a {1, .5} no; b {0, 0} yes; c one scored sample → yes
    assert s["reward/frac_zero_std"] == pytest.approx(2 / 3)
    # pass@G: a0 meets both rubrics; b none; c0 has an unscorable rubric (not met) → 1 of 3
    assert s["pass_at_G"] == pytest.approx(1 / 3)
    # failed (best dense < 1): a best 1.0 no; b 0.0 yes; c 0.5 yes
    assert s["failed_group_frac"] == pytest.approx(2 / 3)
    assert s["truncated_frac"] == pytest.approx(1 / 6)
    # c1: a0 T, a1 T, b0 F, b1 F; c2: a0 T, a1 F, c0 T ("ifeval/c2" is type c2); c3 unscorable → absent
    assert s["per_type"] == {"c1": {"n": 4, "passed": 2, "rate": 0.5}, "c2": {"n": 3, "passed": 2, "rate": 2 / 3}}


def experience(verdicts, rewrite_verdicts, draft_dense, rewrite_dense) -> HindsightRecord:
    return HindsightRecord(
        prompt_id="p", draft_index=0, draft="d", draft_score=draft_dense, draft_dense=draft_dense, verdicts=verdicts,
        hindsight_prompt="h", rewrite="r", rewrite_score=rewrite_dense, rewrite_dense=rewrite_dense,
        rewrite_verdicts=rewrite_verdicts, bonus=0.0, shaped_score=draft_dense, group_best=draft_dense, selected=False,
    )  # fmt: skip


def test_hindsight_summary_per_type_counts_only_constraints_the_draft_failed():
    exps = [
        experience([v("c1", False), v("c2", True)], [v("c1", True), v("c2", True)], 0.5, 1.0),
        experience([v("c1", False), v("c2", False)], [v("c1", False), v("c2", True)], 0.0, 0.5),
        experience([v("c1", False)], [], 0.0, None),  # rewrite reward failed
    ]
    s = hindsight_summary(exps, {"herl/rewrites": 3.0}, groups=2)
    assert s["groups"] == 2 and s["herl/rewrites"] == 3.0
    # c1 failed in all 3 drafts; fixed by rewrite 1 only → 1/3; scored rewrites 1, 2 both beat their draft → 2/2
    assert s["per_type"]["c1"] == {
        "n": 3, "fixed": 1, "n_scored": 2, "improved": 2, "fix_rate": 1 / 3, "success_rate": 1.0,
    }  # fmt: skip
    # c2 failed only in draft 2, whose rewrite passes it and beats the draft
    assert s["per_type"]["c2"] == {
        "n": 1,
        "fixed": 1,
        "n_scored": 1,
        "improved": 1,
        "fix_rate": 1.0,
        "success_rate": 1.0,
    }
    # fully correct rewrites: only the first → 1/3
    assert s["herl/rewrite_fully_correct_rate"] == pytest.approx(1 / 3)
