"""Pydantic row schemas of every JSONL artifact and of reward verdicts (spec §3.3-3.9, §4).

One schema per artifact, shared by the offline stages (rollout, hindsight) and the online train loop, so that the
experiences logged by ``herl train`` and by the ``hindsight`` stage are the same records.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class Record(BaseModel):
    """Base of every record: unknown fields are errors, records are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class Rubric(Record):
    """One thing a response is judged on.

    * ``kind="constraint"``: a checker from a registry (``id`` = IFEval/IFBench instruction id, ``kwargs`` its
      arguments). ``description`` is filled from the checker's ``build_description`` when left empty (§3.5).
    * ``kind="judge"``: a weighted rubric text scored by the LLM judge (§4.2); ``description`` is required.
    """

    id: str = Field(min_length=1)
    kind: Literal["constraint", "judge"] = "constraint"
    kwargs: dict[str, Any] = Field(default_factory=dict)
    description: str | None = None
    weight: float = 1.0

    @model_validator(mode="after")
    def _judge_needs_text(self) -> Rubric:
        if self.kind == "judge" and not (self.description or "").strip():
            raise ValueError(f"judge rubric {self.id!r} needs a non-empty description")
        return self


class PromptRecord(Record):
    """A training or evaluation prompt with its rubrics (one line of data/prepared/*.jsonl)."""

    id: str = Field(min_length=1)
    prompt: str = Field(min_length=1, description="The user instruction, without chat template.")
    rubrics: list[Rubric] = Field(min_length=1)
    source: str = "synthetic"

    @field_validator("rubrics")
    @classmethod
    def _unique_rubric_ids(cls, rubrics: list[Rubric]) -> list[Rubric]:
        ids = [r.id for r in rubrics]
        dupes = sorted({i for i in ids if ids.count(i) > 1})
        if dupes:
            raise ValueError(f"duplicate rubric ids {dupes}")
        return rubrics


class Verdict(Record):
    """Per-rubric outcome. ``passed=None`` means the rubric could not be scored (e.g. checker data missing offline)."""

    rubric_id: str
    description: str
    passed: bool | None
    weight: float = 1.0


class RewardResult(Record):
    """Reward of one response (spec §4.1 / §4.2).

    * ``score``: weighted fraction of rubrics met (negative weights count 0, §4.2), the training reward R.
      ``None`` when ``failed``: a judge failure is never scored 0 silently and is kept out of the advantage.
    * ``dense``: the numeric used by HeRL's selection (§2, §4.1): ``score``, but 0 when the repetition detector fired.
    """

    score: float | None
    dense: float | None
    verdicts: list[Verdict] = Field(default_factory=list)
    failed: bool = False
    error: str | None = None
    repetition: bool = False

    @property
    def n_satisfied(self) -> int:
        return sum(1 for v in self.verdicts if v.passed)

    @model_validator(mode="after")
    def _failed_has_no_score(self) -> RewardResult:
        if self.failed and self.score is not None:
            raise ValueError("a failed reward must have score=None")
        if not self.failed and self.score is None:
            raise ValueError("a reward that did not fail needs a score")
        return self


class RolloutRecord(Record):
    """One sampled response with its reward (data/rollout/rollouts.jsonl; spec §3.2-3.3)."""

    prompt_id: str
    sample_index: int = Field(ge=0)
    response: str
    reward: RewardResult
    n_tokens: int = Field(ge=0)
    finished: bool = True
    step: int | None = None


class HindsightRecord(Record):
    """One hindsight experience: a draft, its hindsight prompt, the rewrite and what it earned (spec §3.4-3.9).

    Written by the ``hindsight`` stage and, per step, by ``herl train``.
    """

    step: int | None = None
    prompt_id: str
    draft_index: int = Field(ge=0, description="Index of the draft within its group.")
    draft: str
    draft_score: float
    draft_dense: float
    verdicts: list[Verdict]
    hindsight_prompt: str
    rewrite: str
    rewrite_tokens: int | None = Field(
        default=None, ge=0, description="New tokens the rewrite drew, its EOS included when it stopped."
    )
    rewrite_finished: bool | None = Field(
        default=None, description="The rewrite stopped at EOS; False: cut at hindsight.rewrite_max_new_tokens."
    )
    rewrite_score: float | None
    rewrite_dense: float | None
    rewrite_verdicts: list[Verdict] = Field(default_factory=list)
    bonus: float = Field(description="α·(r_rewrite − r); may be negative (§3.8).")
    shaped_score: float = Field(description="r + bonus, the draft's training reward.")
    group_best: float = Field(description="Best dense score of the group before shaping (§3.9 orig_best).")
    selected: bool = Field(description="This rewrite became the group's guided sample (§3.9).")
    slot: int | None = Field(default=None, description="Group slot it replaced (merge_mode=replace).")


class MergeRecord(Record):
    """What happened to one failed group at merge time (§3.9): guided rewrite, fallback copy, or nothing."""

    step: int | None = None
    prompt_id: str
    outcome: Literal["guided", "fallback", "none"]
    slot: int | None
    group_best: float
    guided_score: float | None = None


class ControlOutput(Record):
    """One generation of the readiness probe's control (herl_core.control): a hindsight rewrite or a fresh sample
    from the original prompt, with the tokens it cost."""

    text: str
    n_tokens: int = Field(ge=0, description="New tokens generated (EOS included when it stopped).")
    finished: bool = Field(description="Stopped at EOS; False = cut at the token cap.")
    reward: RewardResult | None = Field(
        description="Scored against the prompt's original rubrics; None = empty output (dropped unscored, §3.6)."
    )


class ControlRecord(Record):
    """One draft of a failed group with both arms of the control: its hindsight rewrites and as many fresh samples
    from the original prompt, under the same token cap (data/hindsight/control.jsonl; docs/probe.md)."""

    step: int | None = None
    prompt_id: str
    draft_index: int = Field(ge=0, description="Index of the draft within its group.")
    draft: str
    draft_dense: float
    draft_verdicts: list[Verdict]
    rewrites: list[ControlOutput] = Field(description="The hindsight rewrites of this draft, in draw order.")
    resamples: list[ControlOutput] = Field(description="Fresh samples from the original prompt, in draw order.")


class ControlTypeRow(Record):
    """One row of the control's table (control_types.csv): a constraint type, or ``all`` (docs/probe.md).

    Rates are fractions in [0, 1] with Wilson 95 % bounds (``_lo``, ``_hi``); gains are mean dense-score differences
    with cluster-robust Student-t bounds over prompts. A type's row covers the drafts that failed that type (fix
    rates and the beat/gain columns) and the drafts that met it (break rates); ``all`` covers every compared draft.
    """

    type: str
    unaided_pass: float | None = Field(description="Rollout samples meeting the type / scored rollout verdicts.")
    unaided_pass_lo: float | None
    unaided_pass_hi: float | None
    unaided_n: int
    drafts: int = Field(description="Compared drafts in this row.")
    prompts: int = Field(description="Distinct prompts of those drafts (the clusters).")
    rewrite_beats: float | None = Field(description="P(best rewrite dense > draft dense).")
    rewrite_beats_lo: float | None
    rewrite_beats_hi: float | None
    resample_beats: float | None = Field(description="P(best resample dense > draft dense).")
    resample_beats_lo: float | None
    resample_beats_hi: float | None
    difference: float | None = Field(description="rewrite_beats − resample_beats, paired per draft.")
    difference_lo: float | None
    difference_hi: float | None
    rewrite_gain: float | None = Field(description="Mean of best rewrite dense − draft dense.")
    rewrite_gain_lo: float | None
    rewrite_gain_hi: float | None
    resample_gain: float | None = Field(description="Mean of best resample dense − draft dense.")
    resample_gain_lo: float | None
    resample_gain_hi: float | None
    unmet: int = Field(description="Scorable constraints the drafts failed (fix-rate denominator).")
    rewrite_fix: float | None = Field(description="Unmet constraints the best rewrite meets.")
    rewrite_fix_lo: float | None
    rewrite_fix_hi: float | None
    resample_fix: float | None = Field(description="Unmet constraints the best resample meets.")
    resample_fix_lo: float | None
    resample_fix_hi: float | None
    met: int = Field(description="Scorable constraints the drafts met (break-rate denominator).")
    rewrite_break: float | None = Field(description="Met constraints the best rewrite fails.")
    rewrite_break_lo: float | None
    rewrite_break_hi: float | None
    resample_break: float | None = Field(description="Met constraints the best resample fails.")
    resample_break_lo: float | None
    resample_break_hi: float | None


class ValidationOutcome(Record):
    """What one validation prompt scored at one validation point (``<train.report_dir>``/val_outcomes.jsonl): the
    per-prompt data behind ``val/*`` that a paired comparison of two runs resamples (herl_core/validate.py)."""

    step: int = Field(ge=0, description="Validation point: the policy before that step's update (train.steps: final).")
    part: str = Field(description="Metric prefix of the answers: 'val/' (sampled) or 'val/greedy/'.")
    prompt_id: str
    answers: int = Field(ge=0, description="Answers sampled for the prompt.")
    scored: int = Field(ge=0, description="Answers whose reward call succeeded.")
    all_met: int = Field(ge=0, description="Answers meeting every rubric (R = 1).")
    reward_sum: float = Field(description="Sum of the scored answers' rewards R.")
    truncated: int = Field(ge=0, description="Answers cut by the token limit.")
    tokens: int = Field(ge=0, description="Answer tokens generated.")
    types: dict[str, list[int]] = Field(
        default_factory=dict, description="Constraint type → [passed, scorable] checks over the prompt's answers."
    )
