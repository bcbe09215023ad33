"""herl_core.loss: PPO dual clip, HeRL guided shaping, aggregation, k3 KL (spec §3.12).

Run: .venv/bin/pytest tests/herl_core/test_loss.py
"""

from __future__ import annotations

import math

import pytest
import torch

from herl_core.loss import (
    agg_loss,
    get_policy_loss,
    kl_k3,
    list_policy_losses,
    mixpolicy,
    ppo_clip,
    register_policy_loss,
)

CLIP = {"clip_low": 0.2, "clip_high": 0.2, "clip_c": 3.0}


def _one_token(log_ratio: float, adv: float, guided: bool, gamma: float = 1.0, loss=mixpolicy):
    """Loss and d loss / d logp for a single (1, 1) token with logp − old = log_ratio."""
    logp = torch.tensor([[log_ratio]], dtype=torch.float64, requires_grad=True)
    old = torch.zeros(1, 1, dtype=torch.float64)
    out, metrics = loss(
        logp,
        old,
        torch.tensor([adv], dtype=torch.float64),
        torch.ones(1, 1),
        torch.tensor([guided]),
        gamma=gamma,
        **CLIP,
    )
    out.sum().backward()
    return out.item(), logp.grad.item(), metrics


# ------------------------------------------------------------------ PPO clip (on-policy tokens)


def test_on_policy_at_ratio_one_is_minus_a_with_gradient_minus_a():
    # ρ = 1: L = max(−A·1, −A·1) = −A = −2; dL/dlogp = −A·ρ = −2
    val, grad, m = _one_token(0.0, 2.0, guided=False)
    assert val == pytest.approx(-2.0) and grad == pytest.approx(-2.0)
    assert m["actor/clipfrac"] == 0.0 and m["actor/ratio_mean"] == pytest.approx(1.0)


def test_positive_advantage_clip_at_ratio_1_5():
    # A = 1, ρ = 1.5: max(−1.5, −1·1.2) = −1.2 → −1.2·A, constant in logp → zero gradient
    val, grad, m = _one_token(math.log(1.5), 1.0, guided=False)
    assert val == pytest.approx(-1.2) and grad == 0.0
    assert m["actor/clipfrac"] == 1.0 and m["actor/dual_clipfrac"] == 0.0


def test_dual_clip_for_negative_advantage():
    # A = −1, ρ = 5: max(5, 1·1.2) = 5 → min(5, −A·3 = 3) = 3, constant → zero gradient
    val, grad, m = _one_token(math.log(5.0), -1.0, guided=False)
    assert val == pytest.approx(3.0) and grad == 0.0
    assert m["actor/dual_clipfrac"] == 1.0
    # without the dual clip branch (A > 0 never uses it): A = +1, ρ = 5 → max(−5, −1.2) = −1.2
    val_pos, _, _ = _one_token(math.log(5.0), 1.0, guided=False)
    assert val_pos == pytest.approx(-1.2)


def test_negative_advantage_low_ratio_clip():
    # A = −1, ρ = 0.5: max(0.5, 1·0.8) = 0.8 (clipped, zero grad); 0.8 < 3 so the dual clip is inactive
    val, grad, m = _one_token(math.log(0.5), -1.0, guided=False)
    assert val == pytest.approx(0.8) and grad == 0.0
    assert m["actor/clipfrac"] == 1.0 and m["actor/dual_clipfrac"] == 0.0


# ------------------------------------------------------------------ guided tokens


@pytest.mark.parametrize("gamma,factor", [(1.0, 0.25), (0.1, 0.1 / 1.1**2)])
def test_guided_gradient_at_ratio_one_is_gamma_over_one_plus_gamma_squared(gamma, factor):
    # dL_off/dlogp = −A·γ·ρ/(ρ+γ)²; at ρ = 1: −A·γ/(1+γ)² → 0.25·(−A) for γ = 1, 0.1/1.21 = 0.0826·(−A) for γ = 0.1
    # on-policy at ρ = 1: −A. Same A = 1.7 for both.
    _, g_on, _ = _one_token(0.0, 1.7, guided=False, gamma=gamma)
    val_off, g_off, m = _one_token(0.0, 1.7, guided=True, gamma=gamma)
    assert g_off / g_on == pytest.approx(factor, rel=1e-12)
    assert val_off == pytest.approx(-1.7 / (1 + gamma))  # L_off = −A·1/(1+γ)
    assert m["actor/guided_token_frac"] == 1.0 and m["actor/guided_weight_mean"] == pytest.approx(1 / (1 + gamma))
    if gamma == 0.1:
        assert factor == pytest.approx(0.0826, abs=1e-4)


def test_guided_tokens_are_never_clipped():
    # ρ = 5, A = −1, γ = 1: L_off = −(−1)·5/6 = 0.8333 (no dual clip to 3, no PPO clip);
    # gradient −A·γ·ρ/(ρ+γ)² = 5/36 = 0.138889 (non-zero where PPO would give 0)
    val, grad, m = _one_token(math.log(5.0), -1.0, guided=True)
    assert val == pytest.approx(5 / 6) and grad == pytest.approx(5 / 36)
    assert m["actor/clipfrac"] == 0.0  # no on-policy tokens → 0


def test_gamma_zero_uses_raw_ratio():
    # γ = 0 → w = ρ: L_off = −A·ρ = −2·1.5 = −3, gradient −A·ρ = −3 (unclipped)
    val, grad, _ = _one_token(math.log(1.5), 2.0, guided=True, gamma=0.0)
    assert val == pytest.approx(-3.0) and grad == pytest.approx(-3.0)


def test_ppo_clip_ignores_guided_mask():
    # same token as test_positive_advantage_clip_at_ratio_1_5 but flagged guided: ppo_clip still clips → −1.2
    val, grad, m = _one_token(math.log(1.5), 1.0, guided=True, loss=ppo_clip)
    assert val == pytest.approx(-1.2) and grad == 0.0 and m["actor/guided_token_frac"] == 0.0


def test_mixed_batch_routes_rows_and_masks_padding():
    # row 0 on-policy, row 1 guided (γ = 1); all ρ = 1; row 1 has one padding token.
    # row 0: L_on = −A = −1 per token; row 1: L_off = −A·1/2 = −(−2)/2 = 1 per valid token, 0 on padding
    logp = torch.zeros(2, 3)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    out, m = mixpolicy(
        logp, logp.clone(), torch.tensor([1.0, -2.0]), mask, torch.tensor([False, True]), gamma=1.0, **CLIP
    )
    assert out.tolist() == [[-1.0, -1.0, -1.0], [1.0, 1.0, 0.0]]
    assert m["actor/guided_token_frac"] == pytest.approx(2 / 5)
    # token-mean: (−3 + 2)/5 = −0.2
    assert agg_loss(out, mask, "token-mean").item() == pytest.approx(-0.2)


# ------------------------------------------------------------------ aggregation


def test_token_mean_is_sum_over_count_and_ignores_masked_tokens():
    # valid tokens: 1, 2, 3 (row 0) and 4 (row 1) → (1+2+3+4)/4 = 2.5; masked entries (100, NaN) change nothing
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 100.0, float("nan")]], requires_grad=True)
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    loss = agg_loss(x, mask, "token-mean")
    assert loss.item() == pytest.approx(2.5)
    loss.backward()
    # gradient 1/4 on each valid token, exactly 0 on masked ones
    assert x.grad.tolist() == [[0.25, 0.25, 0.25], [0.25, 0.0, 0.0]]


def test_seq_mean_token_mean():
    # row 0 mean (1+2+3)/3 = 2, row 1 mean 4, row 2 has no token (left out) → (2+4)/2 = 3
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 9.0, 9.0], [7.0, 7.0, 7.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0], [0, 0, 0]])
    assert agg_loss(x, mask, "seq-mean-token-mean").item() == pytest.approx(3.0)


def test_agg_loss_empty_mask_and_bad_mode():
    x = torch.ones(2, 2, requires_grad=True)
    assert agg_loss(x, torch.zeros(2, 2), "token-mean").item() == 0.0
    with pytest.raises(ValueError, match="token-mean"):
        agg_loss(x, torch.ones(2, 2), "sum")  # type: ignore[arg-type]


# ------------------------------------------------------------------ k3 KL


def test_kl_k3_values_and_gradient():
    # equal log-probs → 0. logp = log 0.5, ref = log 0.25: kl = ref − logp = −ln 2,
    # k3 = e^{−ln2} + ln 2 − 1 = 0.5 + 0.693147 − 1 = 0.193147; gradient 1 − π_ref/π_θ = 1 − 0.5 = 0.5
    logp = torch.tensor([[math.log(0.5), math.log(0.3)]], dtype=torch.float64, requires_grad=True)
    ref = torch.tensor([[math.log(0.25), math.log(0.3)]], dtype=torch.float64)
    k3 = kl_k3(logp, ref)
    assert k3[0, 0].item() == pytest.approx(0.5 + math.log(2) - 1, abs=1e-12)
    assert k3[0, 0].item() == pytest.approx(0.19315, abs=1e-5)
    assert k3[0, 1].item() == 0.0
    k3.sum().backward()
    assert logp.grad.tolist()[0] == pytest.approx([0.5, 0.0])


def test_kl_k3_is_nonnegative_and_clamped():
    g = torch.Generator().manual_seed(0)
    logp, ref = torch.randn(64, 16, generator=g) * 3, torch.randn(64, 16, generator=g) * 3
    k3 = kl_k3(logp, ref)
    assert (k3 >= 0).all() and (k3 <= 10).all()
    # ref − logp = 20 → e^20 − 21 ≫ 10 → clamped to 10
    assert kl_k3(torch.tensor([[0.0]]), torch.tensor([[20.0]])).item() == 10.0


# ------------------------------------------------------------------ registry and errors


def test_registry():
    assert {"ppo_clip", "mixpolicy"} <= set(list_policy_losses())
    assert get_policy_loss("mixpolicy") is mixpolicy
    with pytest.raises(KeyError, match="mixpolicy"):
        get_policy_loss("vanilla")
    with pytest.raises(ValueError, match="already registered"):
        register_policy_loss("ppo_clip")(lambda *a, **k: None)


def test_shape_and_clip_errors():
    z = torch.zeros(2, 3)
    with pytest.raises(ValueError, match=r"\(B,\)"):
        mixpolicy(z, z, torch.zeros(3), torch.ones(2, 3), torch.zeros(2, dtype=torch.bool), gamma=1.0, **CLIP)
    with pytest.raises(ValueError, match="clip_c"):
        ppo_clip(
            z,
            z,
            torch.zeros(2),
            torch.ones(2, 3),
            torch.zeros(2, dtype=torch.bool),
            clip_low=0.2,
            clip_high=0.2,
            clip_c=1.0,
            gamma=1.0,
        )
