"""Packed linear weights for CPU decoding (docs/performance.md).

At decode shapes (one new token per row, so a (batch × d_in) activation against a (d_out × d_in) weight) the plain
``nn.Linear`` path (MKL sgemm) repacks the weight on every call. oneDNN's linear takes the weight reordered once into
its own blocked layout and runs faster at these shapes: on the benchmark machine (2 vCPUs, AVX2), at batch 64,
166 / 165 / 147 GFLOP/s against 130 / 139 / 81 for ``torch.mm`` for SmolLM2's MLP-up / MLP-down / 49k-row LM head
(docs/performance.md §1).

``packed_linears(model)`` reorders the weight of every fp32 CPU ``nn.Linear`` of ``model`` once and routes the
module's forward through oneDNN for the duration of the block; leaving the block restores the plain forward and
frees the packed copies. Values equal ``F.linear``'s up to float rounding (another summation order). The block is
for inference only (no autograd through the packed op): the engine enters it inside ``torch.inference_mode``.

The weights are reordered at every entry, not cached: the training step changes them between rollouts, and a cached
copy would hold another model's worth of memory through the update. The reorder costs about 0.1 s per 28 M
parameters (SmolLM2's LM head), small against a rollout call. Leaving the block frees the copies and hands the freed
heap back to the OS (``herl_core.memory.trim_heap``): the copies are a few MB each, below glibc's mmap threshold
once it has grown, and without the trim about 0.1 GB of them stayed resident.

Where oneDNN's op is missing (a torch build without it, a non-x86 CPU where the op is absent) or the weight is not a
plain fp32 CPU tensor (quantised, GPU, meta), the module keeps its own forward. A module whose ``forward`` is
already replaced on the instance (accelerate's hooks do that) is left alone too.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from herl_core.memory import trim_heap


def available() -> bool:
    """Whether this torch has oneDNN's packed linear (``torch.ops.mkldnn._linear_pointwise``) on this CPU."""
    try:
        return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    except (AttributeError, RuntimeError):
        return False


def _packable(module: nn.Module) -> bool:
    w = getattr(module, "weight", None)
    return (
        isinstance(module, nn.Linear)
        and "forward" not in vars(module)
        and isinstance(w, torch.Tensor)
        and w.device.type == "cpu"
        and w.dtype == torch.float32
        and w.layout == torch.strided
        and (module.bias is None or module.bias.dtype == torch.float32)
    )


def _packed_forward(weight: torch.Tensor, bias: torch.Tensor | None) -> Any:
    packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach())

    def forward(x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.float32 or x.device.type != "cpu":
            return nn.functional.linear(x, weight, bias)
        return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")

    return forward


@contextlib.contextmanager
def packed_linears(model: nn.Module, enabled: bool = True) -> Iterator[int]:
    """Run ``model``'s fp32 CPU linears through oneDNN with packed weights inside the block (module doc).

    Yields how many modules were switched (0 when ``enabled`` is false, oneDNN is unavailable, or none qualifies).
    """
    switched: list[nn.Module] = []
    try:
        if enabled and available():
            for module in model.modules():
                if _packable(module):
                    module.forward = _packed_forward(module.weight, module.bias)
                    switched.append(module)
        yield len(switched)
    finally:
        for module in switched:
            del module.forward
        if switched:
            trim_heap()
