"""Confidence intervals: the mean ± Student-t half-width over seeds that the study reports (flows/study_report.py),
the Wilson score interval of a proportion and the cluster-robust interval of a mean that the readiness probe's
control reports (herl_core/control.py).

Pure arithmetic, no dependency beyond the standard library: an exact Student t CDF for integer degrees of freedom,
its quantile by bisection, ``mean_ci``, ``wilson`` and ``cluster_mean_ci``. Too few units → no interval (None).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Hashable, Sequence
from statistics import NormalDist
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


def z_quantile(p: float) -> float:
    """Standard normal quantile, e.g. z(0.975) = 1.959964."""
    if not 0 < p < 1:
        raise ValueError(f"z_quantile needs 0 < p < 1, got p={p}")
    return NormalDist().inv_cdf(p)


def wilson(k: int, n: int, level: float = 0.95) -> dict[str, Any]:
    """The Wilson score interval of a proportion k/n (Wilson 1927), z = z((1+level)/2):

        centre = (k + z²/2) / (n + z²)
        half   = z / (n + z²) · √(k(n−k)/n + z²/4)
        [lo, hi] = [centre − half, centre + half]   (inside [0, 1]; lo = 0 at k = 0 and hi = 1 at k = n)

    Unlike the Wald interval p ± z√(p(1−p)/n) it is never empty at k = 0 or k = n and keeps close to its level at
    small n. 0/10 → [0, 0.2775]; 5/10 → [0.2366, 0.7634]. n = 0 → rate, lo and hi None.
    It treats the n trials as independent (see ``cluster_mean_ci`` for units that come in groups).
    """
    if n < 0 or not 0 <= k <= n:
        raise ValueError(f"wilson needs 0 <= k <= n, got k={k}, n={n}")
    if n == 0:
        return {"k": 0, "n": 0, "rate": None, "lo": None, "hi": None}
    z = z_quantile((1 + level) / 2)
    centre = (k + z * z / 2) / (n + z * z)
    half = z / (n + z * z) * math.sqrt(k * (n - k) / n + z * z / 4)
    lo = 0.0 if k == 0 else max(0.0, centre - half)  # exactly 0 (and 1 at k = n) in exact arithmetic
    hi = 1.0 if k == n else min(1.0, centre + half)
    return {"k": k, "n": n, "rate": k / n, "lo": lo, "hi": hi}


def cluster_mean_ci(values: Sequence[float], clusters: Sequence[Hashable], level: float = 0.95) -> dict[str, Any]:
    """Mean of ``values`` with a cluster-robust Student-t interval, for units that come in correlated groups
    (several drafts of one prompt). With N values in C clusters, S_c the sum of the residuals v − mean in cluster c:

        se² = C/(C−1) · Σ_c S_c² / N²          (the CR1 sandwich variance of a mean, Liang & Zeger 1986)
        half = t((1+level)/2, C−1) · se

    With one value per cluster it is the ordinary Student-t interval (se² = s²/N). C = 1 → se, half None.
    [1, 0, 1, 1] in clusters [a, a, b, c]: mean 0.75, S = (−0.5, 0.25, 0.25), se² = 1.5 · 0.375 / 16 = 0.035156,
    se = 0.1875, half = 4.30265 · 0.1875 = 0.80675.
    """
    if len(values) != len(clusters):
        raise ValueError(f"values ({len(values)}) and clusters ({len(clusters)}) must have the same length")
    n = len(values)
    if n == 0:
        return {"n": 0, "clusters": 0, "mean": None, "se": None, "half": None, "lo": None, "hi": None}
    mean = sum(values) / n
    sums: dict[Hashable, float] = {}
    for v, c in zip(values, clusters, strict=True):
        sums[c] = sums.get(c, 0.0) + (v - mean)
    c = len(sums)
    if c < 2:
        return {"n": n, "clusters": c, "mean": mean, "se": None, "half": None, "lo": None, "hi": None}
    se = math.sqrt(c / (c - 1) * sum(s * s for s in sums.values())) / n
    half = t_quantile((1 + level) / 2, c - 1) * se
    return {"n": n, "clusters": c, "mean": mean, "se": se, "half": half, "lo": mean - half, "hi": mean + half}
