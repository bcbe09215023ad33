"""Failed-group detection and draft selection (spec §3.4, §9-A7, §9-A9).

A group is *failed* when its best dense score is below the threshold (1.0: no response met every rubric). Its
*drafts* are the responses tied at that best score; each gets one hindsight rewrite (§3.5-3.6).

Departure from the authors' code: an unscorable response (``dense=None``, e.g. a failed judge call) is ignored. The
reference scores it 0, so it could become a draft of a group whose best is 0; here it is never a draft, and a group
with no scorable response at all is not failed (there is nothing to revise against).
"""

from __future__ import annotations

from collections.abc import Sequence


def is_failed(dense: Sequence[float | None], threshold: float) -> bool:
    """failed ⇔ max_i dense_i < threshold over scorable responses (spec §3.4 step 2, §9-A7).

    ``None`` entries are unscorable and skipped; a group with no scorable response is **not** failed.
    """
    scorable = [d for d in dense if d is not None]
    return bool(scorable) and max(scorable) < threshold


def select_drafts(
    dense: Sequence[float | None],
    n_satisfied: Sequence[int],
    threshold: float,
    candidate_limit: int,
    tol: float = 1e-6,
) -> list[int]:
    """Indices of the drafts of a group (spec §3.4 step 3, RT L1240-1249):

    best   = max_i dense_i                       (scorable i only)
    drafts = {i : |dense_i − best| < tol}         sorted by n_satisfied_i descending (stable), first
                                                  candidate_limit kept;   [] when the group is not failed
    """
    if len(dense) != len(n_satisfied):
        raise ValueError(f"dense ({len(dense)}) and n_satisfied ({len(n_satisfied)}) must have the same length")
    if candidate_limit < 1:
        raise ValueError(f"candidate_limit must be >= 1, got {candidate_limit}")
    if not is_failed(dense, threshold):
        return []
    best = max(d for d in dense if d is not None)
    tied = [i for i, d in enumerate(dense) if d is not None and abs(d - best) < tol]
    tied.sort(key=lambda i: n_satisfied[i], reverse=True)  # stable: equal counts keep index order
    return tied[:candidate_limit]
