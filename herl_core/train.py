"""The online HeRL training loop (spec §3.15): every step is rollout → reward → hindsight → advantage → update.

``Trainer.step()`` reads top to bottom like the spec's pseudo-code, one call per line (docs/algorithm.md §1 names
the module behind each). With ``hindsight.enabled = false`` the hindsight stage is skipped and the same code is plain
GRPO (RLVR, spec §6 baselines). The update and its departures from the authors' code are in herl_core/update.py.

``Trainer`` keeps the state (policy, optimizer, data cursor, counters), the checkpoints and the loop. Data-parallel
(``accelerate``/``torchrun``, W processes; DDP or FSDP): every ``self.dp`` call is the seam of
herl_core/distributed.py, the identity in one process; each rank samples its share of the step's prompts and the
global batch is gathered before the advantage.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Sequence

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
from herl_core.distributed import DataParallel
from herl_core.hindsight.step import HindsightOutput, hindsight_step
from herl_core.loss import get_policy_loss
from herl_core.models import load_policy
from herl_core.records import PromptRecord
from herl_core.rewards import make_reward
from herl_core.rewards.base import RewardFn
from herl_core.rollout import make_engine
from herl_core.rollout.base import DrawMeter, RolloutEngine
from herl_core.rollout.groups import call_seed, reward_metrics, rollout_records, sample_groups
from herl_core.samples import Group
from herl_core.sink import MetricsSink, NullSink
from herl_core.update import Policy, compute_advantages, update
from herl_core.validate import validate, validation_due


class Laps:
    """Wall-clock laps of a step: ``lap(name)`` → {name: seconds since the previous lap}; ``total(name)`` → {name:
    seconds since the start}."""

    def __init__(self) -> None:
        self.start = self.last = time.perf_counter()

    def lap(self, name: str) -> dict[str, float]:
        now = time.perf_counter()
        seconds, self.last = now - self.last, now
        return {name: seconds}

    def total(self, name: str) -> dict[str, float]:
        return {name: time.perf_counter() - self.start}


def generated_tokens(groups: Sequence[Group]) -> int:
    """Completion tokens of the groups' samples."""
    return sum(len(s.completion_ids) for g in groups for s in g.samples)


def rewrite_tokens(out: HindsightOutput, tokenizer) -> int:
    """Tokens of the step's hindsight rewrites (as generated, before the appended EOS)."""
    return sum(len(tokenizer(e.rewrite, add_special_tokens=False)["input_ids"]) for e in out.experiences)


class Trainer:
    """Owns the policy, optimizer, engine, reward and the run's state; ``step()`` runs one training step."""

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
        val_prompts: Sequence[PromptRecord] | None = None,
    ):
        """``fused_adamw``: one fused AdamW kernel over all parameters (CPU/CUDA); the per-tensor loop costs about
        7x more on a CPU for SmolLM2 (docs/performance.md). Same update rule; float rounding may differ.
        ``dp``: the data-parallel group (default: from the launcher's environment; one process when not launched).
        ``val_prompts``: the held-out prompts scored every ``train.eval_every`` steps (herl_core/validate.py)."""
        t = cfg.train
        self.cfg = cfg
        self.dp = dp or DataParallel.from_env(t.parallel)
        self.dp.plan_batches(t.prompts_per_step, t.mini_batch_prompts)  # fails before any work if it cannot share
        if t.threads:
            torch.set_num_threads(t.threads)
        torch.manual_seed(t.seed)
        if len(prompts) < t.prompts_per_step:
            raise ValueError(
                f"train.prompts_per_step ({t.prompts_per_step}) exceeds the {len(prompts)} training prompts"
            )
        if t.eval_every and not val_prompts:
            raise ValueError(f"train.eval_every = {t.eval_every} needs validation prompts (train.eval_set)")
        self.prompts, self.val_prompts = list(prompts), list(val_prompts or [])[: t.eval_prompts]
        if model is None or tokenizer is None:
            model, tokenizer = load_policy(cfg.model, device=self.dp.load_device)
        self.model, self.tokenizer = model, tokenizer
        if t.gradient_checkpointing:
            self.model.gradient_checkpointing_enable()
        ref_model = self._frozen_copy(model) if t.kl_coef > 0 else None  # whole on every rank
        train_model = self.dp.wrap(model)  # W > 1: DDP wrapper / FSDP shards, on the rank's device
        if ref_model is not None and self.dp.device is not None:
            ref_model.to(self.dp.device)
        params = [p for p in model.parameters() if p.requires_grad]
        fused = fused_adamw and all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
        optimizer = torch.optim.AdamW(params, lr=t.lr, betas=t.betas, weight_decay=t.weight_decay, fused=fused)
        self.policy = Policy(
            model, train_model, optimizer, get_policy_loss(t.policy_loss), ref_model, tokenizer.pad_token_id
        )
        self.engine = DrawMeter(
            engine if engine is not None else make_engine(cfg.rollout.engine, model, tokenizer, seed=t.seed)
        )
        self.reward = reward if reward is not None else make_reward(cfg.reward)
        # validation scores with its own reward instance, so a judge client's counters (judge/*) count training only
        self.val_reward = make_reward(cfg.reward) if t.eval_every and reward is None else self.reward
        self.sink = sink or NullSink()
        self.state = TrainerState()
        self.advantage_fn = get_advantage(t.advantage)

    @staticmethod
    def _frozen_copy(model):
        ref = copy.deepcopy(model).eval()
        for p in ref.parameters():
            p.requires_grad_(False)
        return ref

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self.policy.optimizer

    @property
    def ref_model(self):
        return self.policy.ref_model

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

    # ---------------------------------------------------------------------------------------------------- step
    def step(self) -> dict[str, float]:
        """One training step, spec §3.15 top to bottom (docs/algorithm.md §1)."""
        cfg, dp, step = self.cfg, self.dp, self.state.step
        seed, engine, reward, tok = cfg.train.seed, self.engine, self.reward, self.tokenizer
        metrics = self.validation(step)  # val/*, every train.eval_every steps: the policy before this step's update
        laps = Laps()
        records = dp.share(self.next_prompts())  # this rank's prompts (all of them in one process)
        with dp.gathered():  # FSDP: the whole policy on every rank while it generates
            groups = sample_groups(records, engine, reward, tok, cfg.rollout, call_seed(seed, step, 0))  # §3.2-3.3
        metrics |= laps.lap("perf/rollout_s")
        everyone = dp.gather_groups(groups)  # the step's global batch
        metrics |= reward_metrics(everyone)
        self.sink.log_records("rollouts", rollout_records(everyone, step), step)
        gen_tokens = generated_tokens(everyone)
        if cfg.hindsight.enabled:  # §3.4-3.9; off: plain GRPO
            with dp.gathered():
                out = hindsight_step(
                    groups, engine, reward, tok, cfg.hindsight, cfg.rollout, (seed, step),
                    seed=call_seed(seed, step, 1), step=step,
                )  # fmt: skip
            everyone, out = dp.gather_hindsight(groups, out)  # the global batch, edited
            metrics |= self.log_hindsight(out, step)
            gen_tokens += rewrite_tokens(out, tok)
        metrics |= laps.lap("perf/hindsight_s")
        batch, adv_metrics = compute_advantages(everyone, self.advantage_fn, cfg.train)  # §3.11, on the global batch
        metrics |= adv_metrics
        metrics |= update(self.policy, dp.share_batch(batch), cfg.train, cfg.hindsight.shaping_gamma, dp, self.state)
        engine.sync_weights()  # vLLM / Ray workers sample from the updated policy (no-op for the HF engine)
        metrics |= laps.lap("perf/update_s")
        metrics |= self.run_metrics(laps.total("perf/step_s"), gen_tokens)
        self.state.step += 1
        self.sink.log_metrics(metrics, step)
        return metrics

    def log_hindsight(self, out: HindsightOutput, step: int) -> dict[str, float]:
        """Log the step's experiences and merges to the sink; returns the ``herl/*`` metrics."""
        self.sink.log_records("experiences", out.experiences, step)
        self.sink.log_records("merges", out.merges, step)
        return out.metrics

    def run_metrics(self, step_s: dict[str, float], gen_tokens: int) -> dict[str, float]:
        """perf/* totals, the smallest draw margin of every rank (``rollout/min_draw_margin``, engines that report
        margins), ``dist/*`` under data parallelism and the judge client's cumulative ``judge/*`` counters."""
        seconds = step_s["perf/step_s"]
        out = {**step_s, "perf/gen_tokens": float(gen_tokens), "perf/tokens_per_s": gen_tokens / max(seconds, 1e-9)}
        margin = self.dp.min(self.engine.take())
        if math.isfinite(margin):
            out["rollout/min_draw_margin"] = margin
        out |= self.dp.metrics(self.model)
        stats = getattr(self.reward, "stats", None)
        if isinstance(stats, dict):
            out |= {f"judge/{k}": float(v) for k, v in stats.items()}
        return out

    def validation(self, step: int) -> dict[str, float]:
        """``val/*`` of the current policy on the held-out prompts when step ``step`` is a validation point
        (``validation_due``), else {}. Samples through the unmetered engine with its own seeds: the training
        samples, their RNG streams and ``rollout/min_draw_margin`` are untouched."""
        if not validation_due(step, self.cfg.train):
            return {}
        with self.dp.gathered():
            return validate(self.val_prompts, self.engine.engine, self.val_reward, self.tokenizer, self.cfg, self.dp)

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

    # ---------------------------------------------------------------------------------------------------- loop
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
