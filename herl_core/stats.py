"""Confidence intervals over seeds: the mean ± Student-t half-width that the study reports (flows/study_report.py).

Pure arithmetic, no dependency beyond ``math``: an exact Student t CDF for integer degrees of freedom, its quantile by
bisection, and ``mean_ci``. n = 1 → no interval.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any


def _t_cdf(x: float, df: int) -> float:
    """Exact Student t CDF for integer ν (Abramowitz & Stegun 26.7.3-4), θ = atan(x/√ν), c = cos θ:

    ν odd:  2F − 1 = (2/π)[θ + sin θ (c + (2/3)c³ + (2·4)/(3·5)c⁵ + … + (2·4…(ν−3))/(3·5…(ν−2)) c^(ν−2))]
    ν even: 2F − 1 = sin θ [1 + (1/2)c² + (1·3)/(2·4)c⁴ + … + (1·3…(ν−3))/(2·4…(ν−2)) c^(ν−2)]
    """
    theta = math.atan(x / math.sqrt(df))
    c, s = math.cos(theta), math.sin(theta)
    if df % 2:
        term, total = c, c if df > 1 else 0.0
        for k in range(3, df - 1, 2):  # term_k = term_{k-2} · (k−1)/k · c²
            term *= (k - 1) / k * c * c
            total += term
        return 0.5 + (theta + s * total) / math.pi
    term, total = 1.0, 1.0
    for k in range(2, df - 1, 2):  # term_k = term_{k-2} · (k−1)/k · c²
        term *= (k - 1) / k * c * c
        total += term
    return 0.5 + s * total / 2


@functools.lru_cache(maxsize=256)
def t_quantile(p: float, df: int) -> float:
    """Student t quantile t(p, df) for 0.5 ≤ p < 1: the x with F(x) = p, by bisection on the exact CDF.

    e.g. t(0.975, 1) = tan(0.475π) = 12.7062, t(0.975, 2) = 4.3027, t(0.975, ∞) → 1.96.
    """
    if not 0.5 <= p < 1 or df < 1:
        raise ValueError(f"t_quantile needs 0.5 <= p < 1 and df >= 1, got p={p}, df={df}")
    lo, hi = 0.0, 1.0
    while _t_cdf(hi, df) < p:
        lo, hi = hi, hi * 2
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _t_cdf(mid, df) < p else (lo, mid)
    return (lo + hi) / 2


def mean_ci(values: Sequence[float | None], level: float = 0.95) -> dict[str, Any]:
    """Mean, sample sd (n−1) and the Student-t half-width h = t((1+level)/2, n−1) · s / √n; n = 1 → sd, h = None.
    None and non-finite values are not samples.

    [0.2, 0.4, 0.6]: mean 0.4, s = 0.2, h = 4.3027 · 0.2 / √3 = 0.49683.
    """
    vals = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    n = len(vals)
    if n == 0:
        return {"n": 0, "mean": None, "sd": None, "half": None, "values": []}
    mean = sum(vals) / n
    if n == 1:
        return {"n": 1, "mean": mean, "sd": None, "half": None, "values": vals}
    sd = math.sqrt(sum((v - mean) ** 2 for v in vals) / (n - 1))
    half = t_quantile((1 + level) / 2, n - 1) * sd / math.sqrt(n)
    return {"n": n, "mean": mean, "sd": sd, "half": half, "values": vals}
