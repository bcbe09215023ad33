"""Rollout with Hugging Face ``generate`` (spec §3.2 rollout, §3.6 guided generation), CPU or GPU.

The engine shares the training model, so ``sync_weights`` is a no-op. One ``generate`` call:

1. expands every prompt n times (prompt-major), sorts the sequences by prompt length (stable) and cuts them into
   chunks of ``batch_size`` so each chunk is left-padded only to its own longest prompt;
2. runs ``model.generate`` per chunk (KV cache, EOS stop, ``torch.inference_mode``, model in eval mode, its previous
   mode restored afterwards). Shared prefill (``prefix_plan``): rows whose prompts share a long common prefix
   (the n samples of a prompt; the hindsight prompts of one group's drafts, which differ only from the draft on) form a
   family; the KV cache of the family's prefix is computed once and indexed out to its rows, and ``generate`` runs
   only the rest. Layout of a row: ``[pad][family prefix][pad][own suffix]`` with the prefixes right-aligned to one
   column and the suffixes to the end; the attention mask hides both pads and the position ids (cumulative mask)
   continue across the gap, so the values equal the per-row prefill up to float rounding. Used when it costs fewer
   prefill tokens than plain left padding;
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


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def prefix_plan(seqs: list[list[int]]) -> tuple[list[int], list[int]] | None:
    """Families of rows for the shared prefill: (``owner[r]`` = family of row r, ``shared[f]`` = prefix length of
    family f), or None when plain left padding needs no more prefill tokens.

    Rows are taken in lexicographic order, so rows with a common prefix are adjacent and a family's common prefix is
    the minimum of its neighbours'. Row r joins the family before it (m members, prefix k) when that saves prefill:
    r then skips ``common`` tokens, while the m members recompute ``k - common`` each, so it joins iff
    ``common > m·(k - common)``. The n samples of a prompt always join (common = k); prompts that share only a chat
    template's system prompt do not, so they keep their own deeper sharing. A prefix leaves ≥ 1 token per row for
    ``generate``. Prefill cost, in token columns: (#families)·P + (#rows)·S with P the longest family prefix and S the
    longest remainder, against (#rows)·(longest row) for plain left padding.
    """
    n = len(seqs)
    if n < 2:
        return None
    order = sorted(range(n), key=lambda r: seqs[r])
    owner, shared, members = [0] * n, [], 0
    for pos, r in enumerate(order):
        if pos:
            common = min(shared[-1], _common_prefix(seqs[order[pos - 1]], seqs[r]), len(seqs[r]) - 1)
            if common > 0 and common > members * (shared[-1] - common):
                shared[-1], members, owner[r] = common, members + 1, len(shared) - 1
                continue
        shared.append(len(seqs[r]) - 1)
        members, owner[r] = 1, len(shared) - 1
    if len(shared) == n:
        return None
    prefix = max(shared)
    rest = max(len(seqs[r]) - shared[owner[r]] for r in range(n))
    if len(shared) * prefix + n * rest >= n * max(len(q) for q in seqs):
        return None
    return owner, shared


def _trim(new_tokens: list[int], logprobs: list[float], eos_ids: set[int]) -> tuple[list[int], list[float], bool]:
    """Cut after the first EOS (kept). Returns (ids, logprobs, finished)."""
    for i, tok in enumerate(new_tokens):
        if tok in eos_ids:
            return new_tokens[: i + 1], logprobs[: i + 1], True
    return new_tokens, logprobs, False


class HFEngine:
    """RolloutEngine over a live HF causal LM and its tokenizer (see module docstring)."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        batch_size: int = 64,
        eos_token_ids: list[int] | None = None,
        share_prefixes: bool = True,
    ):
        """``share_prefixes``: the shared prefill of common prompt prefixes (module doc); off = plain left padding."""
        if batch_size < 1:
            raise ValueError(f"HFEngine: batch_size must be >= 1, got {batch_size}")
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
        self.share_prefixes = share_prefixes
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

    def _shared_prefill(
        self, seqs: list[list[int]], plan: tuple[list[int], list[int]], device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor, Any]:
        """The ``[pad][family prefix][pad][suffix]`` batch of ``prefix_plan``'s families and the KV cache of its
        first P (prefix) columns, computed once per family and indexed out to the family's rows."""
        owner, shared = plan
        prefix = max(shared)
        width = prefix + max(len(q) - shared[owner[r]] for r, q in enumerate(seqs))
        input_ids = torch.full((len(seqs), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(seqs), width), dtype=torch.long)
        first = {}
        for r, q in enumerate(seqs):
            k = shared[owner[r]]
            first.setdefault(owner[r], r)
            input_ids[r, prefix - k : prefix], attention_mask[r, prefix - k : prefix] = torch.tensor(q[:k]), 1
            input_ids[r, width - (len(q) - k) :], attention_mask[r, width - (len(q) - k) :] = torch.tensor(q[k:]), 1
        reps = [first[f] for f in range(len(shared))]
        ids, mask = input_ids[reps, :prefix].to(device), attention_mask[reps, :prefix].to(device)
        position_ids = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)  # as generate computes them
        cache = self.model(input_ids=ids, attention_mask=mask, position_ids=position_ids, use_cache=True,
                           logits_to_keep=1).past_key_values  # fmt: skip
        cache.batch_select_indices(torch.tensor(owner, device=device))
        return input_ids, attention_mask, cache

    def _generate_chunk(
        self, seqs: list[list[int]], sampling: SamplingParams, uniforms: torch.Tensor | None
    ) -> list[Generation]:
        device = next(self.model.parameters()).device
        plan = prefix_plan(seqs) if self.share_prefixes else None
        cache = None
        if plan is None:
            input_ids, attention_mask = self._left_pad(seqs, max(len(s) for s in seqs))
        else:
            input_ids, attention_mask, cache = self._shared_prefill(seqs, plan, device)
        width = input_ids.shape[1]
        recorder = _SampleRecorder(uniforms.to(device) if uniforms is not None else None)
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
