"""Rollout with vLLM's offline engine (spec §3.2, §3.6; the reference samples with vLLM in sync/SPMD mode).

vLLM (0.33 pins torch 2.14 CUDA and transformers < 5.21) is not part of herl's CPU environment: install it in a
separate GPU environment (docs/scaling.md, rung L1; there is no ``herl[gpu]`` extra because vLLM's pins do not
resolve together with herl's verified set). This module imports without vLLM; building a
``VLLMEngine`` without it raises ImportError with that hint.

Weight sync (``sync_weights``), the method chosen: the policy is saved with ``save_checkpoint_weights`` to a new
versioned folder ``<work_dir>/v<k>`` (safetensors + tokenizer), the old ``vllm.LLM`` is released, and a new
``vllm.LLM(model=<that folder>)`` is built; the previous version's folder is then deleted. This uses only vLLM's public
constructor, so it does not break with vLLM's internal worker layout, at the cost of an engine start per sync (tens
of seconds). In-place reloads (``llm.collective_rpc("reload_weights")`` or NCCL weight transfer) are faster but go
through worker internals that change between vLLM releases. This code path cannot run in herl's CPU CI; its import
guard is tested there, the rest only where vLLM and CUDA exist.

Log-probs: ``SamplingParams(logprobs=0)`` makes vLLM return the log-prob of each sampled token, and the engine is
built with ``logprobs_mode="processed_logprobs"`` (vLLM ≥ 0.10.2; the default reports the raw model distribution) so
the numbers are, as in the HF engine, log-probs under the distribution actually sampled from (after temperature,
top-k, top-p). The trainer does not use them (spec §3.10: old log-probs are recomputed by the actor).
"""

from __future__ import annotations

import gc
import importlib.util
import shutil
import tempfile
from pathlib import Path
from typing import Any

from herl_core.rollout.base import Generation, SamplingParams, stable_key

INSTALL_HINT = (
    "VLLMEngine needs vLLM and a CUDA GPU: install vllm (>=0.33, which pins its own torch/transformers) in a "
    "separate GPU environment as docs/scaling.md (rung L1) describes, or set rollout.engine.backend: hf."
)


def vllm_available() -> bool:
    """True when the ``vllm`` package can be imported."""
    return importlib.util.find_spec("vllm") is not None


class VLLMEngine:
    """RolloutEngine over ``vllm.LLM``, re-created from a saved checkpoint on every ``sync_weights``."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        gpu_memory_utilization: float = 0.3,
        tensor_parallel_size: int = 1,
        seed: int = 0,
        work_dir: str | Path | None = None,
        dtype: str = "auto",
    ):
        if not vllm_available():
            raise ImportError(INSTALL_HINT)
        self.model, self.tokenizer = model, tokenizer
        self.llm_kwargs = {
            "gpu_memory_utilization": gpu_memory_utilization,
            "tensor_parallel_size": tensor_parallel_size,
            "seed": seed,
            "dtype": dtype,
            "trust_remote_code": False,
            "logprobs_mode": "processed_logprobs",
        }
        self.work_dir = Path(work_dir) if work_dir else Path(tempfile.mkdtemp(prefix="herl-vllm-"))
        self.version, self.llm, self.folder = 0, None, None
        self.sync_weights()

    def sync_weights(self) -> None:
        """Save the policy to ``<work_dir>/v<k>`` and rebuild ``vllm.LLM`` from it (see module docstring)."""
        import torch
        from vllm import LLM

        from herl_core.models import save_checkpoint_weights

        self.version += 1
        folder = save_checkpoint_weights(self.model, self.tokenizer, self.work_dir / f"v{self.version}")
        if self.llm is not None:
            del self.llm
            self.llm = None
            gc.collect()
            torch.cuda.empty_cache()
        self.llm = LLM(model=str(folder), tokenizer=str(folder), **self.llm_kwargs)
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)
        self.folder = folder

    def _sampling_params(self, n: int, sampling: SamplingParams, n_prompts: int) -> list[Any]:
        """One vLLM ``SamplingParams`` per prompt, seeded by (seed, the prompt's key): as in the HF engine, a
        prompt's samples do not depend on its batch mates or on the worker that generates it (issue 7)."""
        from vllm import SamplingParams as VSamplingParams

        keys = list(sampling.keys) if sampling.keys is not None else list(range(n_prompts))
        return [
            VSamplingParams(
                n=n,
                temperature=sampling.temperature,
                top_p=sampling.top_p,
                top_k=sampling.top_k if sampling.top_k > 0 else -1,
                max_tokens=sampling.max_new_tokens,
                logprobs=0,
                seed=None if sampling.seed is None else stable_key("vllm", sampling.seed, key) % (2**31 - 1),
            )
            for key in keys
        ]

    def generate(self, prompts: list[list[int]], n: int, sampling: SamplingParams) -> list[Generation]:
        """``len(prompts) * n`` generations, prompt-major; completions end with EOS when finished."""
        from vllm.inputs import TokensPrompt

        inputs = [TokensPrompt(prompt_token_ids=list(p)) for p in prompts]
        outputs = self.llm.generate(
            prompts=inputs, sampling_params=self._sampling_params(n, sampling, len(prompts)), use_tqdm=False
        )
        gens = []
        for prompt, request in zip(prompts, outputs, strict=True):
            for completion in request.outputs:
                ids = list(completion.token_ids)
                logprobs = [step[tok].logprob for step, tok in zip(completion.logprobs or [], ids, strict=False)]
                gens.append(
                    Generation(
                        prompt_ids=list(prompt),
                        completion_ids=ids,
                        logprobs=logprobs,
                        text=completion.text,
                        finished=completion.finish_reason == "stop",
                    )
                )
        return gens
