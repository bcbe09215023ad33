"""The readiness probe: summaries of the offline ``rollout`` and ``hindsight`` stages (spec §3.3-3.9, issue 3).

Before GPU hours are spent, two questions: how often does the policy already meet every rubric (rollout), and does
hindsight guidance improve its answers at all, per constraint type (hindsight)? Both summaries are pure functions
of the JSONL rows the stages write, so every number can be recounted from the files.

    pass_at_G         = #{prompts with a sample whose verdicts all passed} / #prompts
    failed_group_frac = #{groups with max dense < 1} / #groups             (§3.4 at the reference threshold 1.0)
    fix_rate[t]       = #{rewrites passing t | draft failed t} / #{rewrites whose draft failed t}
    success_rate[t]   = #{rewrite_dense > draft_dense | draft failed t} / #{scored rewrites whose draft failed t}

Types are bare instruction ids (``ifeval/<id>`` → ``<id>``, herl_core.evaluate.instruction_type).
"""

from __future__ import annotations

from collections.abc import Sequence

from herl_core.evaluate import instruction_type
from herl_core.hindsight.drafts import is_failed
from herl_core.records import HindsightRecord, RolloutRecord, Verdict

REFERENCE_THRESHOLD = 1.0
"""§9-A7: a group is failed when its best dense score < 1.0 (the hindsight stage uses ``hindsight.threshold``)."""


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def all_passed(verdicts: Sequence[Verdict]) -> bool:
    """Every rubric met (an unscorable rubric, ``passed=None``, is not met)."""
    return bool(verdicts) and all(v.passed is True for v in verdicts)


def _by_prompt(rows: Sequence[RolloutRecord]) -> dict[str, list[RolloutRecord]]:
    out: dict[str, list[RolloutRecord]] = {}
    for row in rows:
        out.setdefault(row.prompt_id, []).append(row)
    return out


def type_pass_rates(verdict_lists: Sequence[Sequence[Verdict]]) -> dict[str, dict[str, float | int]]:
    """{type: {n, passed, rate}} over every scorable verdict."""
    out: dict[str, dict[str, float | int]] = {}
    for verdicts in verdict_lists:
        for v in verdicts:
            if v.passed is None:
                continue
            row = out.setdefault(instruction_type(v.rubric_id), {"n": 0, "passed": 0})
            row["n"] += 1
            row["passed"] += int(v.passed)
    for row in out.values():
        row["rate"] = row["passed"] / row["n"]
    return dict(sorted(out.items()))


def rollout_summary(rows: Sequence[RolloutRecord]) -> dict:
    """Reward mean, zero-std fraction, pass@G, failed-group fraction and per-type pass rates of a rollouts file."""
    groups = _by_prompt(rows)
    scores = [r.reward.score for r in rows if r.reward.score is not None]
    flat = 0
    for members in groups.values():
        s = [r.reward.score for r in members if r.reward.score is not None]
        flat += len(s) < 2 or max(s) - min(s) < 1e-12  # same rule as rollout.groups.frac_zero_std
    n = len(groups)
    return {
        "prompts": n,
        "samples": len(rows),
        "reward/mean": _mean(scores),
        "reward/frac_zero_std": flat / n,
        "reward/failed_calls": len(rows) - len(scores),
        "pass_at_G": sum(any(all_passed(r.reward.verdicts) for r in m) for m in groups.values()) / n,
        "failed_group_frac": sum(is_failed([r.reward.dense for r in m], REFERENCE_THRESHOLD) for m in groups.values())
        / n,
        "truncated_frac": sum(not r.finished for r in rows) / len(rows),
        "per_type": type_pass_rates([r.reward.verdicts for r in rows]),
    }


def _rewrite_type_rates(experiences: Sequence[HindsightRecord]) -> dict[str, dict[str, float | int | None]]:
    """Per type t, over rewrites whose draft failed t: fix_rate and success_rate (module doc)."""
    out: dict[str, dict] = {}
    for e in experiences:
        rewrite_passed = {v.rubric_id: v.passed for v in e.rewrite_verdicts}
        for v in e.verdicts:
            if v.passed is not False:
                continue
            row = out.setdefault(instruction_type(v.rubric_id), {"n": 0, "fixed": 0, "n_scored": 0, "improved": 0})
            row["n"] += 1
            row["fixed"] += rewrite_passed.get(v.rubric_id) is True
            if e.rewrite_dense is not None:
                row["n_scored"] += 1
                row["improved"] += e.rewrite_dense > e.draft_dense
    for row in out.values():
        row["fix_rate"] = row["fixed"] / row["n"]
        row["success_rate"] = row["improved"] / row["n_scored"] if row["n_scored"] else None
    return dict(sorted(out.items()))


def hindsight_summary(experiences: Sequence[HindsightRecord], step_metrics: dict[str, float], groups: int) -> dict:
    """The hindsight step's own metrics (``herl/*``, as logged per training step) plus per-type rewrite rates."""
    return {
        "groups": groups,
        **step_metrics,
        "herl/rewrite_fully_correct_rate": _mean([float(all_passed(e.rewrite_verdicts)) for e in experiences]),
        "per_type": _rewrite_type_rates(experiences),
    }
