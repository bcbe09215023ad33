"""Mixed precision: which dtype the weights are kept in, which one the model computes in, and how the two meet.

Two settings decide it (docs/models.md, "Precision"):

* ``model.dtype`` is the **compute dtype**: the training forward and backward, the no-grad π_old / π_ref passes and
  the HF engine's generation run in it; inference-only stages (the rollout and hindsight probes, evaluate) load the
  weights in it; the trained policy folder (``train.out_dir``) is written in it; vLLM samples in it
  (``rollout.engine.vllm.dtype: auto``).
* ``train.master_dtype`` (float32 by default) is the **storage dtype** of the trainable weights and of the AdamW
  state. The resume checkpoints hold these master weights and moments, so a resume continues exactly.

When the two differ (bf16 or fp16 compute, fp32 master: veRL's and every large trainer's layout) the model's weights
stay fp32 and every forward runs under ``torch.autocast(device, compute dtype)``: matmuls and linears in the compute
dtype, reductions (softmax, norms, log-softmax of the log-probs: herl_core/logprobs.py takes them in fp32) where
autocast keeps fp32; gradients come back to the fp32 weights, AdamW updates fp32 numbers. On CPU and CUDA alike
(torch's CPU autocast runs bf16 and fp16). Why it matters: at lr 1e-6 an Adam step moves a weight by about 1e-6, and a
bf16 weight of magnitude 0.02 has a rounding step of 1.2e-4 (8 significant bits), so updating bf16 weights directly
rounds almost every step away (a norm weight near 1.0, step 7.8e-3, never moves).

fp16 compute adds a dynamic loss scale (``torch.amp.GradScaler``): the loss is multiplied by S before backward so
small gradients do not flush to zero in fp16, the gradients are divided by S before clipping, and a step whose scaled
gradients overflowed is skipped while S halves (herl_core/update.py). bf16 has fp32's exponent range and needs none.

Pure low precision (``train.master_dtype: bfloat16`` with ``model.dtype: bfloat16``: weights and AdamW state in bf16,
no autocast) is refused unless ``train.allow_low_precision_master: true`` (herl_core/config.py): it is the mode in
which small updates vanish, kept only to measure that.

FSDP (``train.parallel: fsdp``) does not use autocast: FSDP2's ``MixedPrecisionPolicy`` keeps the fp32 shards and
all-gathers them in the compute dtype for the forward and backward, reducing gradients in fp32
(herl_core/distributed.py).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
"""The dtype names of the config (``model.dtype``, ``train.master_dtype``, ``rollout.engine.vllm.dtype``)."""


def dtype_name(dtype: torch.dtype) -> str:
    """The config name of ``dtype`` ("float32", "bfloat16", "float16")."""
    for name, value in DTYPES.items():
        if value == dtype:
            return name
    raise ValueError(f"{dtype} is not one of {sorted(DTYPES)}")


@dataclass(frozen=True)
class Precision:
    """The compute dtype (``model.dtype``) and the master dtype (``train.master_dtype``) of a run (module doc)."""

    compute: torch.dtype = torch.float32
    master: torch.dtype = torch.float32
    sharded: bool = False
    """FSDP: the compute dtype comes from FSDP2's MixedPrecisionPolicy, not from autocast."""

    @classmethod
    def from_names(cls, compute: str, master: str = "float32", sharded: bool = False) -> Precision:
        return cls(DTYPES[compute], DTYPES[master], sharded)

    @classmethod
    def from_config(cls, cfg: Any, sharded: bool = False) -> Precision:
        """From a ``Config``: ``model.dtype`` and ``train.master_dtype``."""
        return cls.from_names(cfg.model.dtype, cfg.train.master_dtype, sharded)

    @property
    def mixed(self) -> bool:
        """True when the model computes in a narrower dtype than it stores its weights in."""
        return self.compute != self.master

    @property
    def uses_autocast(self) -> bool:
        """Forwards run under ``torch.autocast`` (mixed, and not sharded: FSDP casts the gathered weights itself)."""
        return self.mixed and not self.sharded

    @property
    def needs_scaler(self) -> bool:
        """fp16 compute on fp32 weights: the loss is scaled (``make_scaler``)."""
        return self.mixed and self.compute == torch.float16

    def autocast(self, device: torch.device | str | None) -> contextlib.AbstractContextManager:
        """``torch.autocast(device type, compute dtype)`` when ``uses_autocast``, else a no-op context.

        ``device``: where the model's parameters live (cpu or cuda)."""
        if not self.uses_autocast:
            return contextlib.nullcontext()
        kind = torch.device(device).type if device is not None else "cpu"
        return torch.autocast(device_type=kind, dtype=self.compute)

    def make_scaler(self, device: torch.device | str | None) -> Any | None:
        """A ``torch.amp.GradScaler`` for fp16 compute on fp32 weights, else None."""
        if not self.needs_scaler:
            return None
        kind = torch.device(device).type if device is not None else "cpu"
        return torch.amp.GradScaler(kind)


def model_device(model: Any) -> torch.device:
    """The device of ``model``'s first parameter (cpu for a model without parameters)."""
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def to_master(model: Any, master: torch.dtype) -> Any:
    """Cast ``model``'s floating-point parameters and buffers to ``master`` in place (an exact widening when the model
    was loaded in a narrower dtype); returns ``model``. Integer buffers are left alone."""
    if any(p.is_floating_point() and p.dtype != master for p in model.parameters()):
        model.to(master)
    return model


def cast_state(state: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """``state`` with its floating-point tensors cast to ``dtype`` (detached, on their device); tensors that shared
    storage (tied embeddings) still share it afterwards, so ``save_pretrained`` writes them once."""
    out, memo = {}, {}
    for name, tensor in state.items():
        if not tensor.is_floating_point() or tensor.dtype == dtype:
            out[name] = tensor.detach()
            continue
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape), tensor.stride())
        if key not in memo:
            memo[key] = tensor.detach().to(dtype)
        out[name] = memo[key]
    return out
