"""Validation during training (herl_core/validate.py): the schedule and the metrics by hand, and a real validation
point on the tiny model that is reproducible and leaves the global RNG alone."""

from __future__ import annotations

import math

import pytest
import torch

from herl_core.config import Config, TrainConfig
from herl_core.distributed import DataParallel
from herl_core.models import load_policy
from herl_core.records import PromptRecord, RewardResult, Rubric, Verdict
from herl_core.rewards import make_reward
from herl_core.rollout import make_engine
from herl_core.samples import Group, Sample
from herl_core.validate import validate, validation_due, validation_metrics

LOWER, COMMA = "change_case:english_lowercase", "punctuation:no_comma"


def test_validation_points_are_step_0_every_k_and_the_last_step():
    due = [s for s in range(8) if validation_due(s, TrainConfig(steps=8, eval_every=3))]
    assert due == [0, 3, 6, 7]
    assert [s for s in range(3) if validation_due(s, TrainConfig(steps=3, eval_every=1))] == [0, 1, 2]
    assert not any(validation_due(s, TrainConfig(steps=8, eval_every=0)) for s in range(8))


def test_eval_every_needs_something_to_score():
    with pytest.raises(ValueError, match="eval_samples > 0 or train.eval_greedy"):
        TrainConfig(eval_every=1, eval_samples=0, eval_greedy=False)
    TrainConfig(eval_every=0, eval_samples=0, eval_greedy=False)  # off: nothing to check


def _sample(verdicts: dict[str, bool], score: float | None, tokens: int, finished: bool = True) -> Sample:
    """A sample of ``tokens`` completion tokens with these verdicts (``finished`` false = cut by the token limit)."""
    vs = [Verdict(rubric_id=k, description=k, passed=v) for k, v in verdicts.items()]
    reward = RewardResult(score=score, dense=score, verdicts=vs, failed=score is None)
    return Sample([1], list(range(tokens)), "text", reward, score, finished=bool(finished))


def test_validation_metrics_by_hand():
    p0 = PromptRecord(id="a", prompt="Say hi.", rubrics=[Rubric(id=LOWER), Rubric(id=COMMA)])
    style = Rubric(id="style", kind="judge", description="Friendly tone.")
    p1 = PromptRecord(id="b", prompt="Say bye.", rubrics=[Rubric(id=LOWER), style])
    groups = [
        Group(p0, [1], [_sample({LOWER: True, COMMA: True}, 1.0, 5), _sample({LOWER: True, COMMA: False}, 0.5, 8, 0)]),
        Group(p1, [1], [_sample({LOWER: False, "style": True}, 0.5, 3), _sample({}, None, 4)]),  # 2nd: reward failed
    ]
    m = validation_metrics(groups, "val/")
    assert m["val/reward_mean"] == pytest.approx(2 / 3)  # (1 + 0.5 + 0.5) / 3 scored answers
    assert m["val/all_met_frac"] == pytest.approx(1 / 3)  # only p0's first answer has R = 1
    assert m["val/pass_at_k"] == 0.5  # p0 has an answer meeting every rubric, p1 has none
    assert m["val/truncated_frac"] == 0.25 and m["val/response_len"] == 5.0 and m["val/failed_calls"] == 1.0
    # per constraint type over the scorable checks: lowercase passed 2 of 3, no_comma 1 of 2; the judge rubric is
    # not a constraint type
    assert m["val/type/" + LOWER] == pytest.approx(2 / 3) and m["val/type/" + COMMA] == 0.5
    assert not any("style" in k for k in m)
    # one answer per prompt (greedy): no pass@k
    assert "val/greedy/pass_at_k" not in validation_metrics([Group(p0, [1], groups[0].samples[:1])], "val/greedy/")


VAL = [
    PromptRecord(id=f"v{i}", prompt=p, rubrics=[Rubric(id=c)])
    for i, (p, c) in enumerate([("Write about snow.", LOWER), ("Describe a river.", COMMA), ("Name a bird.", LOWER)])
]


def test_a_validation_point_on_the_tiny_model_is_reproducible_and_leaves_the_global_rng_alone():
    cfg = Config.model_validate(
        {
            "model": {"name_or_path": "tiny"},
            "rollout": {"n": 4, "max_new_tokens": 8},
            "train": {"eval_every": 1, "eval_samples": 3, "eval_max_new_tokens": 6},
        }
    )
    model, tok = load_policy(cfg.model)
    engine, reward = make_engine(cfg.rollout.engine, model, tok, seed=0), make_reward(cfg.reward)
    rng = torch.get_rng_state()
    first = validate(VAL, engine, reward, tok, cfg, DataParallel.single())
    assert torch.equal(torch.get_rng_state(), rng)  # the training streams are untouched
    second = validate(VAL, engine, reward, tok, cfg, DataParallel.single())
    timing = {"perf/val_s"}
    assert {k: v for k, v in first.items() if k not in timing} == {k: v for k, v in second.items() if k not in timing}
    assert first["perf/val_s"] > 0 and first["val/min_draw_margin"] > 0  # the HF engine reports its margins
    assert first["val/failed_calls"] == 0.0 and first["val/greedy/failed_calls"] == 0.0
    # eval_max_new_tokens caps every answer
    assert 0 < first["val/response_len"] <= 6 and 0 < first["val/greedy/response_len"] <= 6
    assert {k.split("/")[-1] for k in first if "/type/" in k} == {LOWER, COMMA}
    for key in ("val/reward_mean", "val/all_met_frac", "val/pass_at_k", "val/greedy/reward_mean"):
        assert 0.0 <= first[key] <= 1.0 and not math.isnan(first[key]), key
