"""Rollout on a pool of Ray workers, each holding a copy of the policy (spec §3.2 rollout, §3.6 guided generation;
rollouts scale out by fanning prompts to workers). Built on Ray's core API (actors), not prefect-ray.

``RayEngine`` implements the ``RolloutEngine`` protocol. ``generate(prompts, n, sampling)`` cuts the prompts into
contiguous shards, one per worker (sizes differ by at most one), sends each shard with its slice of
``sampling.keys``, and concatenates the workers' prompt-major results in shard order: the same layout as one
in-process engine. Each worker runs an ``HFEngine`` (or a ``VLLMEngine`` when ``rollout.engine.backend == "vllm"``),
whose samples depend only on (seed, the prompt's key, the sample index) and not on batch mates, batch size or process
(``herl_core.rollout.hf`` module doc). So that the pool returns exactly what one in-process engine returns for the
same call: missing keys become the prompts' *global* positions (not their positions inside a shard), and a missing
seed is drawn once here, from torch's global RNG as ``HFEngine`` does, and sent to every worker.

Weight sync, the method chosen (as in ``herl_core.rollout.vllm``): weights reach the workers by path, never as
pickled tensors. On construction and on every ``sync_weights()`` the live policy is saved with
``save_checkpoint_weights`` to a new versioned folder ``<weights_dir>/v<k>`` (safetensors + tokenizer), every worker
rebuilds its engine from ``load_policy`` on that folder, the driver waits for all of them, and only then deletes the
previous version's folder. ``rollout.engine.weights_dir`` must be storage every node can read when the cluster has
more than one node; None = a temporary folder, removed by ``shutdown()`` (or at exit). Cost: one save per sync plus
one load per worker (a few seconds for SmolLM2-135M); NCCL or object-store transfer would be faster but ties the
workers to the trainer's process layout. With vLLM the worker keeps its ``VLLMEngine`` and loads each new version into
it in place (``VLLMEngine.sync_weights``, through shared memory on the worker's node), so vLLM starts once per worker.

Ray is imported lazily: herl_core imports without it; building a ``RayEngine`` without it raises ImportError with the
install hint. ``rollout.engine.ray_address`` joins an existing cluster (the workers must be able to import herl there);
None starts a local one sized for the workers, unless Ray is already initialised in this process.
"""

from __future__ import annotations

import dataclasses
import gc
import math
import shutil
import tempfile
import weakref
from pathlib import Path
from typing import Any

import torch

from herl_core.config import EngineConfig
from herl_core.rollout.base import Generation, SamplingParams

INSTALL_HINT = (
    "rollout.engine.workers > 0 needs Ray: `pip install ray==2.60.0` (part of herl's requirements.txt), "
    "or set rollout.engine.workers: 0 to roll out in-process."
)


def _import_ray() -> Any:
    try:
        import ray
    except ImportError as exc:
        raise ImportError(INSTALL_HINT) from exc
    return ray


def shard_sizes(total: int, parts: int) -> list[int]:
    """Contiguous near-equal shard sizes: the first ``total % parts`` shards get one more (7, 3 -> [3, 2, 2])."""
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


def dtype_name(model: Any) -> str:
    """The ``ModelConfig.dtype`` string of ``model``'s parameters ("float32", "bfloat16", "float16")."""
    from herl_core.precision import dtype_name as name_of

    dtype = next(model.parameters()).dtype
    try:
        return name_of(dtype)
    except ValueError as exc:
        raise ValueError(f"RayEngine: policy {exc}") from exc


class RolloutWorker:
    """One Ray actor's state: an in-process engine over the policy loaded from the latest weights folder."""

    def __init__(self, cfg: EngineConfig, seed: int, threads: int) -> None:
        torch.set_num_threads(threads)
        self.cfg, self.seed, self.engine = cfg, seed, None

    def load(self, folder: str, dtype: str) -> str:
        """Drop the current engine, then build one from the checkpoint in ``folder``. Returns ``folder``."""
        from herl_core.config import ModelConfig
        from herl_core.models import load_policy

        vllm = self.cfg.backend == "vllm"
        if not (vllm and self.engine is not None):
            self.engine = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        device = "cuda" if self.cfg.worker_gpus > 0 and torch.cuda.is_available() and not vllm else "cpu"
        model, tok = load_policy(ModelConfig(name_or_path=folder, dtype=dtype), device=device)
        if vllm and self.engine is not None:  # the running vLLM engine takes the new weights in place
            self.engine.model = model
            self.engine.sync_weights()
        elif vllm:
            from herl_core.rollout.vllm import VLLMEngine

            self.engine = VLLMEngine.from_config(self.cfg, model, tok, seed=self.seed)
        else:
            from herl_core.rollout.hf import HFEngine

            self.engine = HFEngine.from_config(self.cfg, model, tok)
        return folder

    def close(self) -> None:
        """Drop the engine, stopping a vLLM engine's processes (before the actor is killed)."""
        engine, self.engine = self.engine, None
        if engine is not None and hasattr(engine, "close"):
            engine.close()

    def generate(self, prompts: list[list[int]], n: int, sampling: SamplingParams) -> list[Generation]:
        """The worker engine's generations of its shard, prompt-major."""
        if self.engine is None:
            raise RuntimeError("RolloutWorker.generate: no weights loaded yet")
        return self.engine.generate(prompts, n, sampling)


class RayEngine:
    """RolloutEngine over ``cfg.workers`` Ray actors (see module docstring). Call ``shutdown()`` when done."""

    def __init__(
        self, model: Any, tokenizer: Any, cfg: EngineConfig, seed: int = 0, compute_dtype: torch.dtype | None = None
    ) -> None:
        """``compute_dtype``: the dtype the workers load the weights in (``model.dtype``, herl_core/precision.py);
        None = the policy's parameter dtype."""
        if cfg.workers < 1:
            raise ValueError(f"RayEngine: rollout.engine.workers must be >= 1, got {cfg.workers}")
        ray = _import_ray()
        self.model, self.tokenizer, self.cfg, self.compute_dtype = model, tokenizer, cfg, compute_dtype
        self.owns_cluster = not ray.is_initialized()
        if self.owns_cluster:
            if cfg.ray_address is not None:
                ray.init(address=cfg.ray_address)
            else:
                ray.init(num_cpus=math.ceil(cfg.workers * cfg.worker_cpus), include_dashboard=False)
        self.owns_dir = cfg.weights_dir is None
        self.weights_dir = Path(tempfile.mkdtemp(prefix="herl-ray-")) if self.owns_dir else Path(cfg.weights_dir)
        self.weights_dir.mkdir(parents=True, exist_ok=True)
        self._cleanup = weakref.finalize(self, shutil.rmtree, str(self.weights_dir), True) if self.owns_dir else None
        actor = ray.remote(num_cpus=cfg.worker_cpus, num_gpus=cfg.worker_gpus)(RolloutWorker)
        threads = max(1, int(cfg.worker_cpus))
        self.workers = [actor.remote(cfg, seed, threads) for _ in range(cfg.workers)]
        self.version, self.folder = 0, None
        self.sync_weights()

    def sync_weights(self) -> None:
        """Save the policy to ``<weights_dir>/v<k+1>``, reload every worker from it, then delete ``v<k>``."""
        from herl_core.models import save_checkpoint_weights

        ray = _import_ray()
        from herl_core.precision import dtype_name as name_of

        # the workers only generate: they get the weights in the compute dtype (written in it, half the bytes in bf16)
        folder = save_checkpoint_weights(
            self.model, self.tokenizer, self.weights_dir / f"v{self.version + 1}", dtype=self.compute_dtype
        )
        dtype = name_of(self.compute_dtype) if self.compute_dtype is not None else dtype_name(self.model)
        ray.get([w.load.remote(str(folder), dtype) for w in self.workers])
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)
        self.version, self.folder = self.version + 1, folder

    def generate(self, prompts: list[list[int]], n: int, sampling: SamplingParams) -> list[Generation]:
        """``len(prompts) * n`` generations, prompt-major, equal to one in-process engine's for the same call."""
        if n < 1:
            raise ValueError(f"RayEngine.generate: n must be >= 1, got {n}")
        if sampling.keys is not None and len(sampling.keys) != len(prompts):
            raise ValueError(f"RayEngine.generate: {len(sampling.keys)} keys for {len(prompts)} prompts")
        if not prompts:
            return []
        keys = tuple(sampling.keys) if sampling.keys is not None else tuple(range(len(prompts)))
        seed = sampling.seed
        if seed is None and sampling.temperature > 0:
            seed = int(torch.randint(2**62, (1,)))  # one draw, as HFEngine does; every shard gets it
        calls, start = [], 0
        for worker, size in zip(self.workers, shard_sizes(len(prompts), len(self.workers)), strict=True):
            if size:
                shard = dataclasses.replace(sampling, seed=seed, keys=keys[start : start + size])
                calls.append(worker.generate.remote([list(p) for p in prompts[start : start + size]], n, shard))
            start += size
        return [g for part in _import_ray().get(calls) for g in part]

    def shutdown(self) -> None:
        """Kill the worker actors, delete the weights folder (a temporary ``weights_dir`` entirely), and shut Ray
        down when this engine started it. Safe to call twice."""
        ray = _import_ray()
        try:
            ray.get([w.close.remote() for w in self.workers], timeout=60)
        except Exception:  # noqa: BLE001 - a dead or hung worker must not stop the shutdown
            pass
        for w in self.workers:
            ray.kill(w)
        self.workers = []
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)
            self.folder = None
        if self._cleanup is not None:
            self._cleanup()
        if self.owns_cluster and ray.is_initialized():
            ray.shutdown()
            self.owns_cluster = False

    close = shutdown
