"""Policy losses (a registry with one signature), loss aggregation and the k3 KL (spec §3.12).

Every policy loss is ``fn(logp, old_logp, advantages, response_mask, guided_mask, *, clip_low, clip_high, clip_c,
gamma) -> (per_token_loss, metrics)``:

* ``logp``, ``old_logp`` (B, T): log π_θ and log π_old of each response token (π_old under the sample's own prompt:
  the hindsight prompt for a guided row, §3.10, so ``old_logp`` doubles as the reference's ``he_log_probs``);
* ``advantages`` (B,): one advantage per row, broadcast over its tokens (§3.11);
* ``response_mask`` (B, T): 1 on response tokens, 0 on padding;
* ``guided_mask`` (B,) bool: rows that hold a guided (rewritten) response (the reference's ``he_mask``, §3.9);
* returns the per-token loss (B, T), 0 outside ``response_mask``, and float metrics named ``actor/...``.

Aggregate with ``agg_loss``; add ``kl_coef · agg_loss(kl_k3(logp, ref_logp), mask)`` for the KL term (§3.12).
Padding positions of ``logp``/``old_logp`` must hold finite numbers (they are masked, but a NaN would still reach the
gradient).

Departures from the authors' code: none in the formulas. The reference's ``mixpolicy_vanilla`` is registered here as
``mixpolicy``; with ``use_he_logprob=False`` the reference would shape π_θ itself (LUFFY), which is not offered.
"""

from __future__ import annotations

from typing import Literal, Protocol

import torch
from torch import Tensor

from herl_core.registry import Registry


class PolicyLossFn(Protocol):
    """The signature every registered policy loss has."""

    def __call__(
        self,
        logp: Tensor,
        old_logp: Tensor,
        advantages: Tensor,
        response_mask: Tensor,
        guided_mask: Tensor,
        *,
        clip_low: float,
        clip_high: float,
        clip_c: float,
        gamma: float,
    ) -> tuple[Tensor, dict[str, float]]: ...


POLICY_LOSSES: Registry[PolicyLossFn] = Registry("policy loss")
"""Every policy loss, by name (``train.policy_loss``)."""
register_policy_loss = POLICY_LOSSES.register
"""Decorator: ``@register_policy_loss("name")`` registers a loss; a name taken by another raises ValueError."""
get_policy_loss = POLICY_LOSSES.get
"""The policy loss registered under a name; an unknown name raises ``KeyError`` listing the valid names."""
list_policy_losses = POLICY_LOSSES.names
"""Registered policy loss names, sorted."""


# --------------------------------------------------------------------------------------------------------------------
# formulas


def _check(logp: Tensor, old_logp: Tensor, advantages: Tensor, response_mask: Tensor, guided_mask: Tensor) -> None:
    b = logp.shape[0]
    if logp.dim() != 2 or old_logp.shape != logp.shape or response_mask.shape != logp.shape:
        raise ValueError(
            f"logp, old_logp and response_mask must all be (B, T); got {tuple(logp.shape)}, "
            f"{tuple(old_logp.shape)}, {tuple(response_mask.shape)}"
        )
    if advantages.shape != (b,) or guided_mask.shape != (b,):
        raise ValueError(
            f"advantages and guided_mask must be (B,) = ({b},); got {tuple(advantages.shape)}, "
            f"{tuple(guided_mask.shape)}"
        )


def ppo_clip_terms(
    logp: Tensor, old_logp: Tensor, advantages: Tensor, clip_low: float, clip_high: float, clip_c: float
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """veRL PPO-clip with dual clip, per token (spec §3.12; dual clip: arXiv 1912.09729):

        ratio = exp(clamp(logp − old_logp, −20, 20))
        L     = max(−A·ratio, −A·clip(ratio, 1 − clip_low, 1 + clip_high))
        L     = min(L, −A·clip_c)          for A < 0 only

    Returns (loss, ratio, clipped, dual_clipped), all (B, T); the last two are bool flags of an active clip.
    """
    if not 0 <= clip_low < 1 or clip_high < 0 or clip_c <= 1:
        raise ValueError(f"need 0 <= clip_low < 1, clip_high >= 0, clip_c > 1; got {clip_low}, {clip_high}, {clip_c}")
    ratio = torch.exp((logp - old_logp).clamp(-20.0, 20.0))  # (B, T)
    a = advantages.unsqueeze(-1)  # (B, 1)
    pg1 = -a * ratio  # (B, T)
    pg2 = -a * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)  # (B, T)
    clipped_loss = torch.maximum(pg1, pg2)
    pg3 = -a * clip_c  # (B, 1)
    dual_loss = torch.minimum(clipped_loss, pg3)
    negative = a < 0  # (B, 1)
    loss = torch.where(negative, dual_loss, clipped_loss)
    return loss, ratio, pg2 > pg1, (clipped_loss > pg3) & negative


def guided_terms(logp: Tensor, old_logp: Tensor, advantages: Tensor, gamma: float) -> tuple[Tensor, Tensor, Tensor]:
    """Clip-free shaped loss of guided tokens (spec §3.12, CA L1108-1119; LUFFY-style shaping, §9-A4):

        ρ = exp(clamp(logp − old_logp, −20, 20))      old_logp = π_old under the hindsight prompt
        w = ρ / (ρ + γ)      (w = ρ if γ ≤ 0)
        L_off = −A·w          ∂L_off/∂logp = −A·γ·ρ/(ρ+γ)²   (= −A/4 at ρ = 1, γ = 1)

    Returns (loss, ratio ρ, weight w), all (B, T).
    """
    ratio = torch.exp((logp - old_logp).clamp(-20.0, 20.0))  # (B, T)
    weight = ratio / (ratio + gamma) if gamma > 0 else ratio
    return -advantages.unsqueeze(-1) * weight, ratio, weight


def _masked_mean(x: Tensor, mask: Tensor) -> float:
    n = int(mask.sum())
    return float((x.detach().double() * mask).sum() / n) if n else 0.0


def _policy_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    guided_mask: Tensor,
    clip_low: float,
    clip_high: float,
    clip_c: float,
    gamma: float,
) -> tuple[Tensor, dict[str, float]]:
    """On-policy tokens: PPO dual clip; tokens of ``guided_mask`` rows: L_off. Shared body of the registered losses."""
    _check(logp, old_logp, advantages, response_mask, guided_mask)
    resp = response_mask > 0  # (B, T) bool
    off = resp & guided_mask.bool().unsqueeze(-1)  # (B, T) guided tokens
    on = resp & ~off  # (B, T) on-policy tokens
    l_on, ratio, clipped, dual = ppo_clip_terms(logp, old_logp, advantages, clip_low, clip_high, clip_c)
    l_off, _, weight = guided_terms(logp, old_logp, advantages, gamma)
    loss = torch.where(off, l_off, torch.where(on, l_on, torch.zeros_like(l_on)))  # (B, T)
    n_resp = int(resp.sum())
    metrics = {
        "actor/clipfrac": _masked_mean(clipped, on),
        "actor/dual_clipfrac": _masked_mean(dual, on),
        "actor/ratio_mean": _masked_mean(ratio, on),
        "actor/ppo_kl": _masked_mean(old_logp - logp, on),
        "actor/guided_token_frac": float(off.sum()) / n_resp if n_resp else 0.0,
        "actor/guided_ratio_mean": _masked_mean(ratio, off),
        "actor/guided_weight_mean": _masked_mean(weight, off),
    }
    return loss, metrics


@register_policy_loss("ppo_clip")
def ppo_clip(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    guided_mask: Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    clip_c: float = 3.0,
    gamma: float = 1.0,
) -> tuple[Tensor, dict[str, float]]:
    """veRL ``vanilla`` PPO loss with dual clip on every response token (spec §3.12; the RLVR baseline, §6):

        L = max(−A·ρ, −A·clip(ρ, 1 − clip_low, 1 + clip_high));  L = min(L, −A·clip_c) if A < 0

    ``guided_mask`` and ``gamma`` are ignored: every row is treated as on-policy.
    """
    no_guided = torch.zeros_like(guided_mask, dtype=torch.bool)
    return _policy_loss(logp, old_logp, advantages, response_mask, no_guided, clip_low, clip_high, clip_c, gamma)


@register_policy_loss("mixpolicy")
def mixpolicy(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    guided_mask: Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    clip_c: float = 3.0,
    gamma: float = 1.0,
) -> tuple[Tensor, dict[str, float]]:
    """HeRL ``mixpolicy_vanilla`` (spec §3.12, CA L983-1139):

        on-policy tokens:  L_on  = PPO dual clip as in ``ppo_clip``
        guided tokens:     L_off = −A·ρ/(ρ + γ)   (−A·ρ if γ ≤ 0), no clip   (rows with guided_mask)

    γ = 1 in the reference IF run, 0.1 in the medical run (§5.1).
    """
    return _policy_loss(logp, old_logp, advantages, response_mask, guided_mask, clip_low, clip_high, clip_c, gamma)


# --------------------------------------------------------------------------------------------------------------------
# aggregation and KL


def agg_loss(per_token: Tensor, mask: Tensor, mode: Literal["token-mean", "seq-mean-token-mean"]) -> Tensor:
    """Reduce a (B, T) per-token loss to a scalar (spec §3.12, CA L774-790):

        token-mean:          Σ_{b,t} m·L / Σ_{b,t} m          (over all response tokens of the micro-batch)
        seq-mean-token-mean: mean_b [ Σ_t m·L / Σ_t m ]       (rows with no response token are left out)

    An all-zero mask gives 0 (still attached to the graph).
    """
    if per_token.shape != mask.shape:
        raise ValueError(f"per_token {tuple(per_token.shape)} and mask {tuple(mask.shape)} must match")
    m = (mask > 0).to(per_token.dtype)  # (B, T)
    masked = torch.where(mask > 0, per_token, torch.zeros_like(per_token))  # (B, T); NaN-safe on padding
    if mode == "token-mean":
        return masked.sum() / m.sum().clamp(min=1)
    if mode == "seq-mean-token-mean":
        n_tok = m.sum(-1)  # (B,)
        seq = masked.sum(-1) / n_tok.clamp(min=1)  # (B,)
        has = n_tok > 0
        return (seq * has).sum() / has.sum().clamp(min=1)
    raise ValueError(f"unknown loss aggregation {mode!r}; valid: ['token-mean', 'seq-mean-token-mean']")


def kl_k3(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """veRL ``low_var_kl`` (Schulman's k3 estimator of KL(π_θ‖π_ref), http://joschu.net/blog/kl-approx.html), per
    token, spec §3.12:

        kl = clamp(ref_logp − logp, −20, 20)
        k3 = clamp(exp(kl) − kl − 1, −10, 10)

    k3 ≥ 0 because e^x ≥ 1 + x, and k3 = 0 iff logp = ref_logp. Its gradient is ∂k3/∂logp = 1 − π_ref/π_θ
    (0 at equality; 0 where the clamp at 10 is active). Shapes: (B, T) → (B, T); mask with ``agg_loss``.
    """
    kl = (ref_logp - logp).clamp(-20.0, 20.0)  # (B, T)
    return (torch.exp(kl) - kl - 1.0).clamp(-10.0, 10.0)
