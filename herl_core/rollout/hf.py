"""Rollout with a Hugging Face causal LM (spec §3.2 rollout, §3.6 guided generation), CPU or GPU.

The engine shares the training model, so ``sync_weights`` is a no-op. One ``generate`` call:

1. expands every prompt n times (prompt-major), sorts the sequences by prompt length (stable) and cuts them into
   chunks of ``batch_size`` so each chunk is left-padded only to its own longest prompt;
2. decodes each chunk with herl's own loop over the model's forward (``HFEngine._decode``: KV cache
   (``DynamicCache``), ``logits_to_keep=1``, EOS stop, ``torch.inference_mode``, model in eval mode, its previous mode
   restored afterwards). Shared prefill (``prefix_plan``): rows whose prompts share a long common prefix (the n
   samples of a prompt; the hindsight prompts of one group's drafts, which differ only from the draft on) form a
   family; the KV cache of the family's prefix is computed once and indexed out to its rows, and the loop runs only
   the rest. A head that all rows share is prefilled once for all families. On a CPU the model's fp32 linears run
   through oneDNN with their weights packed once per call (``herl_core.rollout.packed``). Layout of a row:
   ``[head][pad][family prefix][pad][own suffix]`` with the prefixes right-aligned to one column and the suffixes to
   the end; the attention mask hides the pads and the position ids (cumulative mask) continue across the gaps, so the
   values equal the per-row prefill up to float rounding. Used when it costs fewer prefill tokens than plain left
   padding;
3. trims every completion after its first EOS (EOS kept, ``finished=True``); a completion cut by
   ``max_new_tokens`` has ``finished=False``; the original order is restored.

Why not ``model.generate`` (performance): its per-step work around the model is built for every decoding
strategy. At batch 64 and a 49k vocabulary, its copies of the logits, its processors' vocabulary-wide ``where`` /
``fill`` and the argmax over a one-hot score (how a custom sampler had to hand it the token) cost about a tenth of a
SmolLM2 decode step on a CPU (docs/performance.md). The loop computes what ``generate`` computes for greedy decoding
with a KV cache: same position ids, same masks, same tokens (tested against ``generate`` on the tiny model).

Log-probs (what the numbers are): for each sampled token y_t, ``log_softmax(s_t)[y_t]`` where s_t are the scores after
every warper, i.e. the distribution actually sampled from: logits / temperature, then top-k, then top-p (filtered
tokens get -inf and the rest is renormalised by the softmax), HF's own warpers in ``generate``'s order. For greedy
decoding (temperature 0) no warper runs and the numbers are the model's log-probs at temperature 1. They are recorded
step by step, so memory is O(batch × vocab), not O(steps × batch × vocab).

Sampling: the token is drawn by inverse-CDF sampling (one uniform per row, ``inverse_cdf_sample``). The distribution
is exactly the warped one, as with ``torch.multinomial``, but multinomial spends about as long as a decode step of
SmolLM2 on a 49k vocabulary on a CPU (docs/performance.md). Departure: the random stream differs from HF's own
``do_sample=True`` path, so a seed gives other (equally distributed) samples than HF's sampler.

Determinism: sample j of a prompt with key k (``SamplingParams.keys``, default: its position) takes its uniforms,
one per decode step, from ``torch.Generator`` seeded with ``row_seed(seed, k, j)``. Its random numbers therefore do
not depend on ``batch_size``, on the other prompts of the call, or on which process generates it, so a data-parallel
rank or a Ray worker that samples its share of the prompts draws with the single-process run's uniforms. With
``seed=None`` the base seed is drawn from torch's global RNG (one draw per call); the global RNG is otherwise untouched.

Reproducibility (what is guaranteed, and what is not): the same call on the same machine, with the same batch layout,
gives bit-identical tokens and log-probs (same kernels, same shapes, same order). Another layout of the same rows
(another ``batch_size``, other batch mates, the shared prefill against plain left padding, packed against plain
linears, a Ray worker or a data-parallel rank holding a share) or another CPU (AVX2 against AVX-512: oneDNN, MKL and
torch's own kernels pick other summation orders) computes the scores with other float rounding, typically 1e-6 to
1e-5 in log-prob units. Log-probs then agree within that rounding, and a token is the same wherever its draw was
further from drawing a neighbour than the rounding: every ``Generation`` carries each draw's margin
(``inverse_cdf_sample_with_margin``, ``greedy_with_margin``). A draw whose margin is below the rounding can flip, and
the rest of that row then differs. The tests compare tokens exactly up to the first such draw.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from transformers import (
    DynamicCache,
    LogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from herl_core.rollout.base import Generation, SamplingParams, default_eos_ids, stable_key
from herl_core.rollout.packed import packed_linears


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
    return inverse_cdf_sample_with_margin(logp, u)[0]


def inverse_cdf_sample_with_margin(logp: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``inverse_cdf_sample`` and, per row, the draw's margin: the probability mass between u and the nearer edge of
    the drawn token's CDF interval, min(u·c_V − c_{i−1}, c_i − u·c_V) / c_V.

    What it is for (module doc, "Reproducibility"): a perturbation δ of the scores moves every CDF value by at most
    max|δ|/2, so two computations of the same draw whose scores differ by less than the margin (float rounding on
    another CPU, another batch layout) draw the same token; a draw with a smaller margin may flip to a neighbour.
    """
    cdf = logp.exp().cumsum(dim=-1)
    total = cdf[:, -1:]
    x = torch.minimum(u.to(total)[:, None] * total, torch.nextafter(total, torch.zeros_like(total)))
    token = torch.searchsorted(cdf, x, right=True)
    hi = cdf.gather(-1, token.clamp(max=cdf.shape[-1] - 1))
    lo = torch.where(token > 0, cdf.gather(-1, (token - 1).clamp(min=0)), torch.zeros_like(hi))
    margin = (torch.minimum(x - lo, hi - x) / total).squeeze(-1)
    return token.squeeze(-1), margin


def greedy_with_margin(logp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B,) argmax tokens and their margin: the gap between the best and the second-best log-prob (a perturbation of
    the scores smaller than half the gap cannot change the argmax). With a single candidate the gap is +inf."""
    if logp.shape[-1] < 2:
        return logp.argmax(dim=-1), torch.full(logp.shape[:1], float("inf"), device=logp.device)
    top = logp.topk(2, dim=-1).values
    return logp.argmax(dim=-1), top[:, 0] - top[:, 1]


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


FORWARD_COST = 8
"""Prefill cost of one extra model forward, in token columns (``prefix_plan``): a plan that needs one more forward
must save more than this. Small against the hundreds of columns a shared prefill saves on real prompts."""


class PrefixPlan(NamedTuple):
    """``prefix_plan``'s answer: ``owner[r]`` = family of row r, ``shared[f]`` = prefix length of family f, ``head`` =
    tokens every row shares (0 = no head stage), ``cost`` = prefill token columns, head and forwards included."""

    owner: list[int]
    shared: list[int]
    head: int
    cost: int


def _families(seqs: list[list[int]], order: list[int], lcp: list[int], width: int) -> tuple[list[int], list[int]]:
    """Fewest families with every remainder ≤ ``width`` (greedy over the lexicographic order, which is optimal: a
    family is a run of that order, and a run inside a feasible run is feasible)."""
    owner, shared, longest = [0] * len(seqs), [], 0
    for pos, r in enumerate(order):
        if pos:
            k = min(shared[-1], lcp[pos - 1], len(seqs[r]) - 1)
            if max(longest, len(seqs[r])) - k <= width:
                shared[-1], longest, owner[r] = k, max(longest, len(seqs[r])), len(shared) - 1
                continue
        shared.append(len(seqs[r]) - 1)
        longest, owner[r] = len(seqs[r]), len(shared) - 1
    return owner, shared


def prefix_plan(seqs: list[list[int]]) -> PrefixPlan | None:
    """The cheapest shared prefill of a chunk (module doc), or None when plain left padding costs no more.

    Layout of row r in family f: ``[head][pad][family middle][pad][own suffix]``: the ``head`` tokens all rows share
    (prefilled once), each family's prefix beyond the head (once per family), each row's remainder (in the first
    decode step), every part padded to its longest. Cost in token columns: ``head + F·(P − head) + n·S`` plus
    ``FORWARD_COST`` per extra forward (1, or 2 with a head), with F families, P the longest family prefix, S the
    longest remainder, n rows; plain left padding costs ``n·L`` (L the longest row). For each S the fewest families
    that fit it are found greedily over the rows in lexicographic order (rows with a common prefix are adjacent there);
    the cheapest S wins. A family's prefix leaves ≥ 1 token per row for the decode step. The head is used when it
    pays for its forward: the chat template's system prompt, the hindsight template ahead of the instruction.
    """
    n = len(seqs)
    if n < 2:
        return None
    order = sorted(range(n), key=lambda r: seqs[r])
    lcp = [_common_prefix(seqs[order[i]], seqs[order[i + 1]]) for i in range(n - 1)]
    best = None
    for width in range(1, max(map(len, seqs)) + 1):  # every possible remainder width S
        owner, shared = _families(seqs, order, lcp, width)
        remainder, prefix, f = max(len(q) - shared[owner[r]] for r, q in enumerate(seqs)), max(shared), len(shared)
        head = min(min(lcp), min(shared))
        cost = f * prefix + n * remainder + FORWARD_COST
        with_head = head + f * (prefix - head) + n * remainder + 2 * FORWARD_COST
        plan = PrefixPlan(owner, shared, head, with_head) if with_head < cost else PrefixPlan(owner, shared, 0, cost)
        if f < n and (best is None or plan.cost < best.cost):
            best = plan
        if f == 1:
            break  # a wider remainder only pads more
    if best is None or best.cost >= n * max(len(q) for q in seqs):
        return None
    return best


def _trim(new_tokens: list[int], eos_ids: set[int]) -> tuple[int, bool]:
    """Where to cut after the first EOS (kept): (kept length, finished)."""
    for i, tok in enumerate(new_tokens):
        if tok in eos_ids:
            return i + 1, True
    return len(new_tokens), False


class HFEngine:
    """RolloutEngine over a live HF causal LM and its tokenizer (see module docstring)."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        batch_size: int = 64,
        eos_token_ids: list[int] | None = None,
        share_prefixes: bool = True,
        min_new_tokens: int = 0,
        pack_linears: bool = True,
    ):
        """``share_prefixes``: the shared prefill of common prompt prefixes (module doc); off = plain left padding.
        ``min_new_tokens``: EOS is masked out of the first this many steps (as ``generate``'s knob of that name;
        the benchmarks use it to force equal lengths). ``pack_linears``: fp32 CPU linears run through oneDNN with
        weights packed once per call (``herl_core.rollout.packed``); off = the model's own ``nn.Linear``."""
        if batch_size < 1:
            raise ValueError(f"HFEngine: batch_size must be >= 1, got {batch_size}")
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
        self.share_prefixes, self.min_new_tokens, self.pack_linears = share_prefixes, min_new_tokens, pack_linears
        self.eos_token_ids = eos_token_ids or self._default_eos()
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_token_ids[0]

    @classmethod
    def from_config(cls, cfg: Any, model: Any, tokenizer: Any) -> HFEngine:
        """The engine an ``EngineConfig`` (``rollout.engine``) describes (in-process and in each Ray worker alike)."""
        return cls(
            model,
            tokenizer,
            batch_size=cfg.generation_batch_size,
            share_prefixes=cfg.share_prefixes,
            pack_linears=cfg.pack_linears,
        )

    def _default_eos(self) -> list[int]:
        try:
            return default_eos_ids(self.model, self.tokenizer)
        except ValueError as exc:
            raise ValueError(f"HFEngine: {exc}") from exc

    def sync_weights(self) -> None:
        """No-op: the engine samples from the training model itself."""

    def generate(self, prompts: list[list[int]], n: int, sampling: SamplingParams) -> list[Generation]:
        """``len(prompts) * n`` generations, prompt-major (prompt 0's n samples first)."""
        if n < 1:
            raise ValueError(f"HFEngine.generate: n must be >= 1, got {n}")
        for i, prompt in enumerate(prompts):
            if not prompt:
                raise ValueError(f"HFEngine.generate: prompt {i} is empty")
        if sampling.max_new_tokens < 1:
            raise ValueError(f"HFEngine.generate: max_new_tokens must be >= 1, got {sampling.max_new_tokens}")
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
            with torch.inference_mode(), packed_linears(self.model, self.pack_linears):
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

    def _shared_prefill(self, seqs: list[list[int]], plan: PrefixPlan, device: torch.device) -> tuple[Any, ...]:
        """The ``[head][pad][family middle][pad][suffix]`` batch of ``plan`` and the KV cache of its first P columns:
        the head computed once, each family's middle once on the head's cache, both indexed out to the rows."""
        owner, shared, head = plan.owner, plan.shared, plan.head
        prefix = max(shared)
        width = prefix + max(len(q) - shared[owner[r]] for r, q in enumerate(seqs))
        input_ids = torch.full((len(seqs), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(seqs), width), dtype=torch.long)
        first: dict[int, int] = {}
        for r, q in enumerate(seqs):
            k = shared[owner[r]]
            first.setdefault(owner[r], r)
            parts = [(0, q[:head]), (prefix - (k - head), q[head:k]), (width - (len(q) - k), q[k:])]
            for col, part in parts:
                if part:
                    input_ids[r, col : col + len(part)] = torch.tensor(part)
                    attention_mask[r, col : col + len(part)] = 1
        input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
        positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # as generate computes them
        cache = DynamicCache(config=self.model.config)
        reps = torch.tensor([first[f] for f in range(len(shared))], device=device)

        def prefill(rows: torch.Tensor, start: int, stop: int) -> None:  # columns start:stop of `rows` into the cache
            self.model(input_ids=input_ids[rows, start:stop], attention_mask=attention_mask[rows, :stop],
                       position_ids=positions[rows, start:stop], past_key_values=cache, use_cache=True,
                       logits_to_keep=1)  # fmt: skip

        if head:
            prefill(reps[:1], 0, head)
            cache.batch_select_indices(torch.zeros(len(shared), dtype=torch.long, device=device))
        if prefix > head:  # always, when the plan has a head (a head is worth its forward only for ≥ 2 families)
            prefill(reps, head, prefix)
        cache.batch_select_indices(torch.tensor(owner, device=device))
        return input_ids, attention_mask, cache

    def _generate_chunk(
        self, seqs: list[list[int]], sampling: SamplingParams, uniforms: torch.Tensor | None
    ) -> list[Generation]:
        device = next(self.model.parameters()).device
        plan = prefix_plan(seqs) if self.share_prefixes else None
        if plan is None:
            input_ids, attention_mask = self._left_pad(seqs, max(len(s) for s in seqs))
            cache, done = DynamicCache(config=self.model.config), 0
        else:
            input_ids, attention_mask, cache = self._shared_prefill(seqs, plan, device)
            done = max(plan.shared)  # columns already in the cache
        new, logprobs, margins = self._decode(
            input_ids.to(device), attention_mask.to(device), cache, done, sampling,
            uniforms.to(device) if uniforms is not None else None,
        )  # fmt: skip
        eos = set(self.eos_token_ids)
        gens = []
        rows = zip(seqs, new.cpu().tolist(), logprobs.cpu().tolist(), margins.cpu().tolist(), strict=True)
        for s, toks, lps, mgs in rows:
            keep, finished = _trim(toks, eos)
            ids = toks[:keep]
            text = self.tokenizer.decode(ids, skip_special_tokens=True)
            gens.append(
                Generation(
                    prompt_ids=s,
                    completion_ids=ids,
                    logprobs=lps[:keep],
                    text=text,
                    finished=finished,
                    margins=mgs[:keep],
                )  # fmt: skip
            )
        return gens

    def _decode(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        cache: Any,
        done: int,
        sampling: SamplingParams,
        uniforms: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The decode loop (module doc): (B, T) new tokens, their log-probs and their draw margins, T ≤ max_new_tokens.

        Step 0 runs the prompt columns ``done:`` (all of them without a shared prefill), each later step the token
        just drawn. Position ids count the attended tokens (mask cumsum − 1), as ``generate`` computes them, so the
        left pads and the gap of the shared-prefill layout are skipped. A row stays in the batch after its EOS (its
        later tokens are cut by ``_trim``); the loop ends when every row has drawn an EOS or at max_new_tokens.
        """
        batch, device = input_ids.shape[0], input_ids.device
        warpers = _warpers(sampling)
        eos = torch.tensor(self.eos_token_ids, device=device)
        positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        step_ids, step_pos = input_ids[:, done:], positions[:, done:]
        seen = input_ids  # what warpers get as input_ids (the built-in ones do not read it)
        tokens: list[torch.Tensor] = []
        logps: list[torch.Tensor] = []
        margins: list[torch.Tensor] = []
        alive = torch.ones(batch, dtype=torch.bool, device=device)
        for t in range(sampling.max_new_tokens):
            out = self.model(
                input_ids=step_ids, attention_mask=attention_mask, position_ids=step_pos,
                past_key_values=cache, use_cache=True, logits_to_keep=1,
            )  # fmt: skip
            scores = out.logits[:, -1, :].float()
            cache = out.past_key_values
            for warp in warpers:
                scores = warp(seen, scores)
            if t < self.min_new_tokens:
                scores[:, eos] = float("-inf")
            logp = torch.log_softmax(scores, dim=-1)
            if uniforms is not None:
                token, margin = inverse_cdf_sample_with_margin(logp, uniforms[:, t])
            else:
                token, margin = greedy_with_margin(logp)
            tokens.append(token)
            margins.append(margin)
            logps.append(logp.gather(-1, token[:, None]).squeeze(-1))
            alive &= ~torch.isin(token, eos)
            if t + 1 == sampling.max_new_tokens or not bool(alive.any()):
                break
            step_ids, step_pos = token[:, None], step_pos[:, -1:] + 1
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones((batch, 1))], dim=-1)
            if warpers:
                seen = torch.cat([seen, step_ids], dim=-1)
        return torch.stack(tokens, dim=1), torch.stack(logps, dim=1), torch.stack(margins, dim=1)
