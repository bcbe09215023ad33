"""Data-parallel training through ``accelerate`` (issue 7; peers_and_conventions §3.2 rung L2).

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

``DataParallel.single()`` is the one-process case: every method is the identity and nothing imports accelerate.
Not supported yet: FSDP / ZeRO-3 (the in-process HF rollout engine would need the sharded parameters gathered on
every rank); use DDP, or ``rollout.workers`` (Ray) to move generation off the training ranks (docs/scaling.md).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from typing import Any, TypeVar

import torch

T = TypeVar("T")


def world_size_from_env() -> int:
    """The launcher's WORLD_SIZE (torchrun / accelerate launch set it); 1 when not launched distributed."""
    return int(os.environ.get("WORLD_SIZE", "1"))


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
    """The process group seen by the trainer; wraps an ``accelerate.Accelerator`` when W > 1."""

    def __init__(self, accelerator: Any | None = None):
        self.accelerator = accelerator
        self.rank = accelerator.process_index if accelerator else 0
        self.world = accelerator.num_processes if accelerator else 1

    @classmethod
    def single(cls) -> DataParallel:
        return cls(None)

    @classmethod
    def from_env(cls) -> DataParallel:
        """An Accelerator when launched with WORLD_SIZE > 1, else ``single()``."""
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
        if acc.distributed_type.name.startswith(("FSDP", "DEEPSPEED")):
            raise RuntimeError(f"{acc.distributed_type.name} is not supported by herl's trainer yet; use DDP")
        return cls(acc)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def device(self) -> torch.device | None:
        return self.accelerator.device if self.accelerator else None

    def wrap(self, model: Any) -> Any:
        """The model the training forward goes through (DDP-wrapped when W > 1; ``model`` itself otherwise)."""
        return self.accelerator.prepare_model(model) if self.accelerator else model

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

    def no_sync(self, model: Any, sync: bool) -> contextlib.AbstractContextManager:
        """Skip the gradient all-reduce of this backward unless ``sync`` (the last micro-batch of a mini-batch)."""
        if self.world == 1 or sync:
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
