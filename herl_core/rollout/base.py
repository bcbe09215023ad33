"""The rollout engine interface (spec §3.2, §3.6; peers_and_conventions §3.3 integration point 1).

``generate(prompts, n, sampling)`` takes already-tokenised prompts and returns, for every prompt, ``n`` generations
(prompt-major: prompt 0's n samples first) holding the prompt ids, the completion ids and the per-token log-probs of
the sampled tokens under the sampling distribution. The HF engine (``herl_core.rollout.hf``) and the vLLM engine
(``herl_core.rollout.vllm``) implement it; the trainer only sees this protocol.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable


def stable_key(*parts: object) -> int:
    """A 63-bit integer from ``parts`` (blake2b of their ``repr``), the same in every process and Python run
    (unlike ``hash``): the random key of a prompt (its record id) or of a rewrite job (prompt id, draft index)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


@dataclass(frozen=True)
class SamplingParams:
    """Sampling of one generate call. temperature 0 = greedy.

    ``keys``: one integer per prompt (``stable_key`` of its id). Sample j of the prompt with key k draws its random
    numbers from a stream seeded by (``seed``, k, j) alone, so a prompt gets the same samples whatever else is in the
    call, its position, the batch size, or the process/worker that generates it: a data-parallel rank or a Ray
    worker sampling its share reproduces the single-process run (issue 7). ``None`` = the prompt's position.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    max_new_tokens: int = 128
    seed: int | None = None
    keys: tuple[int, ...] | None = None


@dataclass
class Generation:
    """One sampled completion. ``completion_ids`` ends with EOS when ``finished``."""

    prompt_ids: list[int]
    completion_ids: list[int]
    logprobs: list[float] = field(default_factory=list)
    text: str = ""
    finished: bool = True


@runtime_checkable
class RolloutEngine(Protocol):
    """What the trainer needs from a generator."""

    def generate(self, prompts: list[list[int]], n: int, sampling: SamplingParams) -> list[Generation]:
        """Return ``len(prompts) * n`` generations, prompt-major."""
        ...

    def sync_weights(self) -> None:
        """Make the engine sample from the current policy weights (no-op when it shares the training model)."""
        ...
