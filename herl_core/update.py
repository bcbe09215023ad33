"""The policy update of one training step (spec §3.10-3.13): advantages over the step's groups, then one optimizer
step per mini-batch of whole groups, accumulated over micro-batches.

    A, mini-batches       = compute_advantages(groups)                   §3.11, §3.13
    logp_old, logp_ref    = frozen_logprobs(...)       (no-grad passes)   §3.10
    for each epoch, for each mini-batch m:                                §3.13   update
        for each micro-batch of m (length-bucketed: padded_split):
            L_pg, stats = loss_fn(logp, logp_old, A, mask, guided)        §3.12   (registered in loss.py)
            L = share_m · agg(L_pg) + β · share_m · agg(k3(logp, logp_ref))         (loss_share)
            backward(L)
        ‖g‖ = clip_gradients(θ, train.grad_clip)                          §3.13
        AdamW step if L and ‖g‖ are finite, else skip it (step_or_skip)

Departures from the authors' code (spec §9, docs/algorithm.md §3):
1. token-mean is taken exactly over each mini-batch (Σ loss·mask / Σ mask): each micro-batch adds its share
   ``share_m = its response tokens / the mini-batch's``, so results do not depend on how the mini-batch is split into
   micro-batches; the reference averages micro-batch token-means (§3.12);
2. π_old comes from the training forward pass itself when there is one mini-batch and one epoch (ρ ≡ 1 then, as
   in the reference where "r = 1 for the first mini-batch"); otherwise one no-grad pass per batch (§3.10);
3. the reference model is not loaded when β = 0 (§3.12: kl_loss_coef = 0.0 in the IF run);
4. responses whose reward failed (judge failure) are kept out of the advantage (score None → advantage 0);
5. an update whose loss or gradient norm is NaN/inf is skipped, and the run stops after
   ``train.max_nonfinite_steps`` in a row, so a diverged run never saves a corrupted checkpoint.

Data-parallel: ``dp`` (herl_core/distributed.py) is the identity in one process. Under W processes each rank updates
on its share of the rows with the GLOBAL normalisers (``StepBatch.totals``), ``dp.accumulate`` syncs the gradients
and ``dp.sum`` gives every rank the global loss, so all ranks take the same skip / stop decision.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from herl_core.config import TrainConfig
from herl_core.logprobs import pack_batch, sequence_logprobs
from herl_core.loss import PolicyLossFn, agg_loss, kl_k3
from herl_core.samples import Group, Sample

if TYPE_CHECKING:
    from herl_core.checkpoint import TrainerState
    from herl_core.distributed import DataParallel


class NonFiniteError(RuntimeError):
    """Raised when updates keep producing NaN/inf: the run stops instead of saving a corrupted checkpoint."""


@dataclass
class Policy:
    """What the update trains."""

    model: Any
    """The policy; ``optimizer`` holds its trainable parameters."""
    train_model: Any
    """The module the training forward runs through: the DDP wrapper or the FSDP root (``model`` in one process)."""
    optimizer: torch.optim.Optimizer
    loss_fn: PolicyLossFn
    """The registered policy loss (``train.policy_loss``, herl_core/loss.py)."""
    ref_model: Any | None = None
    """The frozen reference policy π_ref; None when β = ``train.kl_coef`` = 0 (not loaded)."""
    pad_token_id: int = 0


@dataclass
class StepBatch:
    """The flattened training batch of one step (group-major). ``totals[m]`` = (response tokens, sequences,
    on-policy response tokens) of the GLOBAL mini-batch m: the loss normalisers, the same on every rank."""

    samples: list[Sample]
    group_ids: torch.Tensor
    advantages: torch.Tensor
    minibatches: list[list[int]]
    totals: list[tuple[int, int, float]]
    n_groups: int

    def select(self, groups: Sequence[int]) -> StepBatch:
        """The rows of the global groups ``groups`` (a data-parallel rank's share); mini-batch m keeps its global
        normalisers ``totals[m]``."""
        mine = set(groups)
        rows = [i for i, g in enumerate(self.group_ids.tolist()) if g in mine]
        new_index = {old: new for new, old in enumerate(rows)}
        minibatches = [[new_index[i] for i in mb if i in new_index] for mb in self.minibatches]
        return StepBatch(
            [self.samples[i] for i in rows],
            self.group_ids[rows],
            self.advantages[rows],
            minibatches,
            self.totals,
            self.n_groups,
        )


AdvantageFn = Callable[..., tuple[torch.Tensor, dict[str, float]]]


def compute_advantages(
    groups: Sequence[Group], advantage_fn: AdvantageFn, t: TrainConfig
) -> tuple[StepBatch, dict[str, float]]:
    """GRPO advantages over each group's slots (§3.11) and mini-batches of ``t.mini_batch_prompts`` whole groups
    (§3.13), with each mini-batch's loss normalisers; returns the batch and the ``adv/*`` metrics."""
    samples = [s for g in groups for s in g.samples]
    gid = torch.tensor([i for i, g in enumerate(groups) for _ in g.samples], dtype=torch.long)
    valid = torch.tensor([s.score is not None for s in samples])
    scores = torch.tensor([s.score if s.score is not None else 0.0 for s in samples], dtype=torch.float32)
    adv, metrics = advantage_fn(scores, gid, valid, eps=t.adv_eps, norm_by_std=t.norm_adv_by_std)
    minibatches, totals = [], []
    for start in range(0, len(groups), t.mini_batch_prompts):
        members = set(range(start, min(start + t.mini_batch_prompts, len(groups))))
        mb = [i for i, g in enumerate(gid.tolist()) if g in members]
        minibatches.append(mb)
        n_tok = sum(len(samples[i].completion_ids) for i in mb)
        n_on = float(sum(len(samples[i].completion_ids) for i in mb if not samples[i].guided))
        totals.append((n_tok, len(mb), n_on))
    return StepBatch(samples, gid, adv, minibatches, totals, len(groups)), metrics


# --------------------------------------------------------------------------------------------------------------------
# micro-batches and log-probs


def padded_split(shapes: Sequence[tuple[int, int]], max_size: int, overhead: int = 32) -> list[tuple[int, int]]:
    """Cut a sorted list of (prompt, completion) lengths into contiguous micro-batches [a, b) of ≤ ``max_size``.

    A micro-batch packs to width max(prompt) + max(completion) (``pack_batch``), so it costs
        cost(a, b) = (b - a) · (max_{a≤i<b} P_i + max_{a≤i<b} R_i) + overhead      (padded tokens)
    and the split minimises Σ cost by dynamic programming over the cut points:
        best[b] = min_{b - max_size ≤ a < b} best[a] + cost(a, b),   best[0] = 0.
    ``overhead`` (token-equivalents per forward/backward) keeps the split from cutting for a token or two.
    """
    n = len(shapes)
    best, cut = [0.0] + [math.inf] * n, [0] * (n + 1)
    for b in range(1, n + 1):
        p = r = 0
        for a in range(b - 1, max(b - max_size, 0) - 1, -1):  # grow the last micro-batch leftwards
            p, r = max(p, shapes[a][0]), max(r, shapes[a][1])
            cost = best[a] + (b - a) * (p + r) + overhead
            if cost < best[b]:
                best[b], cut[b] = cost, a
    spans, b = [], n
    while b > 0:
        spans.append((cut[b], b))
        b = cut[b]
    return spans[::-1]


def micro_batches(samples: Sequence[Sample], rows: Sequence[int], max_size: int) -> list[list[int]]:
    """Length-bucketed micro-batches of at most ``max_size`` of ``rows``, cut where padding is least
    (``padded_split``; results do not depend on the split, see module doc)."""
    order = sorted(rows, key=lambda i: len(samples[i].train_prompt_ids) + len(samples[i].completion_ids))
    shapes = [(len(samples[i].train_prompt_ids), len(samples[i].completion_ids)) for i in order]
    return [order[a:b] for a, b in padded_split(shapes, max_size)]


def forward_logprobs(
    model: Any, samples: Sequence[Sample], rows: Sequence[int], pad_token_id: int, temperature: float, grad: bool
) -> tuple[torch.Tensor, Any]:
    """(B, R) log-probs of the completions of ``rows`` under their training prompts (§3.10), and the packed batch."""
    batch = pack_batch(
        [samples[i].train_prompt_ids for i in rows], [samples[i].completion_ids for i in rows], pad_token_id
    ).to(next(model.parameters()).device)
    with torch.set_grad_enabled(grad):
        return sequence_logprobs(model, batch, temperature), batch


def no_grad_logprobs(
    model: Any, samples: Sequence[Sample], t: TrainConfig, pad_token_id: int
) -> dict[int, torch.Tensor]:
    """Per-sample completion log-probs (1-D) of every sample, one no-grad pass (old policy or reference, §3.10)."""
    out = {}
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for mb in micro_batches(samples, range(len(samples)), t.micro_batch_size):
            logp, batch = forward_logprobs(model, samples, mb, pad_token_id, t.logprob_temperature, grad=False)
            for row, i in enumerate(mb):
                out[i] = logp[row][batch.response_mask[row].bool()].clone()
    model.train(was_training)
    return out


def frozen_logprobs(
    policy: Policy, batch: StepBatch, t: TrainConfig, dp: DataParallel
) -> tuple[dict[int, torch.Tensor] | None, dict[int, torch.Tensor] | None]:
    """(π_old, π_ref) log-probs of the batch before the update (§3.10). π_old is None when there is one mini-batch
    and one epoch (ρ ≡ 1: the training forward gives it, module doc 2.); π_ref is None without a reference model."""
    old = ref = None
    if len(batch.minibatches) > 1 or t.ppo_epochs > 1:
        with dp.gathered():  # FSDP: whole weights for the no-grad pass (no collective per forward)
            old = no_grad_logprobs(policy.model, batch.samples, t, policy.pad_token_id)
    if policy.ref_model is not None:
        ref = no_grad_logprobs(policy.ref_model, batch.samples, t, policy.pad_token_id)
    return old, ref


def _pad_like(rows: list[torch.Tensor], like: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    out = torch.zeros_like(like)
    for r, values in enumerate(rows):
        out[r][mask[r].bool()] = values
    return out


@dataclass
class MicroBatch:
    """The tensors of one micro-batch: (B, R) log-probs under π_θ (with grad), π_old and π_ref (None without a
    reference model), the response mask, and per row the advantage and the guided flag."""

    rows: list[int]
    logp: torch.Tensor
    old_logp: torch.Tensor
    ref_logp: torch.Tensor | None
    mask: torch.Tensor
    adv: torch.Tensor
    guided: torch.Tensor


def micro_batch(
    policy: Policy,
    batch: StepBatch,
    rows: list[int],
    old: dict[int, torch.Tensor] | None,
    ref: dict[int, torch.Tensor] | None,
    temperature: float,
) -> MicroBatch:
    """The training forward of ``rows`` and what the loss compares it with."""
    logp, packed = forward_logprobs(
        policy.train_model, batch.samples, rows, policy.pad_token_id, temperature, grad=True
    )
    mask = packed.response_mask.to(logp.dtype)
    old_logp = logp.detach() if old is None else _pad_like([old[i] for i in rows], logp, mask)
    ref_logp = None if ref is None else _pad_like([ref[i] for i in rows], logp, mask)
    adv = batch.advantages[rows].to(logp.device)
    guided = torch.tensor([batch.samples[i].guided for i in rows], device=logp.device)
    return MicroBatch(rows, logp, old_logp, ref_logp, mask, adv, guided)


# --------------------------------------------------------------------------------------------------------------------
# the update


def loss_share(
    per_token: torch.Tensor,
    stats: dict[str, float],
    x: MicroBatch,
    totals: tuple[int, int, float],
    t: TrainConfig,
    acc: dict[str, float],
) -> torch.Tensor:
    """This micro-batch's share of its mini-batch's loss, agg(L_pg) + β·agg(k3), normalised by the mini-batch's
    totals (token-mean: its response tokens; seq-mean-token-mean: its sequences), so the shares of a mini-batch sum
    to its exact loss (module doc 1.). Adds its share of the ``actor/*`` metrics to ``acc``."""
    n_tok, n_seq, n_on = totals
    share = x.mask.sum().item() / n_tok if t.loss_agg == "token-mean" else len(x.rows) / n_seq
    pg = agg_loss(per_token, x.mask, t.loss_agg) * share
    loss = pg
    if x.ref_logp is not None:
        kl = agg_loss(kl_k3(x.logp, x.ref_logp), x.mask, t.loss_agg) * share
        loss = loss + t.kl_coef * kl
        acc["actor/kl"] += kl.item()
    acc["actor/loss"] += loss.item()
    acc["actor/pg_loss"] += pg.item()
    on_tok = (x.mask * (~x.guided).unsqueeze(1).to(x.mask.dtype)).sum().item()  # clipfrac is over on-policy tokens
    acc["actor/clipfrac"] += stats.get("actor/clipfrac", 0.0) * on_tok / max(n_on, 1.0)
    for key in ("actor/dual_clipfrac", "actor/ratio_mean", "actor/guided_token_frac"):  # token-weighted
        acc[key] = acc.get(key, 0.0) + stats.get(key, 0.0) * x.mask.sum().item() / n_tok
    return loss


def clip_gradients(model: Any, max_norm: float, dp: DataParallel) -> float:
    """g ← g · min(1, max_norm / (‖g‖₂ + 1e-6)) over every trainable parameter (torch's ``clip_grad_norm_``,
    §3.13: grad_clip 1.0); returns ‖g‖₂ before clipping, over all ranks' shards (``dp.whole``)."""
    return float(dp.whole(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)))


def step_or_skip(
    optimizer: torch.optim.Optimizer, state: TrainerState, loss: float, grad_norm: float, limit: int
) -> bool:
    """The optimizer step when the loss and the gradient norm are finite. Otherwise the gradients are dropped, the
    skip is counted in ``state`` and, at ``limit`` skips in a row, ``NonFiniteError`` stops the run. Returns whether
    it stepped."""
    if math.isfinite(loss) and math.isfinite(grad_norm):
        optimizer.step()
        state.consecutive_nonfinite = 0
        return True
    optimizer.zero_grad(set_to_none=True)
    state.consecutive_nonfinite += 1
    state.nonfinite_total += 1
    if state.consecutive_nonfinite >= limit:
        raise NonFiniteError(
            f"{state.consecutive_nonfinite} consecutive updates had a non-finite loss or gradient "
            f"(loss={loss}, grad_norm={grad_norm}); stopping without saving. Lower train.lr or check the rewards."
        )
    return False


def update(
    policy: Policy, batch: StepBatch, t: TrainConfig, gamma: float, dp: DataParallel, state: TrainerState
) -> dict[str, float]:
    """PPO-style update of one step (module doc): ``t.ppo_epochs`` passes over the mini-batches, one optimizer step
    each; ``gamma`` = ``hindsight.shaping_gamma`` of the guided tokens. Returns the ``actor/*`` metrics, averaged
    over the optimizer steps, with the number of updates taken and skipped."""
    old, ref = frozen_logprobs(policy, batch, t, dp)  # §3.10
    policy.model.train()
    sums: dict[str, float] = {}
    updates = skipped = 0
    for _ in range(t.ppo_epochs):
        for rows, totals in zip(batch.minibatches, batch.totals, strict=True):  # §3.13
            policy.optimizer.zero_grad(set_to_none=True)
            acc = {"actor/loss": 0.0, "actor/pg_loss": 0.0, "actor/kl": 0.0, "actor/clipfrac": 0.0}
            micros = micro_batches(batch.samples, rows, t.micro_batch_size)
            for micro in dp.accumulate(policy.train_model, micros, policy.pad_token_id):
                x = micro_batch(policy, batch, micro, old, ref, t.logprob_temperature)
                per_token, stats = policy.loss_fn(
                    x.logp, x.old_logp, x.adv, x.mask, x.guided,
                    clip_low=t.clip_ratio_low, clip_high=t.clip_ratio_high, clip_c=t.clip_ratio_c, gamma=gamma,
                )  # §3.12  # fmt: skip
                dp.backward(loss_share(per_token, stats, x, totals, t, acc))
            acc = dp.sum(acc)  # every rank sees the global loss: the same skip / stop decision
            grad_norm = clip_gradients(policy.model, t.grad_clip, dp)  # §3.13
            stepped = step_or_skip(policy.optimizer, state, acc["actor/loss"], grad_norm, t.max_nonfinite_steps)
            updates, skipped = updates + stepped, skipped + (not stepped)
            for k, v in {**acc, "actor/grad_norm": grad_norm}.items():
                sums[k] = sums.get(k, 0.0) + v
    n = max(len(batch.minibatches) * t.ppo_epochs, 1)
    return {
        **{k: v / n for k, v in sums.items()},
        "actor/updates": float(updates),
        "actor/nonfinite_skipped": float(skipped),
    }
