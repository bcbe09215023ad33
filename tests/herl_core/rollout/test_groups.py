"""herl_core.rollout.groups: prompt-major grouping, RolloutRecord rows, and rebuilding groups from a rollouts file.

Run: .venv/bin/pytest tests/herl_core/rollout/test_groups.py
"""

from __future__ import annotations

import pytest

from herl_core.config import ModelConfig, RolloutConfig
from herl_core.io import DataError
from herl_core.models import encode_prompt, load_tokenizer
from herl_core.records import PromptRecord, RewardResult, Rubric
from herl_core.rollout.base import Generation
from herl_core.rollout.groups import call_seed, groups_from_rollouts, rollout_records, sample_groups

PROMPTS = [PromptRecord(id=f"p{i}", prompt=f"Say {i}.", rubrics=[Rubric(id="punctuation:no_comma")]) for i in range(2)]
ROLLOUT = RolloutConfig(n=2, max_new_tokens=4)


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(ModelConfig(name_or_path="tiny"))


class FakeEngine:
    """Completion k (prompt-major order) is the tokens of "word<k>"; records the seed it was called with."""

    def __init__(self, tok):
        self.tok, self.seed = tok, None

    def generate(self, prompts, n, sampling):
        self.seed = sampling.seed
        ids = [self.tok(f"word{k}", add_special_tokens=False)["input_ids"] for k in range(len(prompts) * n)]
        return [Generation(prompts[k // n], ids[k], finished=k % 2 == 0) for k in range(len(prompts) * n)]


class LengthReward:
    """score = 1 / len(text): distinct per sample, so a misplaced sample shows."""

    def score(self, records, texts):
        return [RewardResult(score=1 / len(t), dense=1 / len(t)) for t in texts]


def test_sample_groups_is_prompt_major_and_rows_follow(tok):
    engine = FakeEngine(tok)
    groups = sample_groups(PROMPTS, engine, LengthReward(), tok, ROLLOUT, seed=7)
    assert engine.seed == 7
    assert [[s.text for s in g.samples] for g in groups] == [["word0", "word1"], ["word2", "word3"]]
    assert groups[1].prompt_ids == encode_prompt(tok, "Say 1.")
    rows = rollout_records(groups, step=3)
    assert [(r.prompt_id, r.sample_index, r.finished, r.step) for r in rows] == [
        ("p0", 0, True, 3), ("p0", 1, False, 3), ("p1", 0, True, 3), ("p1", 1, False, 3),
    ]  # fmt: skip
    assert rows[0].reward.score == pytest.approx(1 / 5)  # len("word0") = 5


def test_groups_from_rollouts_reencodes_prompt_and_retokenises_text(tok):
    rows = rollout_records(sample_groups(PROMPTS, FakeEngine(tok), LengthReward(), tok, ROLLOUT, seed=0), step=None)
    groups = groups_from_rollouts(PROMPTS, rows, tok, ROLLOUT)
    assert [g.record.id for g in groups] == ["p0", "p1"]
    assert groups[0].prompt_ids == encode_prompt(tok, "Say 0.")
    word0 = tok("word0", add_special_tokens=False)["input_ids"]
    assert groups[0].samples[0].completion_ids == word0 + [tok.eos_token_id]  # finished → EOS appended
    assert groups[0].samples[1].completion_ids == tok("word1", add_special_tokens=False)["input_ids"]  # cut: no EOS
    assert groups[1].samples[1].score == pytest.approx(1 / 5)


def test_groups_from_rollouts_errors_name_line_and_field(tok):
    rows = rollout_records(sample_groups(PROMPTS, FakeEngine(tok), LengthReward(), tok, ROLLOUT, seed=0), step=None)
    with pytest.raises(DataError, match=r"r\.jsonl:1: field 'sample_index': expected 0 .* got 1"):
        groups_from_rollouts(PROMPTS, [rows[1], rows[0]], tok, ROLLOUT, source="r.jsonl")
    stranger = rows[2].model_copy(update={"prompt_id": "nope"})
    with pytest.raises(DataError, match=r"r\.jsonl:2: field 'prompt_id': 'nope'"):
        groups_from_rollouts(PROMPTS, [rows[0], stranger], tok, ROLLOUT, source="r.jsonl")


def test_call_seed_by_hand():
    assert call_seed(1, 2, 1) == 1_000_003 + 2 * 16 + 1  # below 2**31 - 1, so no wrap
    assert call_seed(0, 0, 0) == 0
