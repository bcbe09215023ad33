"""The online HeRL training loop (spec §3.15): every step is rollout → reward → hindsight → advantage → update.

``Trainer.step()`` reads top to bottom like the spec's pseudo-code. With ``hindsight.enabled = false`` the hindsight
stage is skipped and the same code is plain GRPO (RLVR, spec §6 baselines).

Departures from the authors' code (spec §9 and docs/algorithm.md):
1. token-mean is taken exactly over each mini-batch (Σ loss·mask / Σ mask), so results do not depend on how the
   mini-batch is split into micro-batches; the reference averages micro-batch token-means (§3.12);
2. π_old comes from the training forward pass itself when there is one mini-batch and one epoch (ρ ≡ 1 then, as
   in the reference where "r = 1 for the first mini-batch"); otherwise one no-grad pass per batch (§3.10);
3. the reference model is not loaded when β = 0 (§3.12: kl_loss_coef = 0.0 in the IF run);
4. responses whose reward failed (judge failure) are kept out of the advantage (score None → advantage 0).

Data-parallel (``accelerate``/``torchrun``, W processes; DDP or FSDP): each rank samples its share of the step's
prompts and the global batch is gathered before the advantage; see herl_core/distributed.py. With W = 1 nothing
changes.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from herl_core.advantage import get_advantage
from herl_core.checkpoint import (
    TrainerState,
    latest_checkpoint,
    load_checkpoint,
    read_optimizer_state,
    read_weights,
    restore_rng,
    save_checkpoint,
    sweep_leftovers,
)
from herl_core.config import Config
from herl_core.distributed import DataParallel, interleave, share_indices
from herl_core.hindsight.step import HindsightOutput, hindsight_metrics, hindsight_step
from herl_core.logprobs import pack_batch, sequence_logprobs
from herl_core.loss import agg_loss, get_policy_loss, kl_k3
from herl_core.models import load_policy
from herl_core.records import PromptRecord, RolloutRecord
from herl_core.rewards import make_reward
from herl_core.rewards.base import RewardFn
from herl_core.rollout import make_engine
from herl_core.rollout.base import DrawMeter, RolloutEngine
from herl_core.rollout.groups import call_seed, rollout_records, sample_groups
from herl_core.samples import Group, Sample
from herl_core.sink import MetricsSink, NullSink


class NonFiniteError(RuntimeError):
    """Raised when updates keep producing NaN/inf: the run stops instead of saving a corrupted checkpoint."""


def frac_zero_std(groups: Sequence[Group]) -> float:
    """Fraction of groups whose scored rewards are all equal (no GRPO signal; TRL's frac_reward_zero_std)."""
    flat = 0
    for g in groups:
        scores = [s for s in g.scores if s is not None]
        flat += len(scores) < 2 or max(scores) - min(scores) < 1e-12
    return flat / max(len(groups), 1)


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


@dataclass
class Prepared:
    """The flattened training batch of one step (group-major). ``totals[m]`` = (response tokens, sequences,
    on-policy response tokens) of the GLOBAL mini-batch m: the loss normalisers, the same on every rank."""

    samples: list[Sample]
    group_ids: torch.Tensor
    advantages: torch.Tensor
    minibatches: list[list[int]]
    totals: list[tuple[int, int, float]] = field(default_factory=list)


class Trainer:
    """Owns the policy, optimizer, engine and reward; ``step()`` runs one training step."""

    def __init__(
        self,
        cfg: Config,
        prompts: Sequence[PromptRecord],
        *,
        model=None,
        tokenizer=None,
        reward: RewardFn | None = None,
        engine: RolloutEngine | None = None,
        sink: MetricsSink | None = None,
        fused_adamw: bool = True,
        dp: DataParallel | None = None,
    ):
        """``fused_adamw``: one fused AdamW kernel over all parameters (CPU/CUDA); the per-tensor loop costs about
        7x more on a CPU for SmolLM2 (docs/performance.md). Same update rule; float rounding may differ.
        ``dp``: the data-parallel group (default: from the launcher's environment; one process when not launched)."""
        self.cfg = cfg
        self.dp = dp or DataParallel.from_env(cfg.train.parallel)
        if self.dp.world > 1:  # fail before any work when the batch cannot be shared (herl_core/distributed.py)
            share_indices(cfg.train.prompts_per_step, cfg.train.mini_batch_prompts, 0, self.dp.world)
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        torch.manual_seed(cfg.train.seed)
        if len(prompts) < cfg.train.prompts_per_step:
            raise ValueError(
                f"train.prompts_per_step ({cfg.train.prompts_per_step}) exceeds the {len(prompts)} training prompts"
            )
        self.prompts = list(prompts)
        if model is None or tokenizer is None:
            # ranks load on the CPU: accelerate moves each rank's copy to its own device (not all onto cuda:0)
            model, tokenizer = load_policy(cfg.model, device="cpu" if self.dp.world > 1 else None)
        self.model, self.tokenizer = model, tokenizer
        if cfg.train.gradient_checkpointing:
            self.model.gradient_checkpointing_enable()
        self.ref_model = self._frozen_copy(model) if cfg.train.kl_coef > 0 else None  # whole on every rank
        self.train_model = self.dp.wrap(model)  # W > 1: DDP wrapper / FSDP shards, on the rank's device
        if self.ref_model is not None and self.dp.device is not None:
            self.ref_model.to(self.dp.device)
        params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(
            params,
            lr=cfg.train.lr,
            betas=cfg.train.betas,
            weight_decay=cfg.train.weight_decay,
            fused=fused_adamw and all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params),
        )
        self.engine = DrawMeter(
            engine if engine is not None else make_engine(cfg.rollout.engine, model, tokenizer, seed=cfg.train.seed)
        )
        self.reward = reward if reward is not None else make_reward(cfg.reward)
        self.sink = sink or NullSink()
        self.state = TrainerState()
        self.advantage_fn = get_advantage(cfg.train.advantage)
        self.loss_fn = get_policy_loss(cfg.train.policy_loss)

    @staticmethod
    def _frozen_copy(model):
        ref = copy.deepcopy(model).eval()
        for p in ref.parameters():
            p.requires_grad_(False)
        return ref

    # ---------------------------------------------------------------------------------------------------- data
    def next_prompts(self) -> list[PromptRecord]:
        """The next ``prompts_per_step`` prompts; a fresh seeded permutation per epoch, last partial batch dropped
        (§3.1: the dataloader drops the last partial batch)."""
        per_step, n = self.cfg.train.prompts_per_step, len(self.prompts)
        if self.state.position + per_step > n:
            self.state.epoch, self.state.position = self.state.epoch + 1, 0
        order = np.arange(n)
        if self.cfg.train.shuffle:
            order = np.random.default_rng([self.cfg.train.seed, self.state.epoch]).permutation(n)
        picked = order[self.state.position : self.state.position + per_step]
        self.state.position += per_step
        return [self.prompts[i] for i in picked]

    # ---------------------------------------------------------------------------------------------------- rollout
    def rollout(self, records: Sequence[PromptRecord], step: int) -> list[Group]:
        """G samples per prompt (§3.2) and their rewards (§3.3)."""
        seed = call_seed(self.cfg.train.seed, step, 0)
        return sample_groups(records, self.engine, self.reward, self.tokenizer, self.cfg.rollout, seed)

    # ---------------------------------------------------------------------------------------------------- advantage
    def prepare(self, groups: Sequence[Group]) -> tuple[Prepared, dict[str, float]]:
        """GRPO advantages over each group's slots (§3.11) and mini-batches of whole groups (§3.13)."""
        samples = [s for g in groups for s in g.samples]
        gid = torch.tensor([i for i, g in enumerate(groups) for _ in g.samples], dtype=torch.long)
        valid = torch.tensor([s.score is not None for s in samples])
        scores = torch.tensor([s.score if s.score is not None else 0.0 for s in samples], dtype=torch.float32)
        adv, metrics = self.advantage_fn(
            scores, gid, valid, eps=self.cfg.train.adv_eps, norm_by_std=self.cfg.train.norm_adv_by_std
        )
        per_mb = self.cfg.train.mini_batch_prompts
        minibatches, totals = [], []
        for start in range(0, len(groups), per_mb):
            members = set(range(start, min(start + per_mb, len(groups))))
            mb = [i for i, g in enumerate(gid.tolist()) if g in members]
            minibatches.append(mb)
            n_tok = sum(len(samples[i].completion_ids) for i in mb)
            n_on = float(sum(len(samples[i].completion_ids) for i in mb if not samples[i].guided))
            totals.append((n_tok, len(mb), n_on))
        return Prepared(samples, gid, adv, minibatches, totals), metrics

    def local_share(self, prep: Prepared, groups: Sequence[int]) -> Prepared:
        """The rows of ``prep`` that belong to the global groups ``groups`` (this rank's share); mini-batch m keeps
        its global normalisers ``totals[m]``."""
        if self.dp.world == 1:
            return prep
        mine = set(groups)
        rows = [i for i, g in enumerate(prep.group_ids.tolist()) if g in mine]
        new_index = {old: new for new, old in enumerate(rows)}
        minibatches = [[new_index[i] for i in mb if i in new_index] for mb in prep.minibatches]
        return Prepared(
            [prep.samples[i] for i in rows], prep.group_ids[rows], prep.advantages[rows], minibatches, prep.totals
        )

    # ---------------------------------------------------------------------------------------------------- update
    def _micro_batches(self, idx: list[int]) -> list[list[int]]:
        """Length-bucketed micro-batches of at most ``micro_batch_size`` sequences, cut where padding is least
        (``padded_split``; results do not depend on the split, see module doc)."""
        order = sorted(idx, key=lambda i: len(self._samples[i].train_prompt_ids) + len(self._samples[i].completion_ids))
        shapes = [(len(self._samples[i].train_prompt_ids), len(self._samples[i].completion_ids)) for i in order]
        return [order[a:b] for a, b in padded_split(shapes, self.cfg.train.micro_batch_size)]

    def _logprobs(self, model, idx: list[int], grad: bool) -> tuple[torch.Tensor, object]:
        batch = pack_batch(
            [self._samples[i].train_prompt_ids for i in idx],
            [self._samples[i].completion_ids for i in idx],
            self.tokenizer.pad_token_id,
        ).to(next(self.model.parameters()).device)
        with torch.set_grad_enabled(grad):
            return sequence_logprobs(model, batch, self.cfg.train.logprob_temperature), batch

    def _no_grad_logprobs(self, model, idx: list[int]) -> dict[int, torch.Tensor]:
        """Per-sample completion log-probs (1-D), one no-grad pass (old policy or reference, §3.10)."""
        out = {}
        was_training = model.training
        model.eval()
        with torch.no_grad():
            for mb in self._micro_batches(idx):
                logp, batch = self._logprobs(model, mb, grad=False)
                for row, i in enumerate(mb):
                    out[i] = logp[row][batch.response_mask[row].bool()].clone()
        model.train(was_training)
        return out

    @staticmethod
    def _pad_like(rows: list[torch.Tensor], like: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(like)
        for r, t in enumerate(rows):
            out[r][mask[r].bool()] = t
        return out

    def update(self, prep: Prepared) -> dict[str, float]:
        """PPO-style update over mini-batches with grad accumulation, grad clipping, non-finite guard (§3.12-3.13)."""
        t = self.cfg.train
        self._samples = prep.samples
        everything = list(range(len(prep.samples)))
        single_pass = len(prep.minibatches) == 1 and t.ppo_epochs == 1
        old = None
        if not single_pass:
            with self.dp.gathered():  # FSDP: whole weights for the no-grad pass (no collective per forward)
                old = self._no_grad_logprobs(self.model, everything)
        ref = self._no_grad_logprobs(self.ref_model, everything) if self.ref_model is not None else None
        self.model.train()
        sums: dict[str, float] = {}
        updates = skipped = 0
        for _ in range(t.ppo_epochs):
            for mb, totals in zip(prep.minibatches, prep.totals, strict=True):
                stats = self._update_minibatch(mb, totals, prep, old, ref)
                for k, v in stats.items():
                    sums[k] = sums.get(k, 0.0) + v
                if stats["actor/skipped"]:
                    skipped += 1
                else:
                    updates += 1
        n = max(len(prep.minibatches) * t.ppo_epochs, 1)
        metrics = {k: v / n for k, v in sums.items() if k != "actor/skipped"}
        metrics.update({"actor/updates": float(updates), "actor/nonfinite_skipped": float(skipped)})
        return metrics

    def _update_minibatch(self, mb, totals, prep, old, ref) -> dict[str, float]:
        """One optimizer step over mini-batch ``mb`` (this rank's rows; ``totals`` = the global normalisers).
        W > 1: backward of loss·W (DDP / FSDP average over ranks); DDP syncs gradients on the last micro-batch only,
        FSDP on every one (and every rank runs as many micro-batches as the busiest, see ``pad_micro_batches``)."""
        t = self.cfg.train
        self.optimizer.zero_grad(set_to_none=True)
        n_tok, n_seq, n_on = totals
        acc = {"actor/loss": 0.0, "actor/pg_loss": 0.0, "actor/kl": 0.0, "actor/clipfrac": 0.0}
        micros = self.dp.pad_micro_batches(self._micro_batches(mb))
        for k, micro in enumerate(micros):
            with self.dp.no_sync(self.train_model, sync=k == len(micros) - 1):
                self._micro_step(micro, prep, old, ref, (n_tok, n_seq, n_on), acc)
        acc = self.dp.sum(acc)  # every rank sees the global loss: same skip / stop decision
        grad_norm = self.dp.grad_norm(self.model.parameters(), t.grad_clip)
        finite = math.isfinite(acc["actor/loss"]) and bool(torch.isfinite(grad_norm))
        if finite:
            self.optimizer.step()
            self.state.consecutive_nonfinite = 0
        else:  # skip the update, count it, stop if it keeps happening (issue 5 item 4)
            self.optimizer.zero_grad(set_to_none=True)
            self.state.consecutive_nonfinite += 1
            self.state.nonfinite_total += 1
            if self.state.consecutive_nonfinite >= t.max_nonfinite_steps:
                raise NonFiniteError(
                    f"{self.state.consecutive_nonfinite} consecutive updates had a non-finite loss or gradient "
                    f"(loss={acc['actor/loss']}, grad_norm={float(grad_norm)}); stopping without saving. "
                    "Lower train.lr or check the rewards."
                )
        return {**acc, "actor/grad_norm": float(grad_norm), "actor/skipped": float(not finite)}

    def _micro_step(self, micro, prep, old, ref, totals, acc: dict[str, float]) -> None:
        """Forward + backward of one micro-batch; adds its share of the mini-batch metrics to ``acc``."""
        t = self.cfg.train
        n_tok, n_seq, n_on = totals
        if not micro:  # FSDP padding: a forward/backward that adds zero gradient (the collectives must match)
            pad = torch.full((1, 1), self.tokenizer.pad_token_id, device=next(self.model.parameters()).device)
            (self.train_model(input_ids=pad).logits.sum() * 0.0).backward()
            return
        logp, batch = self._logprobs(self.train_model, micro, grad=True)
        mask = batch.response_mask.to(logp.dtype)
        old_logp = logp.detach() if old is None else self._pad_like([old[i] for i in micro], logp, mask)
        adv = prep.advantages[micro].to(logp.device)
        guided = torch.tensor([self._samples[i].guided for i in micro], device=logp.device)
        per_token, lm = self.loss_fn(
            logp, old_logp, adv, mask, guided,
            clip_low=t.clip_ratio_low, clip_high=t.clip_ratio_high, clip_c=t.clip_ratio_c,
            gamma=self.cfg.hindsight.shaping_gamma,
        )  # fmt: skip
        share = mask.sum().item() / n_tok if t.loss_agg == "token-mean" else len(micro) / n_seq
        pg = agg_loss(per_token, mask, t.loss_agg) * share
        loss = pg
        if ref is not None:
            kl = agg_loss(kl_k3(logp, self._pad_like([ref[i] for i in micro], logp, mask)), mask, t.loss_agg) * share
            loss = loss + t.kl_coef * kl
            acc["actor/kl"] += kl.item()
        (loss * self.dp.world).backward()  # DDP averages gradients over the W ranks
        acc["actor/loss"] += loss.item()
        acc["actor/pg_loss"] += pg.item()
        on_tok = (mask * (~guided).unsqueeze(1).to(mask.dtype)).sum().item()  # clipfrac is over on-policy tokens
        acc["actor/clipfrac"] += lm.get("actor/clipfrac", 0.0) * on_tok / max(n_on, 1.0)
        for key in ("actor/dual_clipfrac", "actor/ratio_mean", "actor/guided_token_frac"):  # token-weighted
            acc[key] = acc.get(key, 0.0) + lm.get(key, 0.0) * mask.sum().item() / n_tok

    # ---------------------------------------------------------------------------------------------------- step
    def step(self) -> dict[str, float]:
        """One training step, spec §3.15 top to bottom (W > 1: on this rank's share, see herl_core/distributed.py)."""
        step, t0 = self.state.step, time.perf_counter()
        records = self.next_prompts()
        mine = self.my_groups(len(records))
        with self.dp.gathered():  # FSDP: the whole policy on every rank while it generates
            groups = self.rollout([records[i] for i in mine], step)  # §3.2-3.3
        t_rollout = time.perf_counter()
        everyone = self.gather_groups(groups)  # the global batch (a copy when W > 1: hindsight edits `groups`)
        self.sink.log_records("rollouts", self._rollout_records(everyone, step), step)
        metrics = self._reward_metrics(everyone)
        gen_tokens = sum(len(s.completion_ids) for g in everyone for s in g.samples)
        if self.cfg.hindsight.enabled:  # §3.4-3.9
            with self.dp.gathered():
                out = hindsight_step(
                    groups, self.engine, self.reward, self.tokenizer, self.cfg.hindsight, self.cfg.rollout,
                    (self.cfg.train.seed, step), seed=call_seed(self.cfg.train.seed, step, 1), step=step,
                )  # fmt: skip
            everyone = self.gather_groups(groups)
            out = self.gather_hindsight(out, everyone, mine)
            metrics.update(out.metrics)
            gen_tokens += sum(
                len(self.tokenizer(e.rewrite, add_special_tokens=False)["input_ids"]) for e in out.experiences
            )
            self.sink.log_records("experiences", out.experiences, step)
            self.sink.log_records("merges", out.merges, step)
        t_hindsight = time.perf_counter()
        prep, adv_metrics = self.prepare(everyone)  # §3.11, on the global batch
        metrics.update(adv_metrics)
        metrics.update(self.update(self.local_share(prep, mine)))  # §3.12-3.13
        self.engine.sync_weights()  # vLLM / Ray workers sample from the updated policy (no-op for the HF engine)
        t_end = time.perf_counter()
        metrics.update(
            {
                "perf/step_s": t_end - t0,
                "perf/rollout_s": t_rollout - t0,
                "perf/hindsight_s": t_hindsight - t_rollout,
                "perf/update_s": t_end - t_hindsight,
                "perf/gen_tokens": float(gen_tokens),
                "perf/tokens_per_s": gen_tokens / max(t_end - t0, 1e-9),
            }
        )
        margin = min(v for part in self.dp.gather([self.engine.take()]) for v in part)  # all ranks' draws
        if math.isfinite(margin):  # an engine that reports margins (the HF engine)
            metrics["rollout/min_draw_margin"] = margin
        if self.dp.world > 1:  # rank 0's view: how much of the model each rank holds
            share = self.dp.param_share(self.model)
            metrics.update({"dist/world_size": float(self.dp.world), "dist/param_share": share})
        stats = getattr(self.reward, "stats", None)  # judge client: cumulative calls / retries / failures
        if isinstance(stats, dict):
            metrics.update({f"judge/{k}": float(v) for k, v in stats.items()})
        self.state.step += 1
        self.sink.log_metrics(metrics, step)
        return metrics

    # ---------------------------------------------------------------------------------------------------- data-parallel
    def my_groups(self, n: int) -> list[int]:
        """The global indices of the step's prompts this rank samples (all of them when W = 1)."""
        if self.dp.world == 1:
            return list(range(n))
        return share_indices(n, self.cfg.train.mini_batch_prompts, self.dp.rank, self.dp.world)

    def gather_groups(self, groups: list[Group]) -> list[Group]:
        """Every rank's groups in global order (``groups`` itself when W = 1)."""
        if self.dp.world == 1:
            return groups
        return interleave(self.dp.gather(groups), self.cfg.train.mini_batch_prompts)

    def gather_hindsight(self, out: HindsightOutput, everyone: list[Group], mine: list[int]) -> HindsightOutput:
        """The ranks' hindsight outputs merged in the one-process order (by global group), metrics recomputed."""
        if self.dp.world == 1:
            return out
        jobs = [replace(j, group=mine[j.group]) for j in out.jobs]  # local → global group index
        parts = self.dp.gather([(out.experiences, out.merges, jobs)])
        position = {g.record.id: i for i, g in enumerate(everyone)}
        experiences = sorted((e for p in parts for e in p[0][0]), key=lambda e: position[e.prompt_id])
        merges = sorted((m for p in parts for m in p[0][1]), key=lambda m: position[m.prompt_id])
        jobs = sorted((j for p in parts for j in p[0][2]), key=lambda j: j.group)
        return HindsightOutput(experiences, merges, hindsight_metrics(everyone, jobs, experiences, merges), jobs)

    def _reward_metrics(self, groups: Sequence[Group]) -> dict[str, float]:
        scores = [s.score for g in groups for s in g.samples if s.score is not None]
        n_all = sum(len(g.samples) for g in groups)
        return {
            "reward/mean": float(np.mean(scores)) if scores else float("nan"),
            "reward/max_group_mean": float(
                np.mean([max((x for x in g.scores if x is not None), default=0) for g in groups])
            ),
            "reward/frac_zero_std": frac_zero_std(groups),
            "reward/all_met_frac": float(np.mean([s >= 1.0 for s in scores])) if scores else 0.0,
            "reward/failed_calls": float(n_all - len(scores)),
            "rollout/response_len": float(np.mean([len(s.completion_ids) for g in groups for s in g.samples])),
            "rollout/truncated_frac": float(np.mean([not s.finished for g in groups for s in g.samples])),
        }

    @staticmethod
    def _rollout_records(groups: Sequence[Group], step: int) -> list[RolloutRecord]:
        return rollout_records(groups, step)

    # ---------------------------------------------------------------------------------------------------- state
    def save(self, root: str, keep: int = 1, extras: dict | None = None) -> str:
        """Write a checkpoint (rank 0 only; every rank waits for it; FSDP: every rank first helps gather the full
        state onto rank 0) and return its folder."""
        if extras:
            self.state.extras.update(extras)
        weights = self.dp.full_model_state(self.model)
        optim = self.dp.full_optimizer_state(self.model, self.optimizer)
        path = ""
        with self.dp.main_first() as main:
            if main:
                path = str(
                    save_checkpoint(
                        root,
                        self.model,
                        self.tokenizer,
                        self.optimizer,
                        self.state,
                        keep=keep,
                        weights=weights,
                        optimizer_state=optim,
                    )  # fmt: skip
                )
        return path

    def full_weights(self) -> dict[str, torch.Tensor] | None:
        """FSDP: the whole state dict on rank 0 (a collective); None otherwise (the model is whole)."""
        return self.dp.full_model_state(self.model)

    def resume(self, root: str) -> bool:
        """Restore the newest complete checkpoint under ``root``; False when there is none. Rank 0 first removes
        what killed saves left there (``sweep_leftovers``)."""
        if self.dp.is_main:
            sweep_leftovers(root)
        found = latest_checkpoint(root)
        if found is None:
            return False
        if self.dp.sharded:  # every rank reads the full tensors and keeps its shard
            self.dp.load_full_state(self.model, self.optimizer, read_weights(found), read_optimizer_state(found))
            self.state = restore_rng(found)
        else:
            self.state = load_checkpoint(found, self.model, self.optimizer)
        self.engine.sync_weights()
        return True

    def train(self, steps: int | None = None, on_step: Callable[[int, dict], None] | None = None) -> list[dict]:
        """Run until ``state.step == steps`` (default train.steps), checkpointing every ``save_every`` steps."""
        target = steps if steps is not None else self.cfg.train.steps
        history = []
        while self.state.step < target:
            metrics = self.step()
            history.append(metrics)
            every = self.cfg.train.save_every
            if every and self.state.step % every == 0 and self.state.step < target:
                self.save(self.cfg.train.checkpoint_dir, keep=self.cfg.train.keep_checkpoints)
            if on_step is not None:
                on_step(self.state.step, metrics)
        return history
