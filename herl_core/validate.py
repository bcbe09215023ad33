"""Validation during training: the policy scored on a fixed held-out prompt set every ``train.eval_every`` steps.

What is scored (docs/evaluation.md §4): the prompts of ``train.eval_set`` (by default the prepare stage's ``val``
split: prompts from the training distribution whose base instructions never occur in training), first
``train.eval_prompts`` of them; ``train.eval_samples`` = k answers per prompt at ``train.eval_temperature`` (default:
the rollout temperature) and, with ``train.eval_greedy``, one greedy answer; all scored with the training reward.

When: at step 0, every ``eval_every`` steps and at the last step (``validation_due``), before that step's update,
so ``val/*`` at step s measures the policy that sampled step s's rollouts (the same policy as ``reward/mean`` at s).
The trained policy after the last update is scored by the evaluate stage.

What it may not touch: validation samples through the engine with its own seed (``call_seed(train.seed, 0,
VALIDATION_PHASE)``, the same at every point: differences between points are the policy's, not the sampler's) and
its own per-prompt keys, and the engine draws no global random numbers when seeded, so the training samples, the
data order and the merge slots are those of a run without validation.

Metrics (prefix ``val/`` for the sampled answers, ``val/greedy/`` for the greedy ones):

    reward_mean     = mean training reward R over the answers (failed reward calls excluded)
    all_met_frac    = #{answers with R = 1 (every rubric met)} / #{scored answers}
    pass_at_k       = #{prompts with an answer meeting every rubric} / #prompts           (sampled only)
    truncated_frac  = #{answers cut by the token limit} / #answers
    response_len    = mean answer length in tokens;   failed_calls = answers whose reward failed
    type/<id>       = #{passed checks of constraint type id} / #{scorable checks of that type}
    val/min_draw_margin = the smallest draw margin of the validation answers, all ranks (as rollout/min_draw_margin)
    perf/val_s      = wall seconds of the validation point
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from herl_core.config import Config, RolloutConfig, TrainConfig
from herl_core.probe import all_passed, type_pass_rates
from herl_core.records import PromptRecord, Verdict
from herl_core.rewards.base import RewardFn
from herl_core.rollout.base import DrawMeter, RolloutEngine
from herl_core.rollout.groups import VALIDATION_PHASE, call_seed, sample_groups
from herl_core.samples import Group

if TYPE_CHECKING:
    from herl_core.distributed import DataParallel


def validation_due(step: int, t: TrainConfig) -> bool:
    """Is step ``step`` a validation point: validation on, and step 0, a multiple of ``eval_every`` or the last."""
    return t.eval_every > 0 and (step % t.eval_every == 0 or step == t.steps - 1)


def constraint_verdicts(group: Group) -> list[list[Verdict]]:
    """Per answer of ``group``, the verdicts of its constraint rubrics (judge rubrics have no shared types)."""
    kinds = {r.id: r.kind for r in group.record.rubrics}
    return [[v for v in s.reward.verdicts if kinds.get(v.rubric_id) == "constraint"] for s in group.samples]


def validation_metrics(groups: Sequence[Group], prefix: str) -> dict[str, float]:
    """The metrics of the module doc over ``groups`` (one group per prompt), names prefixed with ``prefix``."""
    samples = [s for g in groups for s in g.samples]
    scores = [s.score for s in samples if s.score is not None]
    metrics = {
        "reward_mean": float(np.mean(scores)) if scores else float("nan"),
        "all_met_frac": float(np.mean([x >= 1.0 for x in scores])) if scores else 0.0,
        "truncated_frac": float(np.mean([not s.finished for s in samples])),
        "response_len": float(np.mean([len(s.completion_ids) for s in samples])),
        "failed_calls": float(len(samples) - len(scores)),
    }
    if any(len(g.samples) > 1 for g in groups):
        metrics["pass_at_k"] = float(np.mean([any(all_passed(s.reward.verdicts) for s in g.samples) for g in groups]))
    rates = type_pass_rates([v for g in groups for v in constraint_verdicts(g)])
    metrics |= {f"type/{name}": float(row["rate"]) for name, row in rates.items()}
    return {prefix + k: v for k, v in metrics.items()}


def validation_rollouts(cfg: Config) -> dict[str, RolloutConfig]:
    """The sampling of each part of a validation point, by metric prefix: k answers at the validation temperature
    and one greedy answer (``rollout.n`` and ``temperature`` replaced; chat template and limits kept)."""
    t, rollout = cfg.train, cfg.rollout
    limit = t.eval_max_new_tokens or rollout.max_new_tokens
    temperature = t.eval_temperature if t.eval_temperature is not None else rollout.temperature
    parts = {}
    if t.eval_samples:
        parts["val/"] = rollout.model_copy(
            update={"n": t.eval_samples, "temperature": temperature, "max_new_tokens": limit}
        )
    if t.eval_greedy:
        parts["val/greedy/"] = rollout.model_copy(update={"n": 1, "temperature": 0.0, "max_new_tokens": limit})
    return parts


def validate(
    records: Sequence[PromptRecord],
    engine: RolloutEngine,
    reward: RewardFn,
    tokenizer,
    cfg: Config,
    dp: DataParallel,
) -> dict[str, float]:
    """Score the current policy on ``records`` (module doc); under data parallelism each rank answers a share of the
    prompts (``dp.map``) and every rank returns the metrics of all of them."""
    start = time.perf_counter()
    seed, meter = call_seed(cfg.train.seed, 0, VALIDATION_PHASE), DrawMeter(engine)
    metrics: dict[str, float] = {}
    for prefix, rollout in validation_rollouts(cfg).items():
        groups = dp.map(lambda part, r=rollout: sample_groups(part, meter, reward, tokenizer, r, seed), records)
        metrics |= validation_metrics(groups, prefix)
    margin = dp.min(meter.take())
    if math.isfinite(margin):  # an engine that reports margins (the HF engine)
        metrics["val/min_draw_margin"] = margin
    return {**metrics, "perf/val_s": time.perf_counter() - start}
