"""The HeRL stage between reward and advantage (spec §3.4-3.9; pseudo-code §3.15).

    for each failed group (best dense < threshold):             §3.4
        drafts = responses tied at the group best (≤ candidate_limit)
        h      = hindsight_prompt(instruction, verdicts, draft)  §3.5
    rewrites  = policy.generate(all h of the batch, one call)    §3.6
    R̃         = reward(rewrite vs the ORIGINAL rubrics)          §3.7
    r_draft  += α·(max R̃ − r_draft)                              §3.8
    merge: best rewrite ≥ group best replaces one random slot;   §3.9
           otherwise a copy of the best original does

Departures from the authors' code (all configurable, see herl_core.config):
1. rewrites are sampled at ``hindsight.rewrite_temperature`` unless ``apply_rewrite_temperature`` is false (§9-A2);
2. the merge slot comes from a seeded RNG, so runs are reproducible (§3.9 uses an unseeded one); each group has its own
   stream, ``default_rng([*merge_seed, stable_key(prompt id)])``, and each rewrite job its own sampling key
   (prompt id, draft index), so a group's hindsight outcome does not depend on the other groups of the batch (a
   data-parallel rank running its share reproduces the single-process run);
3. rewrites whose reward failed (judge failure) are never chosen and give no bonus;
4. ``merge_mode="append"`` adds the guided sample as an extra member instead of replacing one (§9-A6).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from herl_core.config import HindsightConfig, RolloutConfig
from herl_core.hindsight.bonus import shaped_reward
from herl_core.hindsight.drafts import select_drafts
from herl_core.hindsight.merge import choose_guided, fallback_index, pick_slot
from herl_core.hindsight.prompt import build_hindsight_prompt
from herl_core.models import encode_prompt
from herl_core.records import HindsightRecord, MergeRecord, RewardResult
from herl_core.rewards.base import RewardFn
from herl_core.rollout.base import RolloutEngine, SamplingParams, stable_key
from herl_core.samples import Group, Sample


@dataclass(frozen=True)
class Drawn:
    """One generation of a rewrite job as it was drawn, empty ones included: its text, the new tokens it cost and
    whether it stopped at EOS. ``sample``: its index in ``RewriteJob.rewrites``, None when it was empty (dropped)."""

    text: str
    n_tokens: int
    finished: bool
    sample: int | None


@dataclass
class RewriteJob:
    """One draft to revise (§3.4 step 4)."""

    group: int
    draft: int
    hindsight_prompt: str
    prompt_ids: list[int]
    rewrites: list[Sample] = field(default_factory=list)
    drawn: list[Drawn] = field(default_factory=list)


@dataclass
class HindsightOutput:
    experiences: list[HindsightRecord]
    merges: list[MergeRecord]
    metrics: dict[str, float]
    jobs: list[RewriteJob] = field(default_factory=list)


def rewrite_sampling(hindsight: HindsightConfig, rollout: RolloutConfig, seed: int | None) -> SamplingParams:
    """Sampling of the rewrites: T = rewrite_temperature (applied) or the rollout's (reference, §3.6, §9-A2)."""
    temperature = hindsight.rewrite_temperature if hindsight.apply_rewrite_temperature else rollout.temperature
    return SamplingParams(
        temperature=temperature,
        top_p=rollout.top_p,
        top_k=rollout.top_k,
        max_new_tokens=hindsight.rewrite_max_new_tokens or rollout.max_new_tokens,
        seed=seed,
    )


def collect_jobs(
    groups: Sequence[Group], tokenizer, hindsight: HindsightConfig, max_prompt_tokens: int
) -> list[RewriteJob]:
    """Failed groups → drafts → hindsight prompts (§3.4, §3.5)."""
    jobs = []
    for gi, group in enumerate(groups):
        dense = [s.dense for s in group.samples]
        n_sat = [s.reward.n_satisfied for s in group.samples]
        for di in select_drafts(dense, n_sat, hindsight.threshold, hindsight.candidate_limit):
            draft = group.samples[di]
            instruction = (
                tokenizer.decode(group.prompt_ids, skip_special_tokens=True)
                if hindsight.instruction_text == "decoded_prompt"
                else group.record.prompt
            )
            text = build_hindsight_prompt(instruction, draft.reward.verdicts, draft.text)
            ids = encode_prompt(tokenizer, text, chat=hindsight.hindsight_chat_template)
            jobs.append(RewriteJob(gi, di, text, ids[-max_prompt_tokens:]))  # left-trim (§9-A8)
    return jobs


def generate_rewrites(
    jobs: list[RewriteJob],
    groups: Sequence[Group],
    engine: RolloutEngine,
    reward: RewardFn,
    tokenizer,
    hindsight: HindsightConfig,
    sampling: SamplingParams,
) -> None:
    """One batched generate for every draft of the batch, then re-score against the original rubrics (§3.6, §3.7)."""
    if not jobs:
        return
    keys = tuple(stable_key(groups[j.group].record.id, j.draft) for j in jobs)
    gens = engine.generate([j.prompt_ids for j in jobs], hindsight.rewrite_samples, replace(sampling, keys=keys))
    texts = [tokenizer.decode(g.completion_ids, skip_special_tokens=True).strip() for g in gens]
    keep = [i for i, t in enumerate(texts) if t]  # empty rewrites are dropped (§3.6)
    for i, g in enumerate(gens):  # rewrites[k] below is the k-th non-empty generation of its job
        job = jobs[i // hindsight.rewrite_samples]
        index = sum(d.sample is not None for d in job.drawn) if texts[i] else None
        job.drawn.append(Drawn(texts[i], len(g.completion_ids), g.finished, index))
    records = [groups[jobs[i // hindsight.rewrite_samples].group].record for i in keep]
    results = reward.score(records, [texts[i] for i in keep])
    eos = [tokenizer.eos_token_id] if hindsight.append_eos and tokenizer.eos_token_id is not None else []
    for i, res in zip(keep, results, strict=True):
        job = jobs[i // hindsight.rewrite_samples]
        ids = tokenizer(texts[i], add_special_tokens=False)["input_ids"] + eos  # re-tokenised + EOS (§3.7, §3.9)
        train_ids = job.prompt_ids if hindsight.train_prompt == "hindsight" else groups[job.group].prompt_ids
        job.rewrites.append(Sample(list(train_ids), ids, texts[i], res, res.score, guided=True))


@dataclass(frozen=True)
class DraftSnapshot:
    """A draft as it was before bonus and merge (the merge may overwrite its slot)."""

    text: str
    reward: RewardResult
    score: float
    dense: float


def merge_group(
    group: Group, jobs: list[RewriteJob], hindsight: HindsightConfig, rng: np.random.Generator
) -> tuple[list[MergeRecord], dict[tuple[int, int], int]]:
    """Put the best qualifying rewrite (else a copy of the best original) into the group (§3.9).

    Bonuses are applied before this, so a fallback copy carries the shaped reward (§3.9 "Fallback slot").
    Returns the merge records and {(job index, rewrite index) → slot} of the rewrites that were merged.
    """
    dense = [s.dense for s in group.samples]
    group_best = max(d for d in dense if d is not None)
    n_sat = [s.reward.n_satisfied for s in group.samples]
    candidates = [(ji, k) for ji, job in enumerate(jobs) for k in range(len(job.rewrites))]
    cand_dense: list[float | None] = [jobs[ji].rewrites[k].dense for ji, k in candidates]
    if hindsight.replace_top_n == 1:
        slots = [pick_slot(len(group.samples), rng)]
    else:
        slots = [int(x) for x in rng.permutation(len(group.samples))[: hindsight.replace_top_n]]
    fallback = group.samples[fallback_index(dense, n_sat)].copy()
    merges, chosen = [], {}
    for slot in slots:
        pick = choose_guided(cand_dense, group_best)
        if pick is not None:
            cand_dense[pick] = None  # each rewrite is merged at most once
            new, outcome = jobs[candidates[pick][0]].rewrites[candidates[pick][1]].copy(), "guided"
        else:
            new, outcome = fallback.copy(), "fallback"
        if hindsight.merge_mode == "append":
            group.samples.append(new)
            slot = len(group.samples) - 1
        else:
            group.samples[slot] = new
        if pick is not None:
            chosen[candidates[pick]] = slot
        merges.append(
            MergeRecord(
                prompt_id=group.record.id,
                outcome=outcome,
                slot=slot,
                group_best=group_best,
                guided_score=new.score if outcome == "guided" else None,
            )
        )
    return merges, chosen


def apply_bonus(group: Group, jobs: list[RewriteJob], hindsight: HindsightConfig) -> dict[int, float]:
    """r_draft += α·(max R̃ − r_draft) for every draft with a scored rewrite (§3.8). Returns {job index: delta}."""
    deltas = {}
    for ji, job in enumerate(jobs):
        scores = [r.score for r in job.rewrites if r.score is not None]
        draft = group.samples[job.draft]
        if hindsight.bonus_enabled and scores and draft.score is not None:
            draft.score, deltas[ji] = shaped_reward(draft.score, scores, hindsight.bonus_alpha)
        else:
            deltas[ji] = 0.0
    return deltas


def hindsight_step(
    groups: list[Group],
    engine: RolloutEngine,
    reward: RewardFn,
    tokenizer,
    hindsight: HindsightConfig,
    rollout: RolloutConfig,
    merge_seed: Sequence[int],
    seed: int | None = None,
    step: int | None = None,
) -> HindsightOutput:
    """Run §3.4-3.9 on a batch of groups in place; return the experiences, merges and metrics.

    ``merge_seed`` seeds the merge slots (one stream per group, keyed by its prompt id); ``seed`` the rewrites."""
    jobs = collect_jobs(groups, tokenizer, hindsight, rollout.max_prompt_tokens)
    generate_rewrites(jobs, groups, engine, reward, tokenizer, hindsight, rewrite_sampling(hindsight, rollout, seed))
    by_group: dict[int, list[RewriteJob]] = {}
    for job in jobs:
        by_group.setdefault(job.group, []).append(job)
    experiences, merges = [], []
    for gi, gjobs in by_group.items():
        group = groups[gi]
        group_best = max(s.dense for s in group.samples if s.dense is not None)
        snaps = [_snapshot(group.samples[j.draft]) for j in gjobs]
        deltas = apply_bonus(group, gjobs, hindsight)
        rng = np.random.default_rng([*merge_seed, stable_key(group.record.id)])
        group_merges, chosen = merge_group(group, gjobs, hindsight, rng)
        merges += [m.model_copy(update={"step": step}) for m in group_merges]
        for ji, (job, snap) in enumerate(zip(gjobs, snaps, strict=True)):
            drawn = {d.sample: d for d in job.drawn if d.sample is not None}
            for k, rw in enumerate(job.rewrites):
                experiences.append(
                    HindsightRecord(
                        step=step,
                        prompt_id=group.record.id,
                        draft_index=job.draft,
                        draft=snap.text,
                        draft_score=snap.score,
                        draft_dense=snap.dense,
                        verdicts=list(snap.reward.verdicts),
                        hindsight_prompt=job.hindsight_prompt,
                        rewrite=rw.text,
                        rewrite_tokens=drawn[k].n_tokens if k in drawn else None,
                        rewrite_finished=drawn[k].finished if k in drawn else None,
                        rewrite_score=rw.score,
                        rewrite_dense=rw.dense,
                        rewrite_verdicts=list(rw.reward.verdicts),
                        bonus=deltas[ji],
                        shaped_score=snap.score + deltas[ji],
                        group_best=group_best,
                        selected=(ji, k) in chosen,
                        slot=chosen.get((ji, k)),
                    )
                )
    return HindsightOutput(experiences, merges, hindsight_metrics(groups, jobs, experiences, merges), jobs)


def _snapshot(sample: Sample) -> DraftSnapshot:
    return DraftSnapshot(sample.text, sample.reward, float(sample.score), float(sample.dense))


def hindsight_metrics(
    groups: Sequence[Group],
    jobs: Sequence[RewriteJob],
    experiences: Sequence[HindsightRecord],
    merges: Sequence[MergeRecord],
) -> dict[str, float]:
    """The reference's rewrite/* scalars plus ours (docs/metrics.md)."""
    scored = [e for e in experiences if e.rewrite_dense is not None]
    n = max(len(scored), 1)
    drawn = [d for j in jobs for d in j.drawn]
    guided = [e for e in experiences if e.selected and e.rewrite_finished is not None]
    return {
        "herl/failed_groups": float(len({j.group for j in jobs})),
        "herl/failed_group_frac": len({j.group for j in jobs}) / max(len(groups), 1),
        "herl/drafts": float(len(jobs)),
        "herl/rewrites": float(len(experiences)),
        "herl/rewrite_failed": float(len(experiences) - len(scored)),
        "herl/rewrite_success_rate": sum(e.rewrite_dense > e.draft_dense for e in scored) / n if scored else 0.0,
        "herl/over_prev_best_rate": sum(e.rewrite_dense > e.group_best for e in scored) / n if scored else 0.0,
        "herl/bonus_mean": sum(e.bonus for e in experiences) / max(len(experiences), 1),
        "herl/guided_merged": float(sum(m.outcome == "guided" for m in merges)),
        "herl/fallback_merged": float(sum(m.outcome == "fallback" for m in merges)),
        "herl/rewrite_len": sum(d.n_tokens for d in drawn) / len(drawn) if drawn else 0.0,
        "herl/rewrite_truncated_frac": sum(not d.finished for d in drawn) / len(drawn) if drawn else 0.0,
        "herl/guided_truncated_frac": sum(not e.rewrite_finished for e in guided) / len(guided) if guided else 0.0,
    }
