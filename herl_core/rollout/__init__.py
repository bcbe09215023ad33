"""Rollout engines (spec §3.2, §3.6): ``make_engine`` picks the HF engine or vLLM from ``rollout.engine.backend``,
in-process or on ``rollout.engine.workers`` Ray workers (docs/scaling.md)."""

from __future__ import annotations

from typing import Any

from herl_core.config import EngineConfig
from herl_core.rollout.base import Generation, RolloutEngine, SamplingParams

__all__ = ["Generation", "RolloutEngine", "SamplingParams", "make_engine"]


def make_engine(cfg: EngineConfig, model: Any, tokenizer: Any, seed: int = 0) -> RolloutEngine:
    """The engine of ``cfg.backend``: ``hf`` shares ``model``; ``vllm`` serves a copy of it in vLLM's processes,
    kept in step with ``model`` by ``sync_weights`` (CPU or GPU; herl_core/rollout/vllm.py).
    ``cfg.workers > 0``: a ``RayEngine`` whose workers each run that backend on a saved copy of ``model``."""
    if cfg.backend not in ("hf", "vllm"):
        raise ValueError(f"rollout.engine.backend: unknown engine {cfg.backend!r} (known: hf, vllm)")
    if cfg.workers > 0:
        from herl_core.rollout.ray_pool import RayEngine

        return RayEngine(model, tokenizer, cfg, seed=seed)
    if cfg.backend == "hf":
        from herl_core.rollout.hf import HFEngine

        return HFEngine.from_config(cfg, model, tokenizer)
    from herl_core.rollout.vllm import VLLMEngine

    return VLLMEngine.from_config(cfg, model, tokenizer, seed=seed)
