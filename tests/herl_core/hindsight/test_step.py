"""The whole hindsight stage on one hand-built group: drafts → rewrites → re-score → bonus → merge (spec §3.4-3.9).

A scripted engine returns fixed rewrites, and the real IFEval checkers score them, so every number below is
computed by hand from the constraint outcomes.
"""

from __future__ import annotations

import numpy as np
import pytest

from herl_core.config import HindsightConfig, ModelConfig, RolloutConfig
from herl_core.hindsight.merge import pick_slot
from herl_core.hindsight.step import hindsight_step
from herl_core.models import encode_prompt, load_tokenizer
from herl_core.records import PromptRecord, Rubric
from herl_core.rewards.constraints import ConstraintReward
from herl_core.rollout.base import Generation, SamplingParams, stable_key
from herl_core.samples import Group, Sample


class ScriptedEngine:
    """Returns the scripted texts in order; records what it was asked."""

    def __init__(self, tokenizer, texts: list[str]):
        self.tok, self.texts, self.calls = tokenizer, list(texts), []

    def generate(self, prompts, n, sampling: SamplingParams):
        self.calls.append((prompts, n, sampling))
        out = []
        for p in prompts:
            for _ in range(n):
                ids = self.tok(self.texts.pop(0), add_special_tokens=False)["input_ids"] + [self.tok.eos_token_id]
                out.append(Generation(list(p), ids))
        return out

    def sync_weights(self):
        pass


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(ModelConfig(name_or_path="tiny"))


RECORD = PromptRecord(
    id="p0",
    prompt="Greet the world.",
    rubrics=[Rubric(id="change_case:english_lowercase"), Rubric(id="punctuation:no_comma")],
)
# (lowercase?, no comma?) → score:  [0] (F,F) = 0    [1] (T,F) = 0.5    [2] (F,T) = 0.5    [3] (F,F) = 0
ORIGINALS = [
    "The sun is Bright, and warm today",
    "the sun is bright, and warm today",
    "The sun is bright and warm today",
    "THE SUN IS BRIGHT, AND WARM TODAY",
]


def make_group(tok, reward):
    ids = encode_prompt(tok, RECORD.prompt)
    results = reward.score([RECORD] * 4, ORIGINALS)
    samples = [Sample(list(ids), tok(t)["input_ids"], t, r, r.score) for t, r in zip(ORIGINALS, results, strict=True)]
    return Group(RECORD, ids, samples)


def run(tok, rewrites, herl=None, seed=123):
    reward = ConstraintReward()
    group = make_group(tok, reward)
    engine = ScriptedEngine(tok, rewrites)
    herl = herl or HindsightConfig()
    out = hindsight_step([group], engine, reward, tok, herl, RolloutConfig(max_new_tokens=8), (seed,))
    return group, engine, out


def test_guided_rewrite_replaces_one_seeded_slot_and_drafts_get_the_bonus(tok):
    # drafts: the two responses tied at the best 0.5 (indices 1, 2); rewrites: 1.0 and 0.0
    group, engine, out = run(tok, ["the sun is bright and warm today", "The sun is bright, and warm today"])
    assert [len(engine.calls[0][0]), engine.calls[0][1]] == [2, 1]  # one batched call, one rewrite per draft
    assert engine.calls[0][2].temperature == 0.3  # rewrite temperature applied (§9-A2)
    slot = pick_slot(4, np.random.default_rng([123, stable_key("p0")]))  # the group's own stream
    guided = group.samples[slot]
    assert guided.guided and guided.text == "the sun is bright and warm today" and guided.score == 1.0
    hp = out.experiences[0].hindsight_prompt
    assert guided.train_prompt_ids == encode_prompt(tok, hp, chat=False)  # trained under the hindsight prompt
    assert guided.completion_ids[-1] == tok.eos_token_id  # EOS appended (§3.9)
    # bonus: 0.5 + 0.05·(1.0 − 0.5) = 0.525 ; 0.5 + 0.05·(0.0 − 0.5) = 0.475 (negative bonus)
    expected = {0: 0.0, 1: 0.525, 2: 0.475, 3: 0.0}
    for i, s in enumerate(group.samples):
        if i != slot:
            assert s.score == pytest.approx(expected[i]) and not s.guided
    e1, e2 = out.experiences
    assert (e1.draft_index, e1.bonus, e1.shaped_score, e1.selected, e1.slot) == (
        1,
        pytest.approx(0.025),
        pytest.approx(0.525),
        True,
        slot,
    )
    assert (e2.draft_index, e2.bonus, e2.selected, e2.slot) == (2, pytest.approx(-0.025), False, None)
    assert "Unmet: 2." in hp and "Satisfied: 1." in hp and "Draft:" in hp
    m = out.metrics
    assert (m["herl/failed_groups"], m["herl/rewrites"], m["herl/guided_merged"]) == (1, 2, 1)
    assert m["herl/rewrite_success_rate"] == 0.5 and m["herl/over_prev_best_rate"] == 0.5
    assert m["herl/bonus_mean"] == pytest.approx(0.0)  # (0.025 − 0.025) / 2
    # the scripted rewrites end with EOS: their drawn length is the text's tokens + 1, none cut at the cap
    texts = ["the sun is bright and warm today", "The sun is bright, and warm today"]
    n = [len(tok(t, add_special_tokens=False)["input_ids"]) + 1 for t in texts]
    assert (e1.rewrite_tokens, e2.rewrite_tokens) == tuple(n) and e1.rewrite_finished and e2.rewrite_finished
    assert m["herl/rewrite_len"] == pytest.approx(sum(n) / 2)
    assert m["herl/rewrite_truncated_frac"] == 0.0 and m["herl/guided_truncated_frac"] == 0.0


class CutEngine(ScriptedEngine):
    """As ScriptedEngine, but the first generation is cut at the cap: no EOS, ``finished`` False."""

    def generate(self, prompts, n, sampling: SamplingParams):
        out = super().generate(prompts, n, sampling)
        out[0] = Generation(out[0].prompt_ids, out[0].completion_ids[:-1], finished=False)
        return out


def test_rewrite_cut_at_the_cap_is_counted_and_still_trained_with_eos(tok):
    # rewrite 0 (the 1.0 one, merged) is cut at the cap; rewrite 1 ends with EOS
    reward = ConstraintReward()
    group = make_group(tok, reward)
    texts = ["the sun is bright and warm today", "The sun is bright, and warm today"]
    engine = CutEngine(tok, texts)
    out = hindsight_step([group], engine, reward, tok, HindsightConfig(), RolloutConfig(max_new_tokens=8), (123,))
    n0, n1 = (len(tok(t, add_special_tokens=False)["input_ids"]) for t in texts)
    e1, e2 = out.experiences
    assert (e1.rewrite_tokens, e1.rewrite_finished, e1.selected) == (n0, False, True)
    assert (e2.rewrite_tokens, e2.rewrite_finished, e2.selected) == (n1 + 1, True, False)
    m = out.metrics
    assert m["herl/rewrite_len"] == pytest.approx((n0 + n1 + 1) / 2)
    assert m["herl/rewrite_truncated_frac"] == 0.5 and m["herl/guided_truncated_frac"] == 1.0
    guided = next(s for s in group.samples if s.guided)
    assert guided.completion_ids[-1] == tok.eos_token_id  # the reference appends EOS to a cut rewrite too (§3.9)


def test_no_qualifying_rewrite_falls_back_to_a_copy_of_the_best_original(tok):
    group, _, out = run(
        tok, ["The sun is Bright, and warm today", "THE SUN IS BRIGHT, AND WARM TODAY"]
    )  # both rewrites score 0 < 0.5
    slot = pick_slot(4, np.random.default_rng([123, stable_key("p0")]))  # the group's own stream
    copied = group.samples[slot]
    assert not copied.guided and copied.text in {
        "the sun is bright, and warm today",
        "The sun is bright and warm today",
    }
    assert copied.score == pytest.approx(0.475)  # the shaped reward travels with the copy: 0.5 + 0.05·(0 − 0.5)
    assert out.merges[0].outcome == "fallback" and out.metrics["herl/rewrite_success_rate"] == 0.0


def test_tie_with_group_best_still_qualifies_and_append_mode_grows_the_group(tok):
    herl = HindsightConfig(merge_mode="append", bonus_enabled=False)
    group, _, out = run(
        tok, ["The sun is bright and warm today", "the sun is bright, and warm today"], herl=herl
    )  # both rewrites 0.5 = group best
    assert len(group.samples) == 5 and group.samples[4].guided and group.samples[4].score == 0.5
    assert [s.score for s in group.samples[:4]] == [0.0, 0.5, 0.5, 0.0]  # no bonus when disabled
    assert out.merges[0].outcome == "guided" and out.merges[0].slot == 4


def test_passing_group_is_skipped_and_reference_temperature_option(tok):
    reward = ConstraintReward()
    group = make_group(tok, reward)
    perfect = reward.score([RECORD], ["the sun is bright and warm today"])[0]
    group.samples[0] = Sample(group.prompt_ids, [1], "the sun is bright and warm today", perfect, perfect.score)
    engine = ScriptedEngine(tok, [])
    out = hindsight_step([group], engine, reward, tok, HindsightConfig(), RolloutConfig(), (0,))
    assert engine.calls == [] and out.experiences == [] and out.metrics["herl/failed_groups"] == 0
    _, engine, _ = run(tok, ["a", "b"], herl=HindsightConfig(apply_rewrite_temperature=False))
    assert engine.calls[0][2].temperature == 1.0  # reference: rollout temperature (§3.6)


def test_original_prompt_option_trains_the_rewrite_under_x(tok):
    group, _, _ = run(tok, ["the sun is bright and warm today", "x"], herl=HindsightConfig(train_prompt="original"))
    guided = [s for s in group.samples if s.guided][0]
    assert guided.train_prompt_ids == group.prompt_ids


def test_rewrite_keys_and_merge_streams_are_per_group(tok):
    """A group's rewrites are keyed by (prompt id, draft index) and its merge slot by its prompt id, so the
    outcome for a group is the same alone or in a batch (what lets data-parallel ranks reproduce one process)."""
    _, engine, _ = run(tok, ["the sun is bright and warm today", "The sun is Bright, and warm today"])
    assert engine.calls[0][2].keys == (stable_key("p0", 1), stable_key("p0", 2))


def test_every_draw_is_kept_with_its_token_count_and_its_rewrite(tok):
    """``RewriteJob.drawn``: each generation in draw order, empty ones included (what the probe's control counts)."""
    herl = HindsightConfig(rewrite_samples=2)
    texts = ["the sun is bright and warm today", "  ", "x", "The sun is bright and warm today"]
    _, _, out = run(tok, texts, herl=herl)
    first, second = out.jobs
    tokens = [len(tok(t, add_special_tokens=False)["input_ids"]) + 1 for t in texts]  # + EOS (scripted engine)
    assert [(d.text, d.n_tokens, d.finished, d.sample) for d in first.drawn] == [
        (texts[0], tokens[0], True, 0),
        ("", tokens[1], True, None),  # whitespace only: empty after strip, dropped (§3.6), still drawn
    ]
    assert [(d.text, d.n_tokens, d.sample) for d in second.drawn] == [("x", tokens[2], 0), (texts[3], tokens[3], 1)]
    assert [s.text for s in first.rewrites] == [texts[0]] and [s.text for s in second.rewrites] == ["x", texts[3]]
