"""Bonus reward: reward shaping of drafts toward the score of their hindsight rewrite (spec §3.8, §9-A5).

Only drafts (best-tied responses of failed groups, §3.4) that got at least one rewrite are shaped; every other
response keeps its reward. Spreading ``delta`` uniformly over the draft's tokens, as the reference does, sums back
to the same scalar, so for GRPO (§3.11) shaping the scalar reward is identical.

Departure from the authors' code: unscorable rewrites (``None``, e.g. a failed judge call) are skipped instead of
counting as 0.
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def bonus(r: float, r_rewrite: float, alpha: float) -> float:
    """delta = α · (r_rewrite − r)   (spec §3.8; α = 0.05). Negative when the rewrite scored lower than the draft."""
    if not math.isfinite(alpha) or alpha < 0:
        raise ValueError(f"alpha must be a finite number >= 0, got {alpha}")
    return alpha * (r_rewrite - r)


def shaped_reward(r: float, rewrite_scores: Sequence[float | None], alpha: float) -> tuple[float, float]:
    """(r', delta) for one draft (spec §3.8, RT L2266-2301):

        r_rw  = max over the draft's rewrites of R(rewrite)      (None = unscorable, skipped)
        delta = α · (r_rw − r)
        r'    = r + delta

    No (scorable) rewrite → (r, 0.0).
    """
    scored = [s for s in rewrite_scores if s is not None]
    if not scored:
        return r, 0.0
    delta = bonus(r, max(scored), alpha)
    return r + delta, delta
