"""The rollout engine interface (spec §3.2, §3.6; peers_and_conventions §3.3 integration point 1).

``generate(prompts, n, sampling)`` takes already-tokenised prompts and returns, for every prompt, ``n`` generations
(prompt-major: prompt 0's n samples first) holding the prompt ids, the completion ids and the per-token log-probs of
the sampled tokens under the sampling distribution. The HF engine (``herl_core.rollout.hf``) and the vLLM engine
(``herl_core.rollout.vllm``) implement it; the trainer only sees this protocol.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable


def stable_key(*parts: object) -> int:
    """A 63-bit integer from ``parts`` (blake2b of their ``repr``), the same in every process and Python run
    (unlike ``hash``): the random key of a prompt (its record id) or of a rewrite job (prompt id, draft index)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def default_eos_ids(model: Any, tokenizer: Any) -> list[int]:
    """The ids an engine stops on: the tokenizer's EOS and the model's generation-config EOS (one or a list)."""
    ids = [tokenizer.eos_token_id]
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids += gen_eos if isinstance(gen_eos, list) else [gen_eos]
    ids = list(dict.fromkeys(i for i in ids if i is not None))
    if not ids:
        raise ValueError("the tokenizer has no EOS token; pass eos_token_ids")
    return ids


@dataclass(frozen=True)
class SamplingParams:
    """Sampling of one generate call. temperature 0 = greedy.

    ``keys``: one integer per prompt (``stable_key`` of its id). Sample j of the prompt with key k draws its random
    numbers from a stream seeded by (``seed``, k, j) alone, so a prompt gets the same samples whatever else is in the
    call, its position, the batch size, or the process/worker that generates it: a data-parallel rank or a Ray
    worker sampling its share draws with the single-process run's random numbers (equal tokens up to float rounding:
    herl_core.rollout.hf, "Reproducibility"). ``None`` = the prompt's position.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    max_new_tokens: int = 128
    seed: int | None = None
    keys: tuple[int, ...] | None = None


@dataclass
class Generation:
    """One sampled completion. ``completion_ids`` ends with EOS when ``finished``.

    ``margins`` (one per completion token, when the engine reports them; the HF engine does): how far each draw was
    from drawing another token, as a bound on the perturbation of the scores it survives (herl_core.rollout.hf,
    "Reproducibility"): sampled draws, the probability mass to the nearer edge of the drawn token's CDF interval;
    greedy draws, the gap between the best and the second-best log-prob. Another CPU or batch layout computes the
    scores with other rounding, and draws the same tokens wherever the margins exceed that rounding.
    """

    prompt_ids: list[int]
    completion_ids: list[int]
    logprobs: list[float] = field(default_factory=list)
    text: str = ""
    finished: bool = True
    margins: list[float] = field(default_factory=list)


def min_margin(gens: list[Generation]) -> float:
    """The smallest draw margin over ``gens`` (+inf when none is reported): the run-level reproducibility check."""
    return min((m for g in gens for m in g.margins), default=float("inf"))


@runtime_checkable
class RolloutEngine(Protocol):
    """What the trainer needs from a generator."""

    def generate(self, prompts: list[list[int]], n: int, sampling: SamplingParams) -> list[Generation]:
        """Return ``len(prompts) * n`` generations, prompt-major."""
        ...

    def sync_weights(self) -> None:
        """Make the engine sample from the current policy weights (no-op when it shares the training model)."""
        ...


class DrawMeter:
    """A ``RolloutEngine`` that passes every call to ``engine`` and remembers the smallest draw margin
    (``Generation.margins``) of what it returned since the last ``take()``: the run-level reproducibility check.

    A training step whose draws all kept a margin above the float rounding between two machines or batch layouts
    (herl_core.rollout.hf, "Reproducibility") samples the same tokens on both; the trainer logs the step's smallest
    margin as ``rollout/min_draw_margin``."""

    def __init__(self, engine: RolloutEngine):
        self.engine = engine
        self._min = float("inf")

    def generate(self, prompts: list[list[int]], n: int, sampling: SamplingParams) -> list[Generation]:
        gens = self.engine.generate(prompts, n, sampling)
        self._min = min(self._min, min_margin(gens))
        return gens

    def sync_weights(self) -> None:
        self.engine.sync_weights()

    def take(self) -> float:
        """The smallest margin since the last call (+inf when the engine reports none), and start over."""
        value, self._min = self._min, float("inf")
        return value

    def __getattr__(self, name: str):
        return getattr(self.engine, name)
