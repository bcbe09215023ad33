"""Data-parallel training through ``accelerate``, and the one seam the training step goes through for it.

The train stage runs unchanged under ``accelerate launch --config_file configs/accelerate/ddp.yaml -m flows.cli
train`` (NCCL on GPUs; with ``ACCELERATE_USE_CPU=true`` the same command runs W CPU processes on gloo, which is how
it is tested). With W processes, every step:

1. every rank draws the same global prompt batch (seeded permutation) and takes its share of each mini-batch: with
   M = ``train.mini_batch_prompts``, rank r samples prompts [m·M + r·M/W, m·M + (r+1)·M/W) of mini-batch m, so a
   group never straddles ranks and rank r's groups of mini-batch m are its local mini-batch m;
2. it samples, scores and runs the hindsight step on its own groups. A prompt's samples and its group's hindsight
   outcome depend only on (seed, prompt id, sample index) (herl_core/rollout/hf.py, hindsight/step.py), so they are
   the groups a single process would have produced;
3. the groups are gathered (``all_gather_object``) in global order: advantages, metrics and logs are computed on the
   global batch, exactly as in one process;
4. the update: each rank back-propagates its micro-batches with its loss divided by the GLOBAL mini-batch token count
   and multiplied by W (DDP averages gradients over ranks, so the sum of the ranks' gradients is the one-process
   token-mean gradient); gradients synchronise only on each rank's last micro-batch (``no_sync`` before). Loss
   metrics are all-reduced (summed) so every rank takes the same skip / stop decision on non-finite values;
5. only rank 0 writes checkpoints, reports and tracking (``is_main``); the others wait at a barrier.

``DataParallel`` is the seam: the training step (herl_core/train.py) and the update (herl_core/update.py) call it at
each of these points — ``share`` (this rank's prompts), ``gather_groups`` / ``gather_hindsight`` (the global batch
before the advantage), ``share_batch`` (this rank's rows before the update), ``accumulate`` and ``backward`` (the
gradient-sync hooks), ``gathered`` (FSDP's whole weights while generating), ``sum`` / ``min`` / ``whole`` (metrics
and norms over ranks) — and never ask how many processes there are. ``DataParallel.single()`` is the one-process
case: every one of these is the identity, and nothing imports accelerate. This module is the only place that tests
the number of processes.

FSDP (``train.parallel: fsdp``, or an accelerate config with ``distributed_type: FSDP``): the same steps, with the
model sharded by torch's FSDP2 (``fully_shard`` on every decoder layer, then on the root), so each rank holds 1/W of
the parameters, gradients and AdamW moments — the training state that does not fit one device. Differences from DDP:

* generation and the no-grad π_old / reference passes run inside ``gathered()``: every shard is all-gathered
  once and kept until the block ends (reshard-after-forward off), so the HF engine's many decode forwards and the
  ranks' different generation lengths need no collectives — the full weights must fit one device, their gradients
  and optimizer state need not (veRL's HF rollout does the same);
* every micro-batch reduce-scatters its gradients (FSDP2 averages over ranks, so loss·W gives the sum as in DDP);
  the ranks run the same number of micro-batches — a rank with fewer runs zero-weighted ones
  (``accumulate``), since each forward/backward is a collective;
* checkpoints and the final policy are written from full state dicts gathered onto rank 0
  (``full_model_state``, ``full_optimizer_state``), in the one-process layout (optimizer keyed by parameter index),
  so a checkpoint resumes under 1 process, DDP or FSDP alike; resume loads each rank's shard from the full tensors
  (``load_full_state``).

Not supported with FSDP (refused by the config): LoRA, vLLM and Ray rollout workers (they would need the gathered
weights saved or sent every step), DeepSpeed. The HF engine's generation is the place to swap in vLLM with tensor
parallelism when the weights themselves do not fit one device (docs/scaling.md).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from typing import Any, TypeVar

import torch

from herl_core.hindsight.step import HindsightOutput, hindsight_metrics
from herl_core.samples import Group

T = TypeVar("T")
B = TypeVar("B")


def world_size_from_env() -> int:
    """The launcher's WORLD_SIZE (torchrun / accelerate launch set it); 1 when not launched distributed."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def trainable_names(model: Any) -> list[str]:
    """Names of the parameters the optimizer holds, in its order (``Trainer`` builds AdamW from
    ``[p for p in model.parameters() if p.requires_grad]``; shared parameters are listed once)."""
    return [name for name, p in model.named_parameters() if p.requires_grad]


def is_main_process() -> bool:
    """True on rank 0 or when not launched distributed (read from the launcher's RANK variable)."""
    return int(os.environ.get("RANK", "0")) == 0


def share_indices(n_items: int, per_minibatch: int, rank: int, world: int) -> list[int]:
    """The global indices rank ``rank`` of ``world`` owns: for each mini-batch [m·M, (m+1)·M) of M = per_minibatch,
    the slice [m·M + r·M/W, m·M + (r+1)·M/W). Requires M % W == 0 and n_items % M == 0."""
    if per_minibatch % world or n_items % per_minibatch:
        raise ValueError(
            f"data-parallel training with {world} processes needs train.mini_batch_prompts ({per_minibatch}) "
            f"divisible by {world} and train.prompts_per_step ({n_items}) divisible by train.mini_batch_prompts"
        )
    k = per_minibatch // world
    return [m + rank * k + i for m in range(0, n_items, per_minibatch) for i in range(k)]


def interleave(per_rank: Sequence[Sequence[T]], per_minibatch: int) -> list[T]:
    """Inverse of ``share_indices``: the ranks' lists (each in its own order) → the global order."""
    world = len(per_rank)
    k = per_minibatch // world
    n_mb = len(per_rank[0]) // k if k else 0
    return [item for m in range(n_mb) for part in per_rank for item in part[m * k : (m + 1) * k]]


class DataParallel:
    """The process group seen by the trainer; wraps an ``accelerate.Accelerator`` when W > 1.
    ``strategy``: "ddp" (replicated model, gradients all-reduced) or "fsdp" (FSDP2-sharded; see module doc)."""

    def __init__(self, accelerator: Any | None = None, strategy: str = "ddp"):
        if strategy not in ("ddp", "fsdp"):
            raise ValueError(f"unknown data-parallel strategy {strategy!r} (expected 'ddp' or 'fsdp')")
        self.accelerator = accelerator
        self.rank = accelerator.process_index if accelerator else 0
        self.world = accelerator.num_processes if accelerator else 1
        self.strategy = strategy
        self._model: Any = None  # the FSDP root, once wrapped
        self._per_minibatch = 1  # prompts per mini-batch (plan_batches)

    @classmethod
    def single(cls) -> DataParallel:
        return cls(None)

    @property
    def sharded(self) -> bool:
        """True when the model is FSDP-sharded over more than one process."""
        return self.world > 1 and self.strategy == "fsdp"

    @classmethod
    def from_env(cls, strategy: str = "ddp") -> DataParallel:
        """An Accelerator when launched with WORLD_SIZE > 1, else ``single()``. An accelerate config with
        ``distributed_type: FSDP`` selects ``strategy="fsdp"`` whatever ``strategy`` says."""
        if world_size_from_env() <= 1:
            return cls.single()
        from accelerate import Accelerator
        from accelerate.utils import DistributedDataParallelKwargs, DistributedType

        # buffers (rotary frequencies) are constants: no broadcast in forward, which would be a collective that
        # ranks with different micro-batch counts call a different number of times
        acc = Accelerator(kwargs_handlers=[DistributedDataParallelKwargs(broadcast_buffers=False)])
        if acc.distributed_type == DistributedType.NO:
            raise RuntimeError(
                f"WORLD_SIZE={world_size_from_env()} but accelerate found no distributed backend (no GPU?): launch "
                "with `accelerate launch --config_file configs/accelerate/ddp.yaml -m flows.cli train ...`, and on "
                "CPUs set ACCELERATE_USE_CPU=true (gloo)"
            )
        if acc.distributed_type.name.startswith("DEEPSPEED"):
            raise RuntimeError("DeepSpeed is not supported by herl's trainer; use DDP or FSDP (train.parallel: fsdp)")
        if acc.distributed_type.name.startswith("FSDP"):
            strategy = "fsdp"  # herl shards with FSDP2 itself (module doc); the plugin's other options do not apply
        return cls(acc, strategy)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def device(self) -> torch.device | None:
        return self.accelerator.device if self.accelerator else None

    def wrap(self, model: Any) -> Any:
        """The model the training forward goes through: DDP-wrapped (W > 1, ddp), sharded in place (W > 1, fsdp:
        the same object, its parameters now 1/W DTensor shards), ``model`` itself otherwise."""
        if not self.accelerator:
            return model
        if not self.sharded:
            return self.accelerator.prepare_model(model)
        from torch.distributed.fsdp import fully_shard

        model.to(self.device)
        blocks = set(getattr(model, "_no_split_modules", None) or ())  # HF's transformer-block classes
        for module in model.modules():
            if type(module).__name__ in blocks:
                fully_shard(module)
        fully_shard(model)
        self._model = model
        return model

    @contextlib.contextmanager
    def gathered(self) -> Iterator[None]:
        """FSDP: the full parameters on every rank for the block (one all-gather; no collective inside, so ranks may
        run different numbers of forwards); resharded afterwards. A no-op unless sharded."""
        if not self.sharded or self._model is None:
            yield
            return
        from torch.distributed.fsdp import FSDPModule

        units = [m for m in self._model.modules() if isinstance(m, FSDPModule)]
        for unit in units:
            unit.set_reshard_after_forward(False, recurse=False)
            unit.unshard()
        try:
            yield
        finally:
            for unit in units:
                unit.reshard()
                # FSDP2's defaults: blocks reshard after forward, the root does not (backward needs it at once)
                unit.set_reshard_after_forward(unit is not self._model, recurse=False)

    def metrics(self, model: Any) -> dict[str, float]:
        """``dist/world_size`` and ``dist/param_share`` (the fraction of the parameters' elements this rank stores:
        1.0 replicated, about 1/W under FSDP); none in one process."""
        if self.world == 1:
            return {}
        local = sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in model.parameters())
        share = local / max(sum(p.numel() for p in model.parameters()), 1)
        return {"dist/world_size": float(self.world), "dist/param_share": share}

    @property
    def load_device(self) -> str | None:
        """Where a rank loads the policy: the CPU under W > 1 (``wrap`` moves each rank's copy to its own device,
        not all onto cuda:0); None (the model's own choice) in one process."""
        return "cpu" if self.world > 1 else None

    # ------------------------------------------------------------------------------------------------ the step's seam
    def plan_batches(self, prompts_per_step: int, mini_batch_prompts: int) -> None:
        """Fix how each step's prompts are shared (module doc, 1.); fails before any work when W ranks cannot share
        mini-batches of ``mini_batch_prompts`` prompts."""
        self._per_minibatch = mini_batch_prompts
        if self.world > 1:
            share_indices(prompts_per_step, mini_batch_prompts, 0, self.world)

    def _mine(self, n: int) -> list[int]:
        """The global indices of this rank's share of ``n`` step items (all of them in one process)."""
        if self.world == 1:
            return list(range(n))
        return share_indices(n, self._per_minibatch, self.rank, self.world)

    def share(self, items: Sequence[T]) -> list[T]:
        """This rank's share of the step's prompts (``share_indices``; all of them in one process)."""
        return [items[i] for i in self._mine(len(items))]

    def gather_groups(self, groups: list[Group]) -> list[Group]:
        """Every rank's groups in global order, on every rank (``groups`` itself in one process; a copy otherwise,
        so the hindsight step's in-place edits of ``groups`` are gathered again by ``gather_hindsight``)."""
        if self.world == 1:
            return groups
        return interleave(self.gather(groups), self._per_minibatch)

    def gather_hindsight(self, groups: list[Group], out: HindsightOutput) -> tuple[list[Group], HindsightOutput]:
        """The global batch after the hindsight step edited this rank's ``groups``, and the ranks' hindsight outputs
        merged in the one-process order (by global group), metrics recomputed on the global batch. In one process:
        ``(groups, out)``."""
        if self.world == 1:
            return groups, out
        everyone = self.gather_groups(groups)
        mine = self._mine(len(everyone))
        jobs = [replace(j, group=mine[j.group]) for j in out.jobs]  # local → global group index
        parts = self.gather([(out.experiences, out.merges, jobs)])
        position = {g.record.id: i for i, g in enumerate(everyone)}
        experiences = sorted((e for p in parts for e in p[0][0]), key=lambda e: position[e.prompt_id])
        merges = sorted((m for p in parts for m in p[0][1]), key=lambda m: position[m.prompt_id])
        jobs = sorted((j for p in parts for j in p[0][2]), key=lambda j: j.group)
        return everyone, HindsightOutput(
            experiences, merges, hindsight_metrics(everyone, jobs, experiences, merges), jobs
        )

    def share_batch(self, batch: B) -> B:
        """This rank's rows of the global training batch (``batch.select`` of its groups; mini-batch m keeps its
        global normalisers), ``batch`` itself in one process."""
        if self.world == 1:
            return batch
        return batch.select(self._mine(batch.n_groups))

    def accumulate(self, model: Any, micros: list[list[int]], pad_token_id: int) -> Iterator[list[int]]:
        """The micro-batches of one optimizer step, each yielded inside its gradient-sync context: DDP all-reduces on
        the last one only (``no_sync`` before it); FSDP reduce-scatters on every one, and a rank with fewer
        micro-batches than the busiest then runs zero-weighted forward/backward passes (each is a collective, so the
        ranks must run the same number). In one process: ``micros`` as they are."""
        if self.world == 1:
            yield from micros
            return
        padding = 0
        if self.sharded:  # agreed before any forward: the all-reduce must not interleave with FSDP's collectives
            most = torch.tensor([len(micros)], dtype=torch.int64)
            torch.distributed.all_reduce(most, op=torch.distributed.ReduceOp.MAX)
            padding = int(most.item()) - len(micros)
        for k, micro in enumerate(micros):
            with self.no_sync(model, sync=k == len(micros) - 1):
                yield micro
        pad = torch.full((1, 1), pad_token_id, device=next(model.parameters()).device)
        for _ in range(padding):
            (model(input_ids=pad).logits.sum() * 0.0).backward()

    def backward(self, loss: torch.Tensor) -> None:
        """Back-propagate ``loss`` (this rank's share of a global token-mean) times W: DDP and FSDP average the
        gradients over the W ranks, so the result is the one-process gradient (module doc, 4.)."""
        (loss * self.world).backward()

    @staticmethod
    def whole(value: Any) -> Any:
        """A tensor computed over sharded (DTensor) parameters, as a plain tensor with every shard's contribution
        (FSDP: the gradient norm); ``value`` itself otherwise."""
        return value.full_tensor() if hasattr(value, "full_tensor") else value

    # ------------------------------------------------------------------------------------------------ FSDP state
    def full_model_state(self, model: Any) -> dict[str, torch.Tensor] | None:
        """FSDP: the full (unsharded) state dict on rank 0's CPU, {} on the others (a collective: every rank calls
        it). None when not sharded: the model's own ``state_dict`` is whole."""
        if not self.sharded:
            return None
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        whole = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        # a tied parameter (lm_head = embed_tokens) comes back twice as separate copies: keep its first name only,
        # as save_pretrained does for a live model
        tied = {n for n, _ in model.named_parameters(remove_duplicate=False)} - {n for n, _ in model.named_parameters()}
        return {k: v for k, v in whole.items() if k not in tied}

    def full_optimizer_state(self, model: Any, optimizer: Any) -> dict[str, Any] | None:
        """FSDP: the full optimizer state dict on rank 0 in the one-process layout (``state`` keyed by the index of
        the parameter in ``trainable_names``); {} on the others; None when not sharded (a collective)."""
        if not self.sharded:
            return None
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        full = get_optimizer_state_dict(
            model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )
        if not full:
            return {}
        index = {name: i for i, name in enumerate(trainable_names(model))}
        groups = [{**g, "params": [index[n] for n in g["params"] if n in index]} for g in full["param_groups"]]
        return {"state": {index[n]: v for n, v in full["state"].items() if n in index}, "param_groups": groups}

    def load_full_state(self, model: Any, optimizer: Any, weights: dict[str, torch.Tensor], optim: dict) -> None:
        """FSDP: load full weights and a one-process-layout optimizer state (as ``full_optimizer_state`` returns,
        read on every rank) into the sharded model and its optimizer: each rank keeps its shard."""
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        full = StateDictOptions(full_state_dict=True, strict=False)  # tied weights may be absent from the file
        result = set_model_state_dict(model, weights, options=full)
        tied = {"lm_head.weight"} if getattr(getattr(model, "config", None), "tie_word_embeddings", False) else set()
        if result.unexpected_keys or set(result.missing_keys) - tied:
            raise ValueError(
                f"checkpoint does not match the model (missing {result.missing_keys}, "
                f"unexpected {result.unexpected_keys})"
            )
        names = trainable_names(model)
        by_name = {
            "state": {names[int(i)]: value for i, value in optim["state"].items()},
            "param_groups": [{**g, "params": [names[int(i)] for i in g["params"]]} for g in optim["param_groups"]],
        }
        set_optimizer_state_dict(model, optimizer, by_name, options=StateDictOptions(full_state_dict=True))

    def gather(self, items: list[T]) -> list[list[T]]:
        """Every rank's list, in rank order (``all_gather_object``; pickled, so keep them small)."""
        if self.world == 1:
            return [items]
        out: list[Any] = [None] * self.world
        torch.distributed.all_gather_object(out, items)
        return out

    def sum(self, values: dict[str, float]) -> dict[str, float]:
        """Element-wise sum of a float dict over ranks (same keys on every rank)."""
        if self.world == 1:
            return values
        keys = sorted(values)
        t = torch.tensor([values[k] for k in keys], dtype=torch.float64)
        torch.distributed.all_reduce(t)
        return dict(zip(keys, t.tolist(), strict=True))

    def map(self, fn: Callable[[list[T]], list[Any]], items: Sequence[T]) -> list[Any]:
        """``fn`` (one result per item) over a round-robin share of ``items`` on each rank (``items[rank::W]``), the
        results gathered on every rank in the order of ``items``: ``fn(items)`` in one process."""
        if self.world == 1:
            return fn(list(items))
        out: list[Any] = [None] * len(items)
        for rank, part in enumerate(self.gather(fn(list(items[self.rank :: self.world])))):
            out[rank :: self.world] = part
        return out

    def min(self, value: float) -> float:
        """The smallest ``value`` over ranks."""
        return min(v for part in self.gather([value]) for v in part)

    def no_sync(self, model: Any, sync: bool) -> contextlib.AbstractContextManager:
        """DDP: skip the gradient all-reduce of this backward unless ``sync`` (the last micro-batch of a mini-batch)."""
        if self.world == 1 or sync or self.sharded:  # FSDP reduce-scatters every micro-batch (module doc)
            return contextlib.nullcontext()
        return model.no_sync()

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()

    @contextlib.contextmanager
    def main_first(self) -> Iterator[bool]:
        """Run the block's writes on rank 0 while the others wait; yields ``is_main``."""
        try:
            yield self.is_main
        finally:
            self.barrier()
