"""Reward interface, the reward registry and the shared score arithmetic (spec §4).

A reward function scores (prompt, response) pairs and returns one ``RewardResult`` per pair with per-rubric
verdicts. Rewards are registered by name; ``reward.type`` picks one (validated against the registered names)::

    @register_reward("my_reward")
    def my_reward(cfg: RewardConfig) -> RewardFn:  # builds the reward from the reward section
        return MyReward(...)
 The score is the weighted fraction of rubrics met:

    score = Σ_k w_k · passed_k / Σ_k w_k,   w_k < 0 → 0   (spec §4.2 L252-258; §4.1 is the w = 1 case)

Rubrics that could not be scored (``passed is None``) are left out of both sums and reported as such.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol, runtime_checkable

from herl_core.config import RewardConfig
from herl_core.records import PromptRecord, RewardResult, Verdict
from herl_core.registry import Registry


@runtime_checkable
class RewardFn(Protocol):
    """Scores responses against their prompt's rubrics."""

    def score(self, prompts: Sequence[PromptRecord], responses: Sequence[str]) -> list[RewardResult]:
        """Pairwise: result i scores ``responses[i]`` against ``prompts[i].rubrics``."""
        ...


RewardFactory = Callable[[RewardConfig], RewardFn]
"""Builds a reward from the ``reward`` config section."""

REWARDS: Registry[RewardFactory] = Registry("reward")
"""Every reward, by name (``reward.type``); herl_core.rewards imports the built-in ones."""
register_reward = REWARDS.register
"""Decorator: ``@register_reward("name")`` on a ``RewardConfig -> RewardFn`` factory (a function or a class)."""


def weighted_score(verdicts: Sequence[Verdict]) -> float | None:
    """Weighted fraction met over scorable rubrics; negative weights count 0 (§4.2). None if nothing is scorable."""
    scorable = [v for v in verdicts if v.passed is not None]
    if not scorable:
        return None
    total = sum(max(v.weight, 0.0) for v in scorable)
    if total <= 0:
        return 0.0
    return sum(max(v.weight, 0.0) for v in scorable if v.passed) / total


def is_repetitive(response: str, tail_chars: int = 160, min_repeats: int = 3) -> bool:
    """§4.1 repetition detector: the last 160 characters occur ≥ 3 times in the response (split gives > 3 parts)."""
    tail = response[-tail_chars:]
    if len(response) < tail_chars or not tail.strip():
        return False
    return len(response.split(tail)) > min_repeats


def result_from_verdicts(verdicts: list[Verdict], response: str, repetition_check: bool = True) -> RewardResult:
    """Build a RewardResult: score = weighted fraction; dense = 0 when the repetition detector fires (§4.1)."""
    score = weighted_score(verdicts)
    if score is None:
        return RewardResult(score=None, dense=None, verdicts=verdicts, failed=True, error="no scorable rubric")
    repetitive = repetition_check and is_repetitive(response)
    return RewardResult(score=score, dense=0.0 if repetitive else score, verdicts=verdicts, repetition=repetitive)
