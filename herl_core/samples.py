"""Groups of sampled responses: the unit GRPO normalises over and HeRL edits (spec §3.1-3.3, §3.9).

A ``Group`` is one prompt's G responses (the reference's ``uid``). Each ``Sample`` keeps the context it is trained
under (``train_prompt_ids``): the original chat prompt for on-policy samples, the hindsight prompt for a guided one
(spec §3.9 "Rewrite slot", train_use_rewrite_prompt=True).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from herl_core.records import PromptRecord, RewardResult


@dataclass
class Sample:
    """One response in a group, with what training needs."""

    train_prompt_ids: list[int]
    completion_ids: list[int]
    text: str
    reward: RewardResult
    score: float | None
    """Training reward R, bonus included (§3.8); None when the reward failed (kept out of the advantage)."""
    guided: bool = False
    """True for the merged hindsight rewrite (its tokens use the guided loss, §3.12)."""
    finished: bool = True

    @property
    def dense(self) -> float | None:
        return self.reward.dense

    def copy(self) -> Sample:
        return replace(self, train_prompt_ids=list(self.train_prompt_ids), completion_ids=list(self.completion_ids))


@dataclass
class Group:
    """One prompt and its responses."""

    record: PromptRecord
    prompt_ids: list[int]
    samples: list[Sample] = field(default_factory=list)

    @property
    def scores(self) -> list[float | None]:
        return [s.score for s in self.samples]
