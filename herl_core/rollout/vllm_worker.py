"""The worker side of herl's in-place vLLM weight sync (``herl_core.rollout.vllm``, module doc "Weight sync").

vLLM builds every worker process with ``WeightSyncExtension`` mixed into its worker class when the engine is created
with ``worker_extension_cls="herl_core.rollout.vllm_worker.WeightSyncExtension"``; the trainer then calls
``llm.collective_rpc("herl_load_shared_weights", args=(path, layout))`` on all workers. That call carries only the
layout (names, dtypes, shapes, byte offsets); the tensors themselves are read from a shared-memory file that the
trainer filled (``SharedWeights``), mapped here once and reused on every sync.

This module is imported inside vLLM's worker processes: it imports torch and nothing from herl that would pull
transformers or peft in.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

ALIGN = 64
"""Byte alignment of every tensor in the shared buffer (a cache line; any dtype's alignment divides it)."""

Layout = list[tuple[str, str, list[int], int]]
"""(name, dtype name without ``torch.``, shape, byte offset) per tensor, in loading order."""


def layout_for(specs: list[tuple[str, torch.dtype, tuple[int, ...]]]) -> tuple[Layout, int]:
    """Byte offsets of ``specs`` packed one after another, each aligned to ``ALIGN``; returns (layout, total bytes)."""
    layout, offset = [], 0
    for name, dtype, shape in specs:
        layout.append((name, str(dtype).removeprefix("torch."), list(shape), offset))
        nbytes = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
        offset += -(-nbytes // ALIGN) * ALIGN
    return layout, max(offset, ALIGN)


def map_shared(path: str, size: int) -> torch.Tensor:
    """The file at ``path`` as a (size,) uint8 tensor mapped MAP_SHARED: writes are seen by every process mapping it."""
    return torch.from_file(path, shared=True, size=size, dtype=torch.uint8)


def views(buffer: torch.Tensor, layout: Layout) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor view into ``buffer``) for every entry of ``layout``."""
    for name, dtype_name, shape, offset in layout:
        dtype = getattr(torch, dtype_name)
        numel = torch.Size(shape).numel()
        nbytes = numel * torch.empty((), dtype=dtype).element_size()
        yield name, buffer[offset : offset + nbytes].view(dtype).view(shape)


class WeightSyncExtension:
    """Mixed into vLLM's worker class (``worker_extension_cls``): methods callable through ``LLM.collective_rpc``."""

    def herl_load_shared_weights(self: Any, path: str, size: int, layout: Layout) -> int:
        """Load the weights in the shared file ``path`` into this worker's model, in place.

        Uses the worker's ``reload_weights`` (vLLM's in-place reload: each layer's weights go through the model's own
        ``load_weights``, i.e. the checkpoint-name mapping, tensor-parallel sharding and the backend's
        post-load processing), so the buffer holds plain Hugging Face names and layouts. The mapping of ``path`` is
        kept on the worker: the trainer may unlink the file after the first sync and keep writing through its own
        mapping. Returns the number of tensors loaded.
        """
        cached = getattr(self, "_herl_shared", None)
        if cached is None or cached[0] != path:
            cached = (path, map_shared(path, size))
            self._herl_shared = cached
        self.reload_weights(weights_iterator=views(cached[1], layout), is_checkpoint_format=True)
        repack_kept_weights(self.model_runner.get_model())
        return len(layout)


def repack_kept_weights(model: torch.nn.Module) -> int:
    """Re-run the post-load processing of every layer that keeps its weight beside a packed copy; returns how many.

    vLLM's CPU backend packs each layer's weight for its GEMM kernels after loading (``cpu_linear``, a closure over
    the packed copy). Linear layers drop the plain weight (``numel() == 0``) and are re-packed by the reload itself.
    Embedding-shaped layers keep the plain weight (``remove_weight=False``), and a tied LM head receives no tensor of
    its own in a reload (vLLM 0.32 skips ``lm_head.*`` when the embeddings are tied), so its packed copy would keep
    the old embedding and the logits would come from stale weights. Re-packing from the current weight fixes that; on
    a GPU no layer has ``cpu_linear`` and nothing is done.
    """
    done = 0
    for module in model.modules():
        method, weight = getattr(module, "quant_method", None), getattr(module, "weight", None)
        if hasattr(module, "cpu_linear") and isinstance(weight, torch.Tensor) and weight.numel() and method is not None:
            method.process_weights_after_loading(module)
            done += 1
    return done
