"""herl_core.control: the readiness probe's control (rewrite vs resample) on hand-built verdicts, every number of the
table counted by hand. The generation side runs in tests/flows/test_stages.py (tiny model, the hindsight stage).

Run: .venv/bin/pytest tests/herl_core/test_control.py
"""

from __future__ import annotations

from dataclasses import replace

import pytest

from herl_core.config import HindsightConfig, ModelConfig, RolloutConfig
from herl_core.control import budget, control_records, control_summary, resample_sampling, verdict
from herl_core.hindsight.step import hindsight_step
from herl_core.records import (
    ControlOutput,
    ControlRecord,
    PromptRecord,
    RewardResult,
    RolloutRecord,
    Rubric,
    Verdict,
)
from herl_core.rollout.base import Generation, stable_key
from herl_core.samples import Group, Sample
from herl_core.stats import wilson

T975_1 = 12.706205  # t(0.975, 1): two prompts → one degree of freedom


def v(rubric: str, passed: bool | None) -> Verdict:
    return Verdict(rubric_id=rubric, description=rubric, passed=passed)


def out(dense: float | None, verdicts: list[Verdict] = (), n_tokens: int = 10, finished: bool = True,
        text: str = "t", failed: bool = False) -> ControlOutput:  # fmt: skip
    """dense None and not failed = an empty output (not scored)."""
    if failed:
        reward = RewardResult(score=None, dense=None, failed=True, error="judge timed out")
    elif dense is None:
        reward, text = None, ""
    else:
        reward = RewardResult(score=dense, dense=dense, verdicts=list(verdicts))
    return ControlOutput(text=text, n_tokens=n_tokens, finished=finished, reward=reward)


def rec(prompt: str, k: int, dense: float, verdicts, rewrites, resamples) -> ControlRecord:
    return ControlRecord(prompt_id=prompt, draft_index=k, draft="d", draft_dense=dense, draft_verdicts=verdicts,
                         rewrites=rewrites, resamples=resamples)  # fmt: skip


# p1 has rubrics a, b; p2 has "ifeval/a" (type a) and c; p3 has a. Types: a, b, c.
RECORDS = [
    # D1: the rewrite fixes a (beats, +0.5); the resample breaks b (−0.5)
    rec("p1", 0, 0.5, [v("a", False), v("b", True)],
        [out(1.0, [v("a", True), v("b", True)], n_tokens=12)],
        [out(0.0, [v("a", False), v("b", False)], n_tokens=20, finished=False)]),
    # D2 (same group): the rewrite is empty, so the draft stands; the resample fixes a (beats, +0.5)
    rec("p1", 1, 0.5, [v("a", False), v("b", True)],
        [out(None, n_tokens=1)],
        [out(1.0, [v("a", True), v("b", True)], n_tokens=8)]),
    # D3: the rewrite fixes c (beats, +0.5); the resample changes nothing (0.0 → 0.0)
    rec("p2", 0, 0.0, [v("ifeval/a", False), v("c", False)],
        [out(0.5, [v("ifeval/a", False), v("c", True)], n_tokens=30)],
        [out(0.0, [v("ifeval/a", False), v("c", False)], n_tokens=30)]),
    # D4: a rewrite could not be scored (judge failure): left out of the comparison, never scored 0
    rec("p3", 0, 0.0, [v("a", False)], [out(None, failed=True, n_tokens=5)], [out(1.0, [v("a", True)], n_tokens=5)]),
]  # fmt: skip


def rollout(prompt: str, k: int, verdicts: list[Verdict]) -> RolloutRecord:
    score = sum(bool(x.passed) for x in verdicts) / len(verdicts)
    reward = RewardResult(score=score, dense=score, verdicts=verdicts)
    return RolloutRecord(prompt_id=prompt, sample_index=k, response="r", reward=reward, n_tokens=3)


ROLLOUT = [
    rollout("p1", 0, [v("a", True), v("b", True)]),
    rollout("p1", 1, [v("a", False), v("b", True)]),
    rollout("p2", 0, [v("ifeval/a", False), v("c", False), v("d", None)]),  # d unscorable: not counted
]


@pytest.fixture(scope="module")
def table():
    summary, rows = control_summary(RECORDS, ROLLOUT, samples=1, max_new_tokens=32, model="m")
    return summary, {r.type: r for r in rows}


def rate(row, col, k, n):
    """The column holds k/n with the Wilson bounds of k of n."""
    ci = wilson(k, n)
    assert getattr(row, col) == pytest.approx(k / n), col
    assert (getattr(row, f"{col}_lo"), getattr(row, f"{col}_hi")) == (pytest.approx(ci["lo"]), pytest.approx(ci["hi"]))


def test_overall_row_by_hand(table):
    summary, rows = table
    assert (summary["drafts"], summary["compared"], summary["unscorable"]) == (4, 3, 1)
    row = rows["all"]
    assert list(rows) == ["all", "a", "b", "c"]
    assert (row.drafts, row.prompts, row.unmet, row.met) == (3, 2, 4, 2)  # unmet: D1 a, D2 a, D3 a, D3 c; met: b ×2
    rate(row, "rewrite_beats", 2, 3)  # D1, D3
    rate(row, "resample_beats", 1, 3)  # D2
    rate(row, "rewrite_fix", 2, 4)  # D1 a, D3 c (D2's draft stands: nothing fixed)
    rate(row, "resample_fix", 1, 4)  # D2 a
    rate(row, "rewrite_break", 0, 2)
    rate(row, "resample_break", 1, 2)  # D1 b
    rate(row, "unaided_pass", 3, 6)  # a T, b T, a F, b T, a F, c F (d unscorable)
    assert row.unaided_n == 6
    # difference per draft: D1 1 − 0, D2 0 − 1, D3 1 − 0 → mean 1/3; residual sums p1: 2/3 − 4/3 = −2/3, p2: 2/3
    # se² = 2/1 · (4/9 + 4/9) / 3² = 16/81 → se = 4/9; half = t(0.975, 1) · 4/9
    assert row.difference == pytest.approx(1 / 3)
    assert row.difference_lo == pytest.approx(1 / 3 - T975_1 * 4 / 9, abs=1e-5)
    assert row.difference_hi == pytest.approx(1 / 3 + T975_1 * 4 / 9, abs=1e-5)
    # rewrite gains 0.5, 0, 0.5 → 1/3; residual sums p1: 1/6 − 1/3 = −1/6, p2: 1/6 → se² = 2 · (2/36) / 9 = 1/81
    assert row.rewrite_gain == pytest.approx(1 / 3)
    assert row.rewrite_gain_hi - row.rewrite_gain == pytest.approx(T975_1 / 9, abs=1e-5)
    # resample gains −0.5, 0.5, 0 → 0; residual sums p1: 0, p2: 0 → a zero-width interval
    assert (row.resample_gain, row.resample_gain_lo, row.resample_gain_hi) == pytest.approx((0.0, 0.0, 0.0))


def test_type_rows_cover_the_drafts_that_failed_the_type(table):
    _, rows = table
    a = rows["a"]  # failed by D1, D2, D3 ("ifeval/a" is type a); met by none
    assert (a.drafts, a.prompts, a.unmet, a.met) == (3, 2, 3, 0)
    rate(a, "rewrite_beats", 2, 3)
    rate(a, "rewrite_fix", 1, 3)  # D1 only (D3's rewrite fixes c, not a)
    rate(a, "resample_fix", 1, 3)  # D2
    assert (a.rewrite_break, a.rewrite_break_lo, a.resample_break) == (None, None, None)
    rate(a, "unaided_pass", 1, 3)
    b = rows["b"]  # failed by no draft: no beats or fix; met by D1, D2
    assert (b.drafts, b.unmet, b.met, b.rewrite_beats, b.difference) == (0, 0, 2, None, None)
    rate(b, "rewrite_break", 0, 2)
    rate(b, "resample_break", 1, 2)
    rate(b, "unaided_pass", 2, 2)
    c = rows["c"]  # failed by D3 alone: one prompt, so the means have no interval
    rate(c, "rewrite_beats", 1, 1)
    rate(c, "resample_beats", 0, 1)
    rate(c, "rewrite_fix", 1, 1)
    assert (c.difference, c.difference_lo, c.difference_hi, c.rewrite_gain) == (1.0, None, None, 0.5)
    rate(c, "unaided_pass", 0, 1)


def test_budget_counts_what_each_arm_generated(table):
    summary, _ = table
    b = summary["budget"]
    assert (b["generations_per_draft"], b["max_new_tokens"], b["allotted_tokens_per_draft"]) == (1, 32, 32)
    # rewrites 12 + 1 (empty) + 30 + 5 (failed) = 48 tokens; resamples 20 + 8 + 30 + 5 = 63; over the 4 drafts
    assert b["rewrite"] == {"generations": 4, "tokens": 48, "tokens_per_draft": 12.0, "truncated_frac": 0.0,
                            "empty": 1}  # fmt: skip
    assert b["resample"] == {"generations": 4, "tokens": 63, "tokens_per_draft": 15.75, "truncated_frac": 0.25,
                             "empty": 0}  # fmt: skip
    assert b["resample_to_rewrite_tokens"] == pytest.approx(63 / 48)
    assert budget([], 1, 32)["rewrite"]["tokens_per_draft"] is None


def test_best_generation_of_an_arm_is_the_first_of_the_top_score():
    # two rewrites tie at 0.5: the first (fixes a) is the arm's output, not the second (fixes b)
    draft = [v("a", False), v("b", False)]
    r = rec("p", 0, 0.0, draft,
            [out(0.5, [v("a", True), v("b", False)]), out(0.5, [v("a", False), v("b", True)])],
            [out(0.0, [v("a", False), v("b", False)]), out(1.0, [v("a", True), v("b", True)])])  # fmt: skip
    summary, rows = control_summary([r], [], samples=2, max_new_tokens=8, model="m")
    by_type = {x.type: x for x in rows}
    assert (by_type["a"].rewrite_fix, by_type["b"].rewrite_fix) == (1.0, 0.0)
    assert (by_type["all"].resample_gain, by_type["all"].resample_fix) == (1.0, 1.0)  # best of 2 resamples: 1.0
    assert summary["budget"]["allotted_tokens_per_draft"] == 16


def row_with(**diff):
    _, rows = control_summary(RECORDS, ROLLOUT, samples=1, max_new_tokens=32, model="m")
    return rows[0].model_copy(update=diff)


def test_verdict_wording_follows_the_interval():
    up = verdict(row_with(difference=0.12, difference_lo=0.05, difference_hi=0.19), "smol")
    assert up.startswith("guidance beats resampling by 12.0 points [+5.0, +19.0] on smol (P(rewrite > draft) 66.7 %")
    down = verdict(row_with(difference=-0.12, difference_lo=-0.19, difference_hi=-0.05), "smol")
    assert down.startswith("resampling beats guidance by 12.0 points [-19.0, -5.0] on smol")
    tie = verdict(row_with(difference=0.03, difference_lo=-0.04, difference_hi=0.10), "smol")
    assert tie.startswith("guidance and resampling do not separate on smol: difference +3.0 points [-4.0, +10.0]")
    assert "covers 0" in tie
    assert verdict(row_with(drafts=0, difference=None), "smol").startswith("no draft to compare on smol")


def test_no_drafts_gives_an_empty_table_not_an_error():
    summary, rows = control_summary([], ROLLOUT, samples=1, max_new_tokens=32, model="m")
    assert summary["compared"] == 0 and rows[0].drafts == 0 and rows[0].rewrite_beats is None
    assert summary["verdict"].startswith("no draft to compare")
    assert rows[0].unaided_pass == pytest.approx(0.5)  # the rollout's pass rate is still reported


def test_resample_sampling_is_the_rollouts_under_the_rewrite_cap():
    rollout_cfg = RolloutConfig(temperature=0.9, top_p=0.95, top_k=40, max_new_tokens=64)
    s = resample_sampling(HindsightConfig(rewrite_max_new_tokens=96), rollout_cfg, None, seed=7)
    assert (s.temperature, s.top_p, s.top_k, s.max_new_tokens, s.seed) == (0.9, 0.95, 40, 96, 7)
    s = resample_sampling(HindsightConfig(), rollout_cfg, 0.3, seed=None)  # no rewrite cap: the rollout's
    assert (s.temperature, s.max_new_tokens) == (0.3, 64)


# --------------------------------------------------------------------------------------------------------------------
# the generation side, on a scripted engine and the real IFEval checkers


class ScriptedEngine:
    """Returns the scripted texts in order (EOS appended; ``cut`` texts are returned as truncated, without EOS)."""

    def __init__(self, tokenizer, texts: list[str], cut: frozenset[str] = frozenset()):
        self.tok, self.texts, self.cut, self.calls = tokenizer, list(texts), cut, []

    def generate(self, prompts, n, sampling):
        self.calls.append((prompts, n, sampling))
        out = []
        for p in prompts:
            for _ in range(n):
                text = self.texts.pop(0)
                ids = self.tok(text, add_special_tokens=False)["input_ids"]
                done = text not in self.cut
                out.append(Generation(list(p), ids + [self.tok.eos_token_id] * done, finished=done))
        return out

    def sync_weights(self):
        pass


def test_control_records_pair_each_draft_with_resamples_from_the_original_prompt():
    from herl_core.models import encode_prompt, load_tokenizer
    from herl_core.rewards.constraints import ConstraintReward

    tok = load_tokenizer(ModelConfig(name_or_path="tiny"))
    reward = ConstraintReward()
    rubrics = [Rubric(id="change_case:english_lowercase"), Rubric(id="punctuation:no_comma")]
    record = PromptRecord(id="p0", prompt="Greet the world.", rubrics=rubrics)
    originals = ["The sun, hot", "the sun, hot", "The sun hot", "THE SUN, HOT"]  # dense 0, .5, .5, 0: drafts 1, 2
    ids = encode_prompt(tok, record.prompt)
    results = reward.score([record] * 4, originals)
    group = Group(record, ids, [Sample(list(ids), [1], t, r, r.score) for t, r in zip(originals, results, strict=True)])
    before = [replace(group, samples=[s.copy() for s in group.samples])]
    hindsight = HindsightConfig(rewrite_max_new_tokens=12)
    rollout_cfg = RolloutConfig(temperature=0.9, max_new_tokens=8)
    engine = ScriptedEngine(tok, ["the sun hot", "The sun, HOT"])
    out = hindsight_step([group], engine, reward, tok, hindsight, rollout_cfg, (0,), seed=1)
    engine.texts = ["the sun hot", " "]  # the resamples: draft 1's meets both rubrics, draft 2's is empty
    engine.cut = frozenset({"the sun hot"})
    records = control_records(before, out.jobs, engine, reward, tok, hindsight, rollout_cfg, seed=5)
    prompts, n, sampling = engine.calls[-1]
    assert prompts == [ids, ids] and n == 1  # the original prompt, as many resamples as rewrites per draft
    assert (sampling.temperature, sampling.max_new_tokens, sampling.seed) == (0.9, 12, 5)  # rollout's T, rewrite cap
    assert sampling.keys == (stable_key("p0", "control", 1), stable_key("p0", "control", 2))
    assert engine.calls[0][2].keys != sampling.keys  # the rewrites have keys of their own
    r1, r2 = records
    assert (r1.draft_index, r1.draft, r1.draft_dense) == (1, "the sun, hot", 0.5)  # before the merge
    assert (r1.rewrites[0].text, r1.rewrites[0].reward.dense) == ("the sun hot", 1.0)
    n_tokens = len(tok("the sun hot", add_special_tokens=False)["input_ids"])
    assert (r1.resamples[0].reward.dense, r1.resamples[0].n_tokens, r1.resamples[0].finished) == (1.0, n_tokens, False)
    assert (r2.draft_index, r2.resamples[0].reward, r2.resamples[0].finished) == (2, None, True)  # empty: unscored
    summary, _ = control_summary(records, [], samples=1, max_new_tokens=12, model="tiny")
    # draft 1: both arms reach 1.0; draft 2: rewrite 0.0 < 0.5, resample empty → the draft stands
    assert (summary["overall"]["rewrite_beats"], summary["overall"]["resample_beats"]) == (0.5, 0.5)
    assert control_records(before, [], engine, reward, tok, hindsight, rollout_cfg) == []
