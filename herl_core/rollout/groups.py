"""Groups of G sampled responses with their rewards (spec §3.1-3.3): sampled through an engine, or rebuilt from a
rollouts JSONL, and the ``reward/*`` metrics of a batch of groups. One implementation for the online loop
(``Trainer.step``), its validation (herl_core/validate.py) and the offline ``rollout`` / ``hindsight`` stages.

Rebuilding a group from ``rollouts.jsonl`` (the ``hindsight`` stage): the prompt ids are re-encoded with the chat
template (§3.1) and the completion ids are re-tokenised from the response text, plus EOS when the sample finished.
Departure: these ids can differ from the sampled ids where decode → encode is not the identity. The hindsight step
reads only the prompt ids (to decode the [Instruction] field, §3.5), the texts and the rewards, so its outputs do
not depend on it, and the offline stages never train on these ids.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from herl_core.config import RolloutConfig
from herl_core.io import DataError
from herl_core.models import encode_prompt
from herl_core.records import PromptRecord, RolloutRecord
from herl_core.rewards.base import RewardFn
from herl_core.rollout.base import RolloutEngine, SamplingParams, stable_key
from herl_core.samples import Group, Sample

ROLLOUT_PHASE, HINDSIGHT_PHASE, VALIDATION_PHASE = 0, 1, 2
"""The ``phase`` of ``call_seed``: a step's rollout, its hindsight rewrites, and validation (herl_core/validate.py)."""


def call_seed(seed: int, step: int, phase: int) -> int:
    """A distinct, reproducible sampling seed per (run seed, step, phase): resume replays the same samples.
    Phases: 0 = rollout, 1 = hindsight rewrites, 2 = validation (no (step, phase) pair shares a seed)."""
    return (seed * 1_000_003 + step * 16 + phase) % (2**31 - 1)


def encode_prompts(records: Sequence[PromptRecord], tokenizer, rollout: RolloutConfig) -> list[list[int]]:
    """Chat-templated prompt ids (§3.1); a prompt longer than ``rollout.max_prompt_tokens`` is an error."""
    ids = [encode_prompt(tokenizer, rec.prompt, rollout.system_prompt) for rec in records]
    for rec, p in zip(records, ids, strict=True):
        if len(p) > rollout.max_prompt_tokens:
            raise ValueError(
                f"prompt {rec.id!r} has {len(p)} tokens > rollout.max_prompt_tokens ({rollout.max_prompt_tokens})"
            )
    return ids


def sample_groups(
    records: Sequence[PromptRecord],
    engine: RolloutEngine,
    reward: RewardFn,
    tokenizer,
    rollout: RolloutConfig,
    seed: int | None,
) -> list[Group]:
    """G = ``rollout.n`` samples per prompt in one engine call (§3.2), scored against each prompt's rubrics (§3.3).

    Each prompt's random stream is keyed by its record id (``SamplingParams.keys``), so its samples do not depend on
    the other prompts of the call: a rank or a worker that samples a share of the records gets the same groups."""
    prompt_ids = encode_prompts(records, tokenizer, rollout)
    keys = tuple(stable_key(rec.id) for rec in records)
    sampling = SamplingParams(rollout.temperature, rollout.top_p, rollout.top_k, rollout.max_new_tokens, seed, keys)
    n = rollout.n
    gens = engine.generate(prompt_ids, n, sampling)
    texts = [tokenizer.decode(g.completion_ids, skip_special_tokens=True) for g in gens]
    results = reward.score([rec for rec in records for _ in range(n)], texts)
    groups = []
    for i, rec in enumerate(records):
        members = range(i * n, (i + 1) * n)
        samples = [
            Sample(list(prompt_ids[i]), list(gens[k].completion_ids), texts[k], results[k], results[k].score,
                   finished=gens[k].finished)
            for k in members
        ]  # fmt: skip
        groups.append(Group(rec, list(prompt_ids[i]), samples))
    return groups


def frac_zero_std(groups: Sequence[Group]) -> float:
    """Fraction of groups whose scored rewards are all equal (no GRPO signal; TRL's frac_reward_zero_std)."""
    flat = 0
    for g in groups:
        scores = [s for s in g.scores if s is not None]
        flat += len(scores) < 2 or max(scores) - min(scores) < 1e-12
    return flat / max(len(groups), 1)


def reward_metrics(groups: Sequence[Group]) -> dict[str, float]:
    """``reward/*`` and ``rollout/*`` of a step's sampled groups (docs/metrics.md)."""
    scores = [s.score for g in groups for s in g.samples if s.score is not None]
    n_all = sum(len(g.samples) for g in groups)
    return {
        "reward/mean": float(np.mean(scores)) if scores else float("nan"),
        "reward/max_group_mean": float(
            np.mean([max((x for x in g.scores if x is not None), default=0) for g in groups])
        ),
        "reward/frac_zero_std": frac_zero_std(groups),
        "reward/all_met_frac": float(np.mean([s >= 1.0 for s in scores])) if scores else 0.0,
        "reward/failed_calls": float(n_all - len(scores)),
        "rollout/response_len": float(np.mean([len(s.completion_ids) for g in groups for s in g.samples])),
        "rollout/truncated_frac": float(np.mean([not s.finished for g in groups for s in g.samples])),
    }


def rollout_records(groups: Sequence[Group], step: int | None) -> list[RolloutRecord]:
    """One ``RolloutRecord`` per sample, group-major (the rows of rollouts.jsonl)."""
    return [
        RolloutRecord(
            prompt_id=g.record.id,
            sample_index=k,
            response=s.text,
            reward=s.reward,
            n_tokens=len(s.completion_ids),
            finished=s.finished,
            step=step,
        )
        for g in groups
        for k, s in enumerate(g.samples)
    ]


def _rows_by_prompt(rows: Sequence[RolloutRecord], known: set[str], source: str) -> dict[str, list[RolloutRecord]]:
    """Rows grouped by prompt id in file order; unknown prompts and broken sample indices name their line."""
    by_prompt: dict[str, list[RolloutRecord]] = {}
    for lineno, row in enumerate(rows, start=1):  # read_jsonl rejects blank lines: row i is on line i
        if row.prompt_id not in known:
            raise DataError(f"{source}:{lineno}: field 'prompt_id': {row.prompt_id!r} is not in the prompt file")
        group = by_prompt.setdefault(row.prompt_id, [])
        if row.sample_index != len(group):
            raise DataError(
                f"{source}:{lineno}: field 'sample_index': expected {len(group)} for prompt {row.prompt_id!r} "
                f"(samples of a prompt are consecutive, numbered from 0), got {row.sample_index}"
            )
        group.append(row)
    return by_prompt


def groups_from_rollouts(
    prompts: Sequence[PromptRecord],
    rows: Sequence[RolloutRecord],
    tokenizer,
    rollout: RolloutConfig,
    source: str = "rollouts.jsonl",
) -> list[Group]:
    """Rebuild the groups of a rollouts JSONL (module doc): one group per prompt id, in file order."""
    by_id = {p.id: p for p in prompts}
    by_prompt = _rows_by_prompt(rows, set(by_id), source)
    records = [by_id[pid] for pid in by_prompt]
    prompt_ids = encode_prompts(records, tokenizer, rollout)
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    groups = []
    for rec, ids in zip(records, prompt_ids, strict=True):
        samples = []
        for r in by_prompt[rec.id]:
            completion = tokenizer(r.response, add_special_tokens=False)["input_ids"] + (eos if r.finished else [])
            samples.append(Sample(list(ids), completion, r.response, r.reward, r.reward.score, finished=r.finished))
        groups.append(Group(rec, list(ids), samples))
    return groups
