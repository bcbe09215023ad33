"""Reward functions (spec §4): IFEval/IFBench constraint checkers (§4.1) or a weighted-rubric LLM judge (§4.2).

``make_reward(cfg.reward)`` builds the reward registered under ``reward.type`` (``REWARDS``, herl_core.rewards.base).
Importing this package registers the built-in rewards; a new one is one ``@register_reward("name")`` factory.
"""

from __future__ import annotations

from herl_core.config import RewardConfig
from herl_core.rewards import constraints, judge  # noqa: F401 - importing them registers the built-in rewards
from herl_core.rewards.base import REWARDS, RewardFn, register_reward

__all__ = ["REWARDS", "RewardFn", "make_reward", "register_reward"]


def make_reward(cfg: RewardConfig) -> RewardFn:
    """The reward registered under ``cfg.type``, built from ``cfg``; an unknown name raises ``KeyError`` listing the
    registered ones (the config already refuses it when loaded)."""
    return REWARDS.get(cfg.type)(cfg)
