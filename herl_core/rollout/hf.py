"""Rollout with Hugging Face ``generate`` (spec §3.2 rollout, §3.6 guided generation), CPU or GPU.

The engine shares the training model, so ``sync_weights`` is a no-op. One ``generate`` call:

1. expands every prompt n times (prompt-major), sorts the sequences by prompt length (stable) and cuts them into
   chunks of ``batch_size`` so each chunk is left-padded only to its own longest prompt;
2. runs ``model.generate`` per chunk (KV cache, EOS stop, ``torch.inference_mode``, model in eval mode, its previous
   mode restored afterwards). Shared prefill: when a prompt repeats (n > 1), the KV cache of its first
   ``width - 1`` columns is computed once and indexed out to its n rows, so ``generate`` only runs the last prompt
   column per row (1/n of the prefill FLOPs; the values equal the per-row prefill up to float rounding);
3. trims every completion after its first EOS (EOS kept, ``finished=True``); a completion cut by
   ``max_new_tokens`` has ``finished=False``; the original order is restored.

Log-probs (what the numbers are): for each sampled token y_t, ``log_softmax(s_t)[y_t]`` where s_t are the scores after
every logits processor and warper, i.e. the distribution actually sampled from: logits / temperature, then top-k,
then top-p (filtered tokens get -inf and the rest is renormalised by the softmax). For greedy decoding
(temperature 0) no warper runs and the numbers are the model's log-probs at temperature 1. The processor placed last
(``_SampleRecorder``) records them step by step, so memory is O(batch × vocab), not O(steps × batch × vocab) as with
``output_scores``. To keep it last, herl passes the temperature / top-k / top-p warpers itself and sets the matching
``generate`` knobs to their neutral values.

Sampling (performance, issue 6): ``generate`` always runs greedily; when sampling, the last processor draws the token
by inverse-CDF sampling (one uniform per row, ``inverse_cdf_sample``) and returns a one-hot score that the argmax
picks. The distribution is exactly the warped one, as with ``torch.multinomial``, but multinomial spends about as
long as a decode step of SmolLM2 on a 49k vocabulary on a CPU (docs/performance.md). Departure: the random stream
differs from HF's own ``do_sample=True`` path, so a seed gives other (equally distributed) samples than HF's sampler.

Determinism (issue 7): sample j of a prompt with key k (``SamplingParams.keys``, default: its position) takes its
uniforms, one per decode step, from ``torch.Generator`` seeded with ``row_seed(seed, k, j)``. Its tokens therefore do
not depend on ``batch_size``, on the other prompts of the call, or on which process generates it: a data-parallel
rank or a Ray worker that samples its share of the prompts gets the single-process samples (up to float rounding of
the logits in a differently padded batch, which can flip a draw only when u lands within ~1e-7 of a CDF step).
With ``seed=None`` the base seed is drawn from torch's global RNG (one draw per call); the global RNG is otherwise
untouched.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import (
    GenerationConfig,
    LogitsProcessor,
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from herl_core.rollout.base import Generation, SamplingParams, stable_key


def row_seed(seed: int, key: int, sample: int) -> int:
    """The seed of sample ``sample`` of the prompt with key ``key`` in a call seeded ``seed`` (module doc)."""
    return stable_key("row", seed, key, sample)


def row_uniforms(seed: int, keys: list[int], n: int, steps: int) -> torch.Tensor:
    """(len(keys)·n, steps) uniforms in [0, 1), prompt-major: row i·n + j is sample j of prompt i."""
    rows = []
    for key in keys:
        for j in range(n):
            rows.append(torch.rand(steps, generator=torch.Generator().manual_seed(row_seed(seed, key, j))))
    return torch.stack(rows) if rows else torch.zeros((0, steps))


def inverse_cdf_sample(logp: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """(B,) one token per row drawn from exp(logp): i = min{i : cdf_i > u·cdf_V}, u (B,) ~ U[0, 1) given per row.

    Exact categorical sampling, like ``torch.multinomial``, but with B random numbers instead of B·V work in the RNG:
    on a CPU, multinomial over a 49k vocabulary costs about as much as the model's decode step (docs/performance.md).
    u·cdf_V is kept strictly below cdf_V, so a token with zero probability (filtered by top-k/top-p) is never drawn.
    """
    cdf = logp.exp().cumsum(dim=-1)
    total = cdf[:, -1:]
    u = torch.minimum(u.to(total)[:, None] * total, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, u, right=True).squeeze(-1)


class _SampleRecorder(LogitsProcessor):
    """Last processor: draws the next token itself (sampling) or takes the argmax (greedy), records its log-prob
    under the processed scores, and hands ``generate`` (run greedily) a one-hot score so it picks that token."""

    def __init__(self, uniforms: torch.Tensor | None) -> None:
        self.uniforms = uniforms  # (B, max_new_tokens) when sampling, None when greedy
        self.steps: list[torch.Tensor] = []  # per step (B,) log-prob of the chosen token

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        logp = torch.log_softmax(scores.float(), dim=-1)
        sample = self.uniforms is not None
        token = inverse_cdf_sample(logp, self.uniforms[:, len(self.steps)]) if sample else scores.argmax(dim=-1)
        self.steps.append(logp.gather(-1, token[:, None]).squeeze(-1))
        if not sample:
            return scores
        return torch.full_like(scores, float("-inf")).scatter_(-1, token[:, None], 0.0)

    def finish(self, batch: int, n_new: int) -> torch.Tensor:
        """(B, n_new) log-probs of the generated tokens."""
        steps = self.steps[:n_new]
        return torch.stack(steps, dim=1) if steps else torch.zeros((batch, 0))


def _warpers(sampling: SamplingParams) -> list[LogitsProcessor]:
    """Temperature, top-k (-1/0 = off), top-p (1 = off), in generate's own order."""
    out: list[LogitsProcessor] = []
    if sampling.temperature <= 0:
        return out
    if sampling.temperature != 1.0:
        out.append(TemperatureLogitsWarper(sampling.temperature))
    if sampling.top_k > 0:
        out.append(TopKLogitsWarper(top_k=sampling.top_k))
    if sampling.top_p < 1.0:
        out.append(TopPLogitsWarper(top_p=sampling.top_p))
    return out


def _trim(new_tokens: list[int], logprobs: list[float], eos_ids: set[int]) -> tuple[list[int], list[float], bool]:
    """Cut after the first EOS (kept). Returns (ids, logprobs, finished)."""
    for i, tok in enumerate(new_tokens):
        if tok in eos_ids:
            return new_tokens[: i + 1], logprobs[: i + 1], True
    return new_tokens, logprobs, False


class HFEngine:
    """RolloutEngine over a live HF causal LM and its tokenizer (see module docstring)."""

    def __init__(self, model: Any, tokenizer: Any, batch_size: int = 64, eos_token_ids: list[int] | None = None):
        if batch_size < 1:
            raise ValueError(f"HFEngine: batch_size must be >= 1, got {batch_size}")
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
        self.eos_token_ids = eos_token_ids or self._default_eos()
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_token_ids[0]

    def _default_eos(self) -> list[int]:
        ids = [self.tokenizer.eos_token_id]
        gen_eos = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        ids += gen_eos if isinstance(gen_eos, list) else [gen_eos]
        ids = list(dict.fromkeys(i for i in ids if i is not None))
        if not ids:
            raise ValueError("HFEngine: the tokenizer has no EOS token; pass eos_token_ids")
        return ids

    def sync_weights(self) -> None:
        """No-op: the engine samples from the training model itself."""

    def generate(self, prompts: list[list[int]], n: int, sampling: SamplingParams) -> list[Generation]:
        """``len(prompts) * n`` generations, prompt-major (prompt 0's n samples first)."""
        if n < 1:
            raise ValueError(f"HFEngine.generate: n must be >= 1, got {n}")
        for i, prompt in enumerate(prompts):
            if not prompt:
                raise ValueError(f"HFEngine.generate: prompt {i} is empty")
        if sampling.keys is not None and len(sampling.keys) != len(prompts):
            raise ValueError(f"HFEngine.generate: {len(sampling.keys)} keys for {len(prompts)} prompts")
        seqs = [list(p) for p in prompts for _ in range(n)]
        uniforms = None
        if sampling.temperature > 0:
            seed = sampling.seed if sampling.seed is not None else int(torch.randint(2**62, (1,)))
            keys = list(sampling.keys) if sampling.keys is not None else list(range(len(prompts)))
            uniforms = row_uniforms(seed, keys, n, sampling.max_new_tokens)
        order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))  # stable: equal lengths keep their order
        results: list[Generation | None] = [None] * len(seqs)
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.inference_mode():
                for start in range(0, len(order), self.batch_size):
                    chunk = order[start : start + self.batch_size]
                    u = uniforms[chunk] if uniforms is not None else None
                    for i, gen in zip(chunk, self._generate_chunk([seqs[i] for i in chunk], sampling, u), strict=True):
                        results[i] = gen
        finally:
            self.model.train(was_training)
        return [g for g in results if g is not None]

    def _left_pad(self, seqs: list[list[int]], width: int) -> tuple[torch.Tensor, torch.Tensor]:
        input_ids = torch.full((len(seqs), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for row, s in enumerate(seqs):
            input_ids[row, width - len(s) :] = torch.tensor(s)
            attention_mask[row, width - len(s) :] = 1
        return input_ids, attention_mask

    def _shared_prefill(self, seqs: list[list[int]], width: int, device: torch.device) -> Any:
        """KV cache of every row's first ``width - 1`` columns, computed once per distinct prompt (consecutive equal
        rows, the n samples of a prompt) and then indexed out to all rows; None when no prompt repeats."""
        starts = [r for r in range(len(seqs)) if r == 0 or seqs[r] != seqs[r - 1]]
        if len(starts) == len(seqs) or width < 2:
            return None
        ids, mask = self._left_pad([seqs[r] for r in starts], width)
        ids, mask = ids[:, :-1].to(device), mask[:, :-1].to(device)
        position_ids = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)  # as generate computes them
        cache = self.model(input_ids=ids, attention_mask=mask, position_ids=position_ids, use_cache=True,
                           logits_to_keep=1).past_key_values  # fmt: skip
        owner = torch.tensor([sum(1 for s in starts if s <= r) - 1 for r in range(len(seqs))], device=device)
        cache.batch_select_indices(owner)
        return cache

    def _generate_chunk(
        self, seqs: list[list[int]], sampling: SamplingParams, uniforms: torch.Tensor | None
    ) -> list[Generation]:
        device = next(self.model.parameters()).device
        width = max(len(s) for s in seqs)
        input_ids, attention_mask = self._left_pad(seqs, width)
        recorder = _SampleRecorder(uniforms.to(device) if uniforms is not None else None)
        cache = self._shared_prefill(seqs, width, device)
        out = self.model.generate(
            input_ids=input_ids.to(device),
            attention_mask=attention_mask.to(device),
            generation_config=self._generation_config(sampling),
            logits_processor=LogitsProcessorList([*_warpers(sampling), recorder]),
            **({"past_key_values": cache} if cache is not None else {}),
        )
        new = out[:, width:]
        logprobs = recorder.finish(len(seqs), new.shape[1]).cpu().tolist()
        eos = set(self.eos_token_ids)
        gens = []
        for s, toks, lps in zip(seqs, new.cpu().tolist(), logprobs, strict=True):
            ids, lp, finished = _trim(toks, lps, eos)
            text = self.tokenizer.decode(ids, skip_special_tokens=True)
            gens.append(Generation(prompt_ids=s, completion_ids=ids, logprobs=lp, text=text, finished=finished))
        return gens

    def _generation_config(self, sampling: SamplingParams) -> GenerationConfig:
        """Greedy ``generate`` with neutral knobs: herl passes the warpers and draws the token itself (module doc)."""
        return GenerationConfig(
            max_new_tokens=sampling.max_new_tokens,
            do_sample=False,  # warpers of the model's config apply only when sampling: none runs
            repetition_penalty=1.0,
            no_repeat_ngram_size=0,
            min_new_tokens=0,
            num_beams=1,
            use_cache=True,
            eos_token_id=self.eos_token_ids,
            pad_token_id=self.pad_token_id,
        )
