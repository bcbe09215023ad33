"""Reward functions (spec §4): IFEval/IFBench constraint checkers (§4.1) or a weighted-rubric LLM judge (§4.2)."""

from __future__ import annotations

from herl_core.config import RewardConfig
from herl_core.rewards.base import RewardFn


def make_reward(cfg: RewardConfig) -> RewardFn:
    """The reward named by ``cfg.type``. ``repetition_check`` applies to constraints only (the judge has none, §4.2)."""
    if cfg.type == "constraints":
        from herl_core.rewards.constraints import ConstraintReward

        return ConstraintReward(repetition_check=cfg.repetition_check)
    if cfg.type == "judge":
        from herl_core.rewards.judge import JudgeReward

        return JudgeReward(cfg.judge)
    raise ValueError(f"unknown reward.type {cfg.type!r}; expected 'constraints' or 'judge'")
