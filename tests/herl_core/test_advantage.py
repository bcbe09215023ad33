"""herl_core.advantage: GRPO / Dr.GRPO registry (spec §3.11). Run: .venv/bin/pytest tests/herl_core/test_advantage.py"""

from __future__ import annotations

import math

import pytest
import torch

from herl_core.advantage import get_advantage, grpo, list_advantages, register_advantage


def _t(xs, dtype=torch.float32):
    return torch.tensor(xs, dtype=dtype)


def _all_valid(n):
    return torch.ones(n, dtype=torch.bool)


def reference_grpo(scores, group_ids, valid, eps, norm_by_std):
    """Slow loop, read like spec §3.11: per group, mean and unbiased std over valid members."""
    adv = [0.0] * len(scores)
    for g in set(group_ids):
        members = [i for i in range(len(scores)) if group_ids[i] == g and valid[i]]
        vals = [scores[i] for i in members]
        if len(vals) < 2 or max(vals) == min(vals):
            continue  # single member or zero variance → A = 0
        mean = sum(vals) / len(vals)
        std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1))
        for i in members:
            adv[i] = (scores[i] - mean) / (std + eps) if norm_by_std else scores[i] - mean
    return adv


# ------------------------------------------------------------------ hand-computed cases


def test_grpo_ties_hand_computed():
    # scores [1,0,0,1]: mean 0.5; unbiased var = 4·0.25/3 = 1/3 → std = 0.577350;
    # A = ±0.5/(0.577350+1e-6) = ±0.866024
    adv, _ = grpo(_t([1, 0, 0, 1]), _t([0, 0, 0, 0], torch.long), _all_valid(4), eps=1e-6, norm_by_std=True)
    expected = 0.5 / (math.sqrt(1 / 3) + 1e-6)
    assert expected == pytest.approx(0.866024, abs=1e-6)
    assert torch.allclose(adv, _t([expected, -expected, -expected, expected]), atol=1e-6)


def test_zero_variance_group_is_all_zero_even_for_inexact_floats():
    # group 0: seven scores of 0.1. Naively in float32, (x − x.mean())/(x.std() + 1e-6) gives −0.0074 for each
    # (rounding in the float32 mean, divided by ε); the spec's intent is A = 0 exactly.
    # group 1: [1, 0] → mean 0.5, std = sqrt((0.25+0.25)/1) = 0.707107 → A = ±0.5/0.707108 = ±0.707106
    scores = _t([0.1] * 7 + [1.0, 0.0])
    gids = _t([0] * 7 + [1, 1], torch.long)
    naive = (scores[:7] - scores[:7].mean()) / (scores[:7].std() + 1e-6)
    assert naive.abs().max() > 1e-3  # the float32 noise this test guards against is real
    adv, m = grpo(scores, gids, _all_valid(9), eps=1e-6, norm_by_std=True)
    assert adv[:7].tolist() == [0.0] * 7
    assert adv[7].item() == pytest.approx(0.5 / (math.sqrt(0.5) + 1e-6), abs=1e-6)
    assert adv[8].item() == pytest.approx(-0.5 / (math.sqrt(0.5) + 1e-6), abs=1e-6)
    assert m["adv/frac_zero_std"] == pytest.approx(0.5)  # 1 of 2 groups


def test_invalid_entries_are_excluded_and_get_zero():
    # valid scores of the group: [1, 0, 1] (the 0.0 at index 3 is a failed judge call, and index 4 is NaN):
    # mean 2/3; var = ((1/3)²·2 + (2/3)²)/2 = (2/9 + 4/9)/2 = 1/3 → std 0.577350
    # A(1) = (1/3)/0.577351 = 0.577349; A(0) = −(2/3)/0.577351 = −1.154699
    scores = _t([1.0, 0.0, 1.0, 0.0, float("nan")])
    valid = torch.tensor([True, True, True, False, False])
    adv, m = grpo(scores, torch.zeros(5, dtype=torch.long), valid, eps=1e-6, norm_by_std=True)
    std = math.sqrt(1 / 3) + 1e-6
    assert torch.allclose(adv, _t([(1 / 3) / std, -(2 / 3) / std, (1 / 3) / std, 0.0, 0.0]), atol=1e-6)
    assert m["adv/frac_invalid"] == pytest.approx(2 / 5)


def test_single_member_group_gets_zero():
    # group 7 has one member (valid); group 3 has two members but only one valid → both zero
    scores = _t([0.9, 0.2, 0.8])
    gids = _t([7, 3, 3], torch.long)
    valid = torch.tensor([True, True, False])
    adv, m = grpo(scores, gids, valid, eps=1e-6, norm_by_std=True)
    assert adv.tolist() == [0.0, 0.0, 0.0]
    assert m["adv/frac_zero_std"] == 1.0


def test_bonus_only_spread_is_amplified_to_order_one():
    # §3.11 note: [0.5, 0.525, 0.5, 0.5] → mean 0.50625, deviations [−0.00625, 0.01875, −0.00625, −0.00625],
    # var = (3·0.00625² + 0.01875²)/3 = (0.00011719 + 0.00035156)/3 = 0.00015625 → std 0.0125
    # A(0.525) = 0.01875/0.012501 = 1.49988
    adv, _ = grpo(_t([0.5, 0.525, 0.5, 0.5]), torch.zeros(4, dtype=torch.long), _all_valid(4), eps=1e-6)
    assert adv[1].item() == pytest.approx(0.01875 / (0.0125 + 1e-6), rel=1e-4)


def test_grpo_no_std_is_mean_centering_only():
    # [1, 0, 0, 1] → mean 0.5 → A = [0.5, −0.5, −0.5, 0.5]; norm_by_std=True is ignored
    fn = get_advantage("grpo_no_std")
    adv, _ = fn(_t([1, 0, 0, 1]), torch.zeros(4, dtype=torch.long), _all_valid(4), eps=1e-6, norm_by_std=True)
    assert adv.tolist() == [0.5, -0.5, -0.5, 0.5]
    same, _ = grpo(_t([1, 0, 0, 1]), torch.zeros(4, dtype=torch.long), _all_valid(4), eps=1e-6, norm_by_std=False)
    assert torch.equal(adv, same)


def test_metrics_hand_computed():
    # A = [0.866, −0.866, −0.866, 0.866] → mean 0, max 0.866024, min −0.866024; one group, not zero-std
    _, m = grpo(_t([1, 0, 0, 1]), torch.zeros(4, dtype=torch.long), _all_valid(4), eps=1e-6, norm_by_std=True)
    assert m["adv/mean"] == pytest.approx(0.0, abs=1e-7)
    assert m["adv/max"] == pytest.approx(0.866024, abs=1e-6)
    assert m["adv/min"] == pytest.approx(-0.866024, abs=1e-6)
    assert m["adv/frac_zero_std"] == 0.0
    assert m["adv/frac_invalid"] == 0.0


# ------------------------------------------------------------------ reference loop vs vectorized


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("n_groups,group_size", [(1, 8), (4, 8), (7, 3), (16, 2)])
@pytest.mark.parametrize("norm_by_std", [True, False])
def test_vectorized_matches_reference_loop(seed, n_groups, group_size, norm_by_std):
    g = torch.Generator().manual_seed(seed)
    n = n_groups * group_size
    # IF-like scores: fractions k/3 (many ties) in half the cases, continuous otherwise
    scores = torch.randint(0, 4, (n,), generator=g).float() / 3 if seed % 2 else torch.rand(n, generator=g)
    gids = torch.randperm(n, generator=g) % n_groups * 11 + 5  # shuffled, non-contiguous ids
    valid = torch.rand(n, generator=g) > 0.2
    adv, _ = grpo(scores, gids, valid, eps=1e-6, norm_by_std=norm_by_std)
    ref = reference_grpo(scores.double().tolist(), gids.tolist(), valid.tolist(), 1e-6, norm_by_std)
    assert torch.allclose(adv, torch.tensor(ref, dtype=torch.float32), atol=1e-5)


# ------------------------------------------------------------------ registry and input errors


def test_registry_lists_and_rejects():
    assert {"grpo", "grpo_no_std"} <= set(list_advantages())
    assert get_advantage("grpo") is grpo
    with pytest.raises(KeyError, match="grpo_no_std"):
        get_advantage("nope")


def test_duplicate_registration_raises():
    with pytest.raises(ValueError, match="already registered"):

        @register_advantage("grpo")
        def other(scores, group_ids, valid, *, eps, norm_by_std):  # pragma: no cover - never called
            return scores, {}


def test_bad_shapes_and_nan_raise():
    with pytest.raises(ValueError, match=r"\(N,\)"):
        grpo(_t([1, 2]), _t([0], torch.long), _all_valid(2), eps=1e-6, norm_by_std=True)
    with pytest.raises(ValueError, match="bool"):
        grpo(_t([1, 2]), _t([0, 0], torch.long), torch.ones(2), eps=1e-6, norm_by_std=True)
    with pytest.raises(ValueError, match="non-finite"):
        grpo(_t([1, float("nan")]), _t([0, 0], torch.long), _all_valid(2), eps=1e-6, norm_by_std=True)


def test_empty_batch():
    adv, m = grpo(_t([]), _t([], torch.long), torch.zeros(0, dtype=torch.bool), eps=1e-6, norm_by_std=True)
    assert adv.numel() == 0 and m["adv/mean"] == 0.0
