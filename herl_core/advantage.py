"""Advantage estimators: a registry of group-relative estimators with one signature (spec §3.11).

Every estimator is ``fn(scores, group_ids, valid, *, eps, norm_by_std) -> (advantages, metrics)``:

* ``scores``    (N,) float: the scalar reward s_i of each response (bonus included for drafts, §3.8; the rewrite's
  reward for a guided slot, §3.9);
* ``group_ids`` (N,) long: responses with the same id form one GRPO group (the reference's ``uid``, §3.1);
* ``valid``     (N,) bool: False for responses without a reward (e.g. a failed judge call, §4.2);
* returns the per-response advantage A_i (N,) (the trainer broadcasts it over the response tokens) and a dict of
  float metrics.

Metrics: ``adv/mean``, ``adv/std``, ``adv/max``, ``adv/min`` over valid entries; ``adv/frac_zero_std``, the fraction
of groups (with ≥ 1 valid member) whose valid scores are all equal, i.e. that carry no GRPO signal, measured on the
scores actually trained on (after bonus and merge); ``adv/frac_invalid``.

Register a new estimator with ``@register_advantage("name")``; look one up with ``get_advantage("name")``.

Departures from the authors' code (veRL ``compute_grpo_outcome_advantage``, CA L267-330):

1. ``valid=False`` entries are left out of their group's mean and std and get A = 0. The reference scores a failed
   judge call 0.0 and normalises it with the rest (§4.2, §9-A12).
2. A group with a single (valid) member gets A = 0. veRL uses mean 0, std 1 there, i.e. A = s.
3. A group whose valid scores are all equal gets exactly A = 0. veRL computes (s − mean)/(0 + ε), which is 0 up to
   floating-point noise that ε = 1e-6 can blow up (seven float32 scores of 0.1 give A = −0.0074). Group statistics
   are computed in float64 for the same reason.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor

from herl_core.registry import Registry


class AdvantageFn(Protocol):
    """The signature every registered estimator has."""

    def __call__(
        self, scores: Tensor, group_ids: Tensor, valid: Tensor, *, eps: float, norm_by_std: bool
    ) -> tuple[Tensor, dict[str, float]]: ...


ADVANTAGES: Registry[AdvantageFn] = Registry("advantage estimator")
"""Every estimator, by name (``train.advantage``)."""
register_advantage = ADVANTAGES.register
"""Decorator: ``@register_advantage("name")`` registers an estimator; a name taken by another raises ValueError."""
get_advantage = ADVANTAGES.get
"""The estimator registered under a name; an unknown name raises ``KeyError`` listing the valid names."""
list_advantages = ADVANTAGES.names
"""Registered estimator names, sorted."""


def _check_inputs(scores: Tensor, group_ids: Tensor, valid: Tensor) -> None:
    if scores.dim() != 1 or group_ids.shape != scores.shape or valid.shape != scores.shape:
        raise ValueError(
            f"scores, group_ids and valid must all be (N,); got {tuple(scores.shape)}, {tuple(group_ids.shape)}, "
            f"{tuple(valid.shape)}"
        )
    if valid.dtype != torch.bool:
        raise ValueError(f"valid must be a bool tensor, got {valid.dtype}")
    if not torch.isfinite(scores[valid]).all():
        raise ValueError("scores has non-finite values at valid entries; mark them valid=False instead")


def _group_stats(scores: Tensor, group_ids: Tensor, valid: Tensor) -> tuple[Tensor, ...]:
    """Per-group count, mean, unbiased std and zero-range flag over valid entries, gathered back to (N,)."""
    _, inv = torch.unique(group_ids, return_inverse=True)  # (N,) group index in [0, G)
    n_groups = int(inv.max()) + 1
    s = torch.where(valid, scores.double(), 0.0)  # (N,) float64, invalid → 0
    w = valid.double()  # (N,)
    zeros = torch.zeros(n_groups, dtype=torch.float64, device=scores.device)  # (G,)
    count = zeros.index_add(0, inv, w)  # (G,)
    mean = zeros.index_add(0, inv, s) / count.clamp(min=1)  # (G,)
    dev = torch.where(valid, s - mean[inv], 0.0)  # (N,)
    std = (zeros.index_add(0, inv, dev**2) / (count - 1).clamp(min=1)).sqrt()  # (G,) unbiased, like torch.std
    hi = zeros.scatter_reduce(0, inv, torch.where(valid, s, -torch.inf), "amax", include_self=False)  # (G,)
    lo = zeros.scatter_reduce(0, inv, torch.where(valid, s, torch.inf), "amin", include_self=False)  # (G,)
    zero_range = hi == lo  # (G,) all valid scores equal (or none / one valid)
    return count, mean, std, zero_range, inv


def _grpo(scores: Tensor, group_ids: Tensor, valid: Tensor, eps: float, norm_by_std: bool) -> tuple[Tensor, dict]:
    """A_i = (s_i − mean_g(s)) / (std_g(s) + eps)   [or s_i − mean_g(s) without std]   (spec §3.11).

    Statistics are over the valid members of group g; std is unbiased (torch.std). Invalid entries, single-member
    groups and zero-variance groups get A = 0.
    """
    _check_inputs(scores, group_ids, valid)
    if scores.numel() == 0:
        return scores.clone(), _metrics(scores, valid, torch.zeros(0, dtype=torch.bool))
    count, mean, std, zero_range, inv = _group_stats(scores, group_ids, valid)
    adv = scores.double() - mean[inv]  # (N,)
    if norm_by_std:
        adv = adv / (std[inv] + eps)
    keep = valid & (count[inv] >= 2) & ~zero_range[inv]  # (N,)
    adv = torch.where(keep, adv, 0.0).to(scores.dtype)
    return adv, _metrics(adv, valid, zero_range[count >= 1])


def _metrics(adv: Tensor, valid: Tensor, group_zero_std: Tensor) -> dict[str, float]:
    """adv/* over valid entries; adv/frac_zero_std over groups with ≥ 1 valid member (1 member counts as 0 std)."""
    a = adv[valid].double()
    n = a.numel()
    return {
        "adv/mean": float(a.mean()) if n else 0.0,
        "adv/std": float(a.std()) if n > 1 else 0.0,
        "adv/max": float(a.max()) if n else 0.0,
        "adv/min": float(a.min()) if n else 0.0,
        "adv/frac_zero_std": float(group_zero_std.double().mean()) if group_zero_std.numel() else 0.0,
        "adv/frac_invalid": float((~valid).double().mean()) if valid.numel() else 0.0,
    }


@register_advantage("grpo")
def grpo(
    scores: Tensor, group_ids: Tensor, valid: Tensor, *, eps: float = 1e-6, norm_by_std: bool = True
) -> tuple[Tensor, dict[str, float]]:
    """GRPO outcome advantage (spec §3.11, arXiv 2402.03300):

        A_i = (s_i − mean_g(s)) / (std_g(s) + eps)     if norm_by_std   (reference default, eps = 1e-6)
        A_i =  s_i − mean_g(s)                          otherwise        (Dr.GRPO, arXiv 2503.20783)

    Shapes: scores (N,) float, group_ids (N,) long, valid (N,) bool → advantages (N,) in scores' dtype.
    """
    return _grpo(scores, group_ids, valid, eps, norm_by_std)


@register_advantage("grpo_no_std")
def grpo_no_std(
    scores: Tensor, group_ids: Tensor, valid: Tensor, *, eps: float = 1e-6, norm_by_std: bool = False
) -> tuple[Tensor, dict[str, float]]:
    """Dr.GRPO advantage (arXiv 2503.20783, spec §3.11 ``norm_adv_by_std_in_grpo=False``):

        A_i = s_i − mean_g(s)

    ``eps`` and ``norm_by_std`` are accepted for the common signature and ignored: this estimator never divides.
    """
    return _grpo(scores, group_ids, valid, eps, False)
