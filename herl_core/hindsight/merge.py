"""Choosing the guided response of a failed group and the slot it takes (spec §3.9, §9-A6).

Pure decisions only: which rewrite becomes the group's guided sample (or that the best original is copied instead),
and which slot of the group it overwrites. Building the training rows is the trainer's job.

Departures from the authors' code:

1. The slot comes from a caller-supplied, seeded ``numpy.random.Generator`` (the reference uses an unseeded
   ``np.random.default_rng()``, RT L2467), so runs are reproducible. The draw itself is the same: a uniform
   permutation of the slots, slot 0 of it taken.
2. Unscorable rewrites (``None``) are never chosen; unscorable originals rank below every scorable one.
3. ``mode="append"`` (§9-A6 option) adds the guided sample as an extra group member: no slot is drawn.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np


def choose_guided(rewrite_dense: Sequence[float | None], group_best: float) -> int | None:
    """Index of the guided rewrite (spec §3.9 step 1, RT L2346-2355):

        order rewrites by dense descending (stable), then
        first with dense > group_best,  else first with dense ≥ group_best,  else None

    ``group_best`` is the group's best original dense score before shaping; ``None`` rewrites are never chosen.
    """
    order = sorted((i for i, d in enumerate(rewrite_dense) if d is not None), key=lambda i: -rewrite_dense[i])
    for i in order:
        if rewrite_dense[i] > group_best:
            return i
    for i in order:
        if rewrite_dense[i] >= group_best:
            return i
    return None


def fallback_index(dense: Sequence[float | None], n_satisfied: Sequence[int]) -> int:
    """Best original response: argmax_i (dense_i, n_satisfied_i), first index on ties (spec §3.9 step 2).

    ``None`` dense ranks below every number.
    """
    if not dense or len(dense) != len(n_satisfied):
        raise ValueError(f"dense ({len(dense)}) and n_satisfied ({len(n_satisfied)}) must be equal and non-empty")

    def key(i: int) -> tuple[float, int]:
        return (-np.inf if dense[i] is None else dense[i], n_satisfied[i])

    return max(range(len(dense)), key=key)


def pick_slot(group_size: int, rng: np.random.Generator) -> int:
    """Uniform random slot in [0, group_size): slot 0 of a random permutation of the slots (spec §3.9 step 3)."""
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    return int(rng.permutation(group_size)[0])


@dataclass(frozen=True)
class MergePlan:
    """What to do with one failed group (spec §3.9).

    * ``outcome="guided"``: the rewrite ``rewrite_index`` goes into the group, trained under its hindsight prompt;
    * ``outcome="fallback"``: a copy of original response ``source_index`` goes into the group (shaped reward kept);
    * ``slot``: the group slot it overwrites (``None`` in append mode: it becomes an extra member).
    """

    outcome: Literal["guided", "fallback"]
    slot: int | None
    rewrite_index: int | None
    source_index: int | None


def plan_merge(
    rewrite_dense: Sequence[float | None],
    group_best: float,
    dense: Sequence[float | None],
    n_satisfied: Sequence[int],
    rng: np.random.Generator,
    mode: Literal["replace", "append"] = "replace",
) -> MergePlan:
    """choose_guided → else fallback_index; then pick_slot (replace) or no slot (append). Spec §3.9 steps 1-3.

    In fallback + append mode a duplicate of the best original is appended, as the reference duplicates it in place.
    """
    if mode not in ("replace", "append"):
        raise ValueError(f"unknown merge mode {mode!r}; valid: ['replace', 'append']")
    chosen = choose_guided(rewrite_dense, group_best)
    slot = pick_slot(len(dense), rng) if mode == "replace" else None
    if chosen is not None:
        return MergePlan(outcome="guided", slot=slot, rewrite_index=chosen, source_index=None)
    return MergePlan(outcome="fallback", slot=slot, rewrite_index=None, source_index=fallback_index(dense, n_satisfied))
