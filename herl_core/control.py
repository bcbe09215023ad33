"""The readiness probe's control: does hindsight guidance beat plain resampling at equal token cost? (docs/probe.md)

A failed group's draft can be improved in two ways that cost the same new tokens: revise it under hindsight guidance
(§3.5-3.7, what HeRL does), or sample the policy again from the original prompt (what GRPO with more samples, or
DAPO's dynamic sampling, would do). HeRL's premise is that the first beats the second. For every draft the hindsight
step selected, the control draws the second arm and compares both against the draft.

Budget rule (equal allotted new tokens, by construction):

    rewrite arm   hindsight.rewrite_samples generations from the hindsight prompt,  each ≤ R new tokens
    resample arm  hindsight.rewrite_samples generations from the ORIGINAL prompt,   each ≤ R new tokens
    R = hindsight.rewrite_max_new_tokens (else rollout.max_new_tokens): the rewrite's own cap

The resamples use the rollout's sampling (rollout.temperature, top_p, top_k), so each is one more draw of the
distribution the draft's group came from (``probe.control_temperature`` overrides the temperature, e.g. to the rewrite
temperature, to separate the effect of the guidance from that of a cooler sampler). Their seed is phase 2 of step 0
(``call_seed(train.seed, 0, 2)``), keyed per (prompt id, draft index), so the control never changes the rewrites.
The tokens each arm actually generated are counted and reported next to the caps (``budget``).

Per draft and arm, the arm's output is its best generation by dense score (first in draw order among ties). A
generation that is empty is dropped, as §3.6 drops empty rewrites; an arm with no generation left keeps the draft
(gain 0, nothing fixed or broken), as HeRL keeps the draft when no rewrite qualifies. A draft where any generation of
either arm failed to be scored (a judge failure) is left out of the comparison and counted (never scored 0).

    beats[arm]  = 1[dense(arm output) > dense(draft)]
    gain[arm]   = dense(arm output) − dense(draft)
    difference  = beats[rewrite] − beats[resample]                        (paired per draft)
    fix[arm]    = #{constraints the draft failed that the output meets} / #{constraints the draft failed}
    break[arm]  = #{constraints the draft met that the output does not} / #{constraints the draft met}

A constraint type t's row covers the drafts that failed t (beats, gains, difference, fix) and the drafts that met t
(break); the ``all`` row covers every compared draft and every constraint. ``unaided_pass`` is the rollout's pass
rate of t over all sampled responses of the probed prompts (the base policy without guidance).

Intervals (95 %): proportions (beats, fix, break, unaided pass) get the Wilson score interval, which treats drafts
and constraints as independent; the means (gains, difference) get the cluster-robust Student-t interval with the
prompt as cluster (herl_core.stats), because the drafts of one group share a prompt and its rubrics. The verdict line
reads the difference and its interval.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

from herl_core.config import HindsightConfig, RolloutConfig
from herl_core.evaluate import instruction_type
from herl_core.hindsight.step import RewriteJob, rewrite_sampling
from herl_core.records import ControlOutput, ControlRecord, ControlTypeRow, RolloutRecord, Verdict
from herl_core.rewards.base import RewardFn
from herl_core.rollout.base import RolloutEngine, SamplingParams, stable_key
from herl_core.samples import Group
from herl_core.stats import cluster_mean_ci, wilson

CONTROL_PHASE = 2
"""``call_seed(seed, 0, CONTROL_PHASE)`` seeds the resamples (0 = rollout, 1 = hindsight rewrites)."""

LEVEL = 0.95
BUDGET_RULE = (
    "per draft, as many fresh samples from the original prompt as it has rewrites (hindsight.rewrite_samples), each "
    "under the rewrite's token cap: equal allotted new tokens; the tokens each arm generated are reported"
)
INTERVALS = (
    "95 %: Wilson score intervals for proportions (units independent); cluster-robust Student t over prompts for "
    "mean gains and the paired difference"
)


# --------------------------------------------------------------------------------------------------------------------
# generation


def resample_sampling(
    hindsight: HindsightConfig, rollout: RolloutConfig, temperature: float | None, seed: int | None
) -> SamplingParams:
    """The resample arm's sampling: the rollout's sampler (or ``temperature``) under the rewrite's token cap."""
    cap = rewrite_sampling(hindsight, rollout, None).max_new_tokens
    t = rollout.temperature if temperature is None else temperature
    return SamplingParams(temperature=t, top_p=rollout.top_p, top_k=rollout.top_k, max_new_tokens=cap, seed=seed)


def control_records(
    groups: Sequence[Group],
    jobs: Sequence[RewriteJob],
    engine: RolloutEngine,
    reward: RewardFn,
    tokenizer,
    hindsight: HindsightConfig,
    rollout: RolloutConfig,
    temperature: float | None = None,
    seed: int | None = None,
    step: int | None = None,
) -> list[ControlRecord]:
    """Draw the resample arm for every rewrite job (one batched generate), score it, and pair it with the job's
    rewrites. ``groups`` must be the groups as they were BEFORE the hindsight step (the merge overwrites a slot)."""
    if not jobs:
        return []
    k = hindsight.rewrite_samples
    keys = tuple(stable_key(groups[j.group].record.id, "control", j.draft) for j in jobs)
    sampling = replace(resample_sampling(hindsight, rollout, temperature, seed), keys=keys)
    gens = engine.generate([list(groups[j.group].prompt_ids) for j in jobs], k, sampling)
    texts = [tokenizer.decode(g.completion_ids, skip_special_tokens=True) for g in gens]  # as the rollout decodes
    keep = [i for i, t in enumerate(texts) if t.strip()]
    scored = reward.score([groups[jobs[i // k].group].record for i in keep], [texts[i] for i in keep])
    rewards = dict(zip(keep, scored, strict=True))
    records = []
    for ji, job in enumerate(jobs):
        group = groups[job.group]
        draft = group.samples[job.draft]
        rewrites = [
            ControlOutput(
                text=d.text,
                n_tokens=d.n_tokens,
                finished=d.finished,
                reward=None if d.sample is None else job.rewrites[d.sample].reward,
            )
            for d in job.drawn
        ]
        resamples = [
            ControlOutput(text=texts[i], n_tokens=len(gens[i].completion_ids), finished=gens[i].finished,
                          reward=rewards.get(i))
            for i in range(ji * k, (ji + 1) * k)
        ]  # fmt: skip
        records.append(
            ControlRecord(
                step=step,
                prompt_id=group.record.id,
                draft_index=job.draft,
                draft=draft.text,
                draft_dense=float(draft.dense),
                draft_verdicts=list(draft.reward.verdicts),
                rewrites=rewrites,
                resamples=resamples,
            )
        )
    return records


# --------------------------------------------------------------------------------------------------------------------
# per-draft outcomes


@dataclass(frozen=True)
class ArmOutcome:
    """An arm's output for one draft: its dense score and its verdict per rubric id (True = met)."""

    dense: float
    met: dict[str, bool]
    empty: bool


def arm_outcome(record: ControlRecord, arm: str) -> ArmOutcome | None:
    """The arm's best generation (module doc); None when one of its generations failed to be scored."""
    outputs: list[ControlOutput] = getattr(record, arm)
    if any(o.reward is not None and o.reward.failed for o in outputs):
        return None
    scored = [o for o in outputs if o.reward is not None]
    if not scored:  # every generation empty: the draft stands
        return ArmOutcome(record.draft_dense, {v.rubric_id: v.passed is True for v in record.draft_verdicts}, True)
    best = max(scored, key=lambda o: o.reward.dense)  # max keeps the first of equal scores
    return ArmOutcome(float(best.reward.dense), {v.rubric_id: v.passed is True for v in best.reward.verdicts}, False)


@dataclass(frozen=True)
class DraftOutcome:
    prompt_id: str
    draft: list[Verdict]
    rewrite: ArmOutcome
    resample: ArmOutcome
    draft_dense: float

    def beats(self, arm: str) -> bool:
        return getattr(self, arm).dense > self.draft_dense

    def gain(self, arm: str) -> float:
        return getattr(self, arm).dense - self.draft_dense


def draft_outcomes(records: Sequence[ControlRecord]) -> tuple[list[DraftOutcome], int]:
    """(compared drafts, number left out because a generation could not be scored)."""
    out, unscorable = [], 0
    for r in records:
        rw, rs = arm_outcome(r, "rewrites"), arm_outcome(r, "resamples")
        if rw is None or rs is None:
            unscorable += 1
            continue
        out.append(DraftOutcome(r.prompt_id, list(r.draft_verdicts), rw, rs, r.draft_dense))
    return out, unscorable


# --------------------------------------------------------------------------------------------------------------------
# the table


def _rate(prefix: str, k: int, n: int) -> dict[str, float | None]:
    ci = wilson(k, n, LEVEL)
    return {prefix: ci["rate"], f"{prefix}_lo": ci["lo"], f"{prefix}_hi": ci["hi"]}


def _mean(prefix: str, values: list[float], clusters: list[str]) -> dict[str, float | None]:
    ci = cluster_mean_ci(values, clusters, LEVEL)
    return {prefix: ci["mean"], f"{prefix}_lo": ci["lo"], f"{prefix}_hi": ci["hi"]}


def _row(name: str, unaided: tuple[int, int], drafts: list[DraftOutcome], unmet: list, met: list) -> ControlTypeRow:
    """``unmet`` / ``met``: (draft outcome, rubric id) pairs the draft failed / met."""
    clusters = [d.prompt_id for d in drafts]
    arms = ("rewrite", "resample")
    row: dict = {"type": name, **_rate("unaided_pass", *unaided), "unaided_n": unaided[1]}
    row |= {"drafts": len(drafts), "prompts": len(set(clusters)), "unmet": len(unmet), "met": len(met)}
    for arm in arms:
        row |= _rate(f"{arm}_beats", sum(d.beats(arm) for d in drafts), len(drafts))
        row |= _mean(f"{arm}_gain", [d.gain(arm) for d in drafts], clusters)
        row |= _rate(f"{arm}_fix", sum(getattr(d, arm).met.get(r, False) for d, r in unmet), len(unmet))
        row |= _rate(f"{arm}_break", sum(not getattr(d, arm).met.get(r, False) for d, r in met), len(met))
    row |= _mean("difference", [float(d.beats("rewrite")) - float(d.beats("resample")) for d in drafts], clusters)
    return ControlTypeRow(**row)


def unaided_counts(rows: Sequence[RolloutRecord]) -> dict[str, tuple[int, int]]:
    """{type: (met, scorable verdicts)} over every rollout response; ``all`` over every constraint."""
    out: dict[str, list[int]] = {"all": [0, 0]}
    for r in rows:
        for v in r.reward.verdicts:
            if v.passed is None:
                continue
            for key in ("all", instruction_type(v.rubric_id)):
                c = out.setdefault(key, [0, 0])
                c[0] += int(v.passed)
                c[1] += 1
    return {k: (a, b) for k, (a, b) in out.items()}


def control_table(outcomes: Sequence[DraftOutcome], rollout_rows: Sequence[RolloutRecord]) -> list[ControlTypeRow]:
    """The ``all`` row, then one row per constraint type (sorted) that the drafts or the rollout contain."""
    unaided = unaided_counts(rollout_rows)
    pairs = [(d, v) for d in outcomes for v in d.draft if v.passed is not None]
    unmet_all = [(d, v.rubric_id) for d, v in pairs if v.passed is False]
    met_all = [(d, v.rubric_id) for d, v in pairs if v.passed is True]
    rows = [_row("all", unaided["all"], list(outcomes), unmet_all, met_all)]
    types = sorted({instruction_type(v.rubric_id) for _, v in pairs} | (set(unaided) - {"all"}))
    for t in types:
        unmet = [(d, v.rubric_id) for d, v in pairs if v.passed is False and instruction_type(v.rubric_id) == t]
        met = [(d, v.rubric_id) for d, v in pairs if v.passed is True and instruction_type(v.rubric_id) == t]
        failed_t = list({id(d): d for d, _ in unmet}.values())  # each draft once (a prompt may repeat a type)
        rows.append(_row(t, unaided.get(t, (0, 0)), failed_t, unmet, met))
    return rows


# --------------------------------------------------------------------------------------------------------------------
# budget, verdict, summary


def _tokens(records: Sequence[ControlRecord], arm: str) -> dict[str, float | int | None]:
    outputs = [o for r in records for o in getattr(r, arm)]
    total = sum(o.n_tokens for o in outputs)
    return {
        "generations": len(outputs),
        "tokens": total,
        "tokens_per_draft": total / len(records) if records else None,
        "truncated_frac": sum(not o.finished for o in outputs) / len(outputs) if outputs else None,
        "empty": sum(o.reward is None for o in outputs),
    }


def budget(records: Sequence[ControlRecord], samples: int, max_new_tokens: int) -> dict:
    """The rule, the caps and what each arm actually generated."""
    rw, rs = _tokens(records, "rewrites"), _tokens(records, "resamples")
    return {
        "rule": BUDGET_RULE,
        "generations_per_draft": samples,
        "max_new_tokens": max_new_tokens,
        "allotted_tokens_per_draft": samples * max_new_tokens,
        "rewrite": rw,
        "resample": rs,
        "resample_to_rewrite_tokens": rs["tokens"] / rw["tokens"] if rw["tokens"] else None,
    }


def _pts(x: float) -> str:
    return f"{100 * x:+.1f}"


def verdict(row: ControlTypeRow, model: str) -> str:
    """One line: which arm beats the draft more often, by how many points, and whether the interval covers 0."""
    if row.drafts == 0 or row.difference is None:
        return f"no draft to compare on {model} (no failed group, or none could be scored)"
    diff = row.difference
    rates = f"P(rewrite > draft) {100 * row.rewrite_beats:.1f} % vs P(resample > draft) "
    rates += f"{100 * row.resample_beats:.1f} %, {row.drafts} drafts"
    if row.difference_lo is None:  # one prompt: no interval
        return f"guidance minus resampling: {_pts(diff)} points on {model}, no interval (one prompt) ({rates})"
    ci = f"[{_pts(row.difference_lo)}, {_pts(row.difference_hi)}]"
    if row.difference_lo > 0:
        return f"guidance beats resampling by {100 * diff:.1f} points {ci} on {model} ({rates})"
    if row.difference_hi < 0:
        return f"resampling beats guidance by {-100 * diff:.1f} points {ci} on {model} ({rates})"
    return (
        f"guidance and resampling do not separate on {model}: difference {_pts(diff)} points {ci}, the 95 % interval "
        f"covers 0 ({rates})"
    )


def control_summary(
    records: Sequence[ControlRecord],
    rollout_rows: Sequence[RolloutRecord],
    samples: int,
    max_new_tokens: int,
    model: str,
) -> tuple[dict, list[ControlTypeRow]]:
    """(control.json, the table rows): the table, the budget, the verdict and how the intervals are computed."""
    outcomes, unscorable = draft_outcomes(records)
    rows = control_table(outcomes, rollout_rows)
    overall = rows[0]
    summary = {
        "verdict": verdict(overall, model),
        "model": model,
        "drafts": len(records),
        "compared": len(outcomes),
        "unscorable": unscorable,
        "intervals": INTERVALS,
        "budget": budget(records, samples, max_new_tokens),
        "overall": overall.model_dump(),
        "per_type": {r.type: r.model_dump() for r in rows[1:]},
    }
    return summary, rows
