"""The shared Registry, and the three registries built on it: advantage estimators, policy losses, rewards."""

from __future__ import annotations

import pytest

from herl_core.config import ConfigError, RewardConfig, load_params
from herl_core.records import PromptRecord, RewardResult, Rubric
from herl_core.registry import Registry
from herl_core.rewards import REWARDS, make_reward, register_reward


def test_register_get_names_and_errors():
    reg: Registry[object] = Registry("widget")

    @reg.register("b")
    def b():  # pragma: no cover - never called
        return None

    reg.register("a")(len)
    assert reg.get("b") is b and reg.get("a") is len
    assert reg.names() == ["a", "b"] and list(reg) == ["a", "b"] and len(reg) == 2
    assert "a" in reg and "c" not in reg
    with pytest.raises(KeyError, match=r"unknown widget 'c'; registered: \['a', 'b'\]"):
        reg.get("c")
    with pytest.raises(ValueError, match="widget 'a' is already registered"):
        reg.register("a")(print)
    assert reg.register("a")(len) is len  # the same object again (a module reload) is not a conflict


def test_the_three_registries_share_the_class():
    from herl_core.advantage import ADVANTAGES
    from herl_core.loss import POLICY_LOSSES

    assert all(isinstance(r, Registry) for r in (ADVANTAGES, POLICY_LOSSES, REWARDS))
    assert {"grpo", "grpo_no_std"} <= set(ADVANTAGES.names())
    assert {"ppo_clip", "mixpolicy"} <= set(POLICY_LOSSES.names())
    assert REWARDS.names() == ["constraints", "judge"]


def test_unknown_reward_type_names_file_line_and_the_registered_rewards(tmp_path):
    p = tmp_path / "params.yaml"
    p.write_text("# rewards\nreward:\n  type: rubric_judge\n")
    with pytest.raises(ConfigError) as err:
        load_params(p)
    assert f"{p}:3: reward.type: Value error, unknown reward 'rubric_judge'; registered: ['constraints', 'judge']" in (
        str(err.value)
    )


class LengthReward:
    """A reward written by a user: 1 when the response has at most ``limit`` words, else 0."""

    def __init__(self, limit: int) -> None:
        self.limit = limit

    def score(self, prompts: list[PromptRecord], responses: list[str]) -> list[RewardResult]:
        ok = [float(len(r.split()) <= self.limit) for r in responses]
        return [RewardResult(score=s, dense=s, verdicts=[]) for s in ok]


def test_a_new_reward_is_one_decorated_factory(tmp_path, monkeypatch):
    monkeypatch.setattr(REWARDS, "_items", dict(REWARDS._items))  # registered for this test only

    @register_reward("short")
    def short(cfg: RewardConfig) -> LengthReward:
        return LengthReward(limit=3)

    p = tmp_path / "params.yaml"
    p.write_text("reward:\n  type: short\n")
    cfg = load_params(p)
    reward = make_reward(cfg.reward)
    assert isinstance(reward, LengthReward)
    prompt = PromptRecord(id="p", prompt="Say hi.", rubrics=[Rubric(id="r", kind="judge", description="Brief.")])
    assert [r.score for r in reward.score([prompt, prompt], ["hi there", "one two three four"])] == [1.0, 0.0]
    with pytest.raises(ValueError, match="'short' is already registered"):
        register_reward("short")(lambda cfg: LengthReward(1))
