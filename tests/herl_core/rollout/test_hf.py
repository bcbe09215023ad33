"""herl_core.rollout.hf: batched HF generate rollouts (spec §3.2, §3.6).

Run: .venv/bin/pytest tests/herl_core/rollout/test_hf.py
The tiny random model's weights are redrawn with std 1 so its next-token distributions are peaked: greedy outputs
then differ between prompts and between steps, which makes order, padding and trimming checks meaningful.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from herl_core.config import EngineConfig
from herl_core.logprobs import pack_batch, sequence_logprobs
from herl_core.models import encode_prompt
from herl_core.rollout import make_engine
from herl_core.rollout.base import Generation, RolloutEngine, SamplingParams
from herl_core.rollout.hf import HFEngine

GREEDY = SamplingParams(temperature=0.0, max_new_tokens=8)
NEVER = 49151  # an id the peaked tiny model does not produce in these tests (asserted where it matters)


def test_engine_satisfies_protocol_and_make_engine(policy):
    model, tok = policy
    engine = make_engine(EngineConfig(generation_batch_size=5), model, tok)
    assert isinstance(engine, HFEngine) and isinstance(engine, RolloutEngine)
    assert engine.batch_size == 5 and engine.eos_token_ids == [2]
    engine.sync_weights()  # shares the model: nothing to do, must not fail


def test_shapes_and_prompt_major_order(policy, prompts):
    model, tok = policy
    gens = HFEngine(model, tok, batch_size=4).generate(prompts, 3, SamplingParams(max_new_tokens=6, seed=0))
    assert len(gens) == 9  # 3 prompts × n=3
    assert [g.prompt_ids for g in gens] == [p for p in prompts for _ in range(3)]
    for g in gens:
        assert 1 <= len(g.completion_ids) <= 6 and len(g.logprobs) == len(g.completion_ids)
        assert all(lp <= 0.0 for lp in g.logprobs)
        assert g.text == tok.decode(g.completion_ids, skip_special_tokens=True)


def test_chunking_and_length_bucketing_keep_order(policy, prompts, same_draws):
    model, tok = policy
    # batch_size 2 after sorting by length = one unpadded chunk per prompt; batch_size 8 = one padded chunk: two
    # layouts, so equal up to float rounding (tokens wherever the greedy gap is clear, log-probs within tolerance)
    one = HFEngine(model, tok, batch_size=2).generate(prompts, 2, GREEDY)
    many = HFEngine(model, tok, batch_size=8).generate(prompts, 2, GREEDY)
    same_draws(one, many, min_full=1.0)
    # greedy: both samples of a prompt agree, and the three prompts give different answers
    assert one[0].completion_ids == one[1].completion_ids
    assert len({tuple(one[i].completion_ids) for i in (0, 2, 4)}) == 3


def test_left_padding_does_not_change_greedy_output(policy, prompts, same_draws):
    model, tok = policy
    engine = HFEngine(model, tok, batch_size=4)
    short = prompts[1]  # 1 token; beside the long chat prompt it gets ~30 pad tokens on its left
    alone = engine.generate([short], 1, GREEDY)[0]
    batched = engine.generate([prompts[0], short], 1, GREEDY)[1]
    same_draws([batched], [alone], min_full=1.0)


def test_decode_loop_equals_hf_generate_greedy(policy, prompts, same_draws):
    """herl's decode loop against ``model.generate`` itself: same greedy tokens for a left-padded batch, and the
    recorded log-probs are generate's own scores under log_softmax. Packed linears off: the loop alone is compared
    here (with packing the values differ by float rounding; test_packed.py compares those). The loop computes only the
    last position's logits (``logits_to_keep=1``), generate all of them: other shapes, so tokens are compared wherever
    the greedy gap is clear and log-probs within tolerance."""
    model, tok = policy
    model.eval()
    engine = HFEngine(model, tok, batch_size=8, eos_token_ids=[NEVER], pack_linears=False)
    mine = engine.generate(prompts, 1, GREEDY)
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[tok.pad_token_id] * (width - len(p)) + p for p in prompts])
    mask = (torch.arange(width)[None, :] >= torch.tensor([width - len(p) for p in prompts])[:, None]).long()
    with torch.no_grad():
        out = model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False, eos_token_id=NEVER,
            pad_token_id=tok.pad_token_id, output_scores=True, return_dict_in_generate=True,
        )  # fmt: skip
    logp = torch.stack([torch.log_softmax(s, -1) for s in out.scores], 1)  # (B, 8, V)
    top2 = logp.topk(2, dim=-1).values
    theirs = [
        Generation(p, ids, lps, tok.decode(ids, skip_special_tokens=True), False, gaps)
        for p, ids, lps, gaps in zip(
            prompts,
            out.sequences[:, width:].tolist(),
            logp.gather(-1, out.sequences[:, width:, None])[..., 0].tolist(),
            (top2[..., 0] - top2[..., 1]).tolist(),
            strict=True,
        )
    ]
    same_draws(mine, theirs, logprob_atol=1e-5, min_full=1.0)


def test_min_new_tokens_masks_eos(policy, prompts):
    model, tok = policy
    stop = HFEngine(model, tok, eos_token_ids=[NEVER]).generate(prompts[:1], 1, GREEDY)[0].completion_ids[2]
    cut = HFEngine(model, tok, eos_token_ids=[stop]).generate(prompts[:1], 1, GREEDY)[0]
    forced = HFEngine(model, tok, eos_token_ids=[stop], min_new_tokens=8).generate(prompts[:1], 1, GREEDY)[0]
    assert cut.finished and len(cut.completion_ids) <= 3  # the greedy path hits `stop` by step 3
    assert len(forced.completion_ids) == 8 and stop not in forced.completion_ids and not forced.finished


def test_eos_trimming_and_finished_flag(policy, prompts):
    """One prompt, the same engine and shapes with another EOS id: the same computation up to the stop, so the
    tokens and log-probs before it are exactly those of the uncut run (same kernels, same shapes, same order)."""
    model, tok = policy
    full = HFEngine(model, tok, eos_token_ids=[NEVER]).generate(prompts[:1], 1, GREEDY)[0]
    assert NEVER not in full.completion_ids and len(full.completion_ids) == 8 and not full.finished
    stop = full.completion_ids[3]
    first = full.completion_ids.index(stop)  # the first time that token appears
    cut = HFEngine(model, tok, eos_token_ids=[stop]).generate(prompts[:1], 1, GREEDY)[0]
    assert cut.finished
    assert cut.completion_ids == full.completion_ids[: first + 1]  # EOS kept, nothing after it
    assert cut.logprobs == pytest.approx(full.logprobs[: first + 1], abs=1e-5)


def test_same_seed_same_samples_and_global_rng_untouched(policy, prompts):
    """The same call twice in one process is the same computation: bit-identical tokens and log-probs."""
    model, tok = policy
    engine = HFEngine(model, tok, batch_size=4)
    sampling = SamplingParams(temperature=1.0, max_new_tokens=6, seed=7)
    state = torch.get_rng_state()
    a = engine.generate(prompts, 2, sampling)
    assert torch.equal(torch.get_rng_state(), state)
    b = engine.generate(prompts, 2, sampling)
    c = engine.generate(prompts, 2, SamplingParams(temperature=1.0, max_new_tokens=6, seed=8))
    assert [g.completion_ids for g in a] == [g.completion_ids for g in b]
    assert [g.logprobs for g in a] == [g.logprobs for g in b]
    assert [g.completion_ids for g in a] != [g.completion_ids for g in c]
    assert a[0].completion_ids != a[1].completion_ids  # two samples of one prompt differ


def test_logprobs_at_temperature_one_match_training_forward(policy, prompts):
    model, tok = policy
    gens = HFEngine(model, tok, batch_size=4).generate(prompts, 2, SamplingParams(max_new_tokens=8, seed=3))
    batch = pack_batch([g.prompt_ids for g in gens], [g.completion_ids for g in gens], tok.pad_token_id)
    with torch.no_grad():
        recomputed = sequence_logprobs(model, batch, temperature=1.0)
    for i, g in enumerate(gens):
        torch.testing.assert_close(recomputed[i, : len(g.logprobs)], torch.tensor(g.logprobs), atol=1e-4, rtol=0)


def test_logprobs_are_under_the_warped_distribution(policy, prompts):
    model, tok = policy
    sampling = SamplingParams(temperature=0.5, top_k=3, max_new_tokens=5, seed=1)
    g = HFEngine(model, tok).generate(prompts[:1], 1, sampling)[0]
    ids = torch.tensor([g.prompt_ids + g.completion_ids])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, len(g.prompt_ids) - 1 : -1] / 0.5  # (5, V), /T
    kth = logits.topk(3, dim=-1).values[:, -1:]
    warped = logits.masked_fill(logits < kth, float("-inf"))  # keep the top 3, renormalise
    expected = torch.log_softmax(warped, dim=-1).gather(-1, torch.tensor(g.completion_ids)[:, None])[:, 0]
    torch.testing.assert_close(torch.tensor(g.logprobs), expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("training", [True, False])
def test_model_mode_is_restored(policy, prompts, training):
    model, tok = policy
    model.train(training)
    HFEngine(model, tok).generate(prompts[:1], 1, SamplingParams(max_new_tokens=2, seed=0))
    assert model.training is training
    model.eval()


def test_bad_arguments(policy):
    model, tok = policy
    with pytest.raises(ValueError, match="n must be >= 1"):
        HFEngine(model, tok).generate([[1, 2]], 0, GREEDY)
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        HFEngine(model, tok).generate([[1, 2], []], 1, GREEDY)
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1"):
        HFEngine(model, tok).generate([[1, 2]], 1, SamplingParams(max_new_tokens=0))
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        HFEngine(model, tok, batch_size=0)


def test_inverse_cdf_sample_by_hand():
    import math

    from herl_core.rollout.hf import inverse_cdf_sample

    # p = [0.2, 0, 0.8] → cdf = [0.2, 0.2, 1.0]; index = first i with cdf_i > u
    logp = torch.tensor([[math.log(0.2), -math.inf, math.log(0.8)]])
    for u, expected in [(0.0, 0), (0.1999, 0), (0.2, 2), (0.5, 2), (0.999999, 2)]:
        assert inverse_cdf_sample(logp, torch.tensor([u])).tolist() == [expected], u
    # a zero-probability first token is never drawn, even at u = 0
    assert inverse_cdf_sample(torch.tensor([[-math.inf, 0.0]]), torch.tensor([0.0])).tolist() == [1]
    draws = inverse_cdf_sample(
        logp.expand(20000, 3).contiguous(), torch.rand(20000, generator=torch.Generator().manual_seed(0))
    )
    freq = torch.bincount(draws, minlength=3).float() / 20000
    assert freq[1] == 0 and abs(freq[0].item() - 0.2) < 0.02  # binomial sd ≈ 0.003


def test_row_uniforms_depend_only_on_seed_key_and_sample():
    from herl_core.rollout.hf import row_seed, row_uniforms

    u = row_uniforms(5, [11, 22], 2, 4)
    assert u.shape == (4, 4) and bool(((u >= 0) & (u < 1)).all())
    # row i·n + j is sample j of key i; the same (seed, key, j) gives the same row in any other call
    swapped = row_uniforms(5, [22, 11, 33], 2, 4)
    assert torch.equal(u[0], swapped[2]) and torch.equal(u[3], swapped[1])
    expected = torch.rand(4, generator=torch.Generator().manual_seed(row_seed(5, 22, 1)))
    assert torch.equal(u[3], expected)
    assert not torch.equal(u[0], u[1])  # two samples of one prompt differ
    assert not torch.equal(row_uniforms(6, [11], 1, 4)[0], u[0])  # another seed, another stream


def test_samples_do_not_depend_on_batch_size_order_or_batch_mates(policy, prompts, same_draws):
    """A prompt's random numbers are a function of (seed, its key, sample index) only, so a rank or a Ray worker
    generating a share of the prompts draws the single-process samples, up to float rounding: the batches differ in
    layout, so tokens are compared up to the first near-tie draw and log-probs within tolerance."""
    model, tok = policy
    keys = (101, 202, 303)
    full = HFEngine(model, tok, batch_size=64).generate(
        prompts, 3, SamplingParams(temperature=1.0, max_new_tokens=6, seed=4, keys=keys)
    )
    small = HFEngine(model, tok, batch_size=2).generate(
        prompts, 3, SamplingParams(temperature=1.0, max_new_tokens=6, seed=4, keys=keys)
    )
    same_draws(small, full)
    # the last prompt alone, and the prompts in reverse order, keep their own samples
    alone = HFEngine(model, tok).generate(
        prompts[2:], 3, SamplingParams(temperature=1.0, max_new_tokens=6, seed=4, keys=keys[2:])
    )
    same_draws(alone, full[6:])
    rev = HFEngine(model, tok).generate(
        prompts[::-1], 3, SamplingParams(temperature=1.0, max_new_tokens=6, seed=4, keys=keys[::-1])
    )
    same_draws(rev[:3], full[6:], logprob_atol=1e-5)
    # and another seed really draws other samples (the comparisons above are not vacuous)
    other = HFEngine(model, tok).generate(
        prompts, 3, SamplingParams(temperature=1.0, max_new_tokens=6, seed=5, keys=keys)
    )
    assert [g.completion_ids for g in other] != [g.completion_ids for g in full]
    # without keys, the key is the position: the lone prompt then samples like prompt 0 (same call: exact)
    pos = HFEngine(model, tok).generate(prompts[2:], 3, SamplingParams(temperature=1.0, max_new_tokens=6, seed=4))
    keyed0 = HFEngine(model, tok).generate(
        prompts[2:], 3, SamplingParams(temperature=1.0, max_new_tokens=6, seed=4, keys=(0,))
    )
    assert [g.completion_ids for g in pos] == [g.completion_ids for g in keyed0]
    with pytest.raises(ValueError, match="2 keys for 3 prompts"):
        HFEngine(model, tok).generate(prompts, 1, SamplingParams(seed=0, keys=(1, 2)))


def test_prefix_plan_by_hand():
    from herl_core.rollout.hf import PrefixPlan, prefix_plan

    a = [1, 2, 3, 4, 5, 6, 7, 8]
    # rows 0-2 and 4 share at least 6 tokens; row 3 shares only [1] with them; row 4 is row 0 again.
    # Lexicographic order r2 r0 r4 r1 r3 (lengths 7 8 8 8 6). Remainder width S = 1: families {r2} {r0 r4} {r1} {r3}
    # with prefixes 6 7 7 5: 4·7 + 5·1 + 8 (one forward) = 41. S = 2: {r2 r0 r4 r1} (prefix 6) {r3} (prefix 5):
    # 2·6 + 5·2 + 8 = 30, the cheapest; its head (1 token) would cost 1 + 2·5 + 10 + 16 = 37. S = 7: one family with
    # prefix 1: 1 + 5·7 + 8 = 44. Plain left padding: 5·8 = 40.
    rows = [a, a[:6] + [9, 9], a[:7], [1, 5, 5, 5, 5, 5], a]
    assert prefix_plan(rows) == PrefixPlan(owner=[0, 0, 0, 1, 0], shared=[6, 5], head=0, cost=30)
    assert prefix_plan([a]) is None and prefix_plan([a, [2, 3]]) is None  # nothing shared: plain left padding
    # identical rows keep all but their last token: 7 + 3·1 + 8 = 18 < 3·8 = 24
    assert prefix_plan([a, a, a]) == PrefixPlan([0, 0, 0], [7], 0, 18)
    # three prompts (2 samples each) behind a common 10-token head, 5 tokens of their own: at S = 1 three families of
    # prefix 14 with the head: 10 + 3·4 + 6·1 + 2·8 = 44, against 3·14 + 6 + 8 = 56 without it, S = 5's one family
    # (10 + 6·5 + 8 = 48) and plain 6·15 = 90
    head = list(range(100, 110))
    rows = [head + [i] * 5 for i in (1, 2, 3) for _ in range(2)]
    assert prefix_plan(rows) == PrefixPlan([0, 0, 1, 1, 2, 2], [14, 14, 14], 10, 44)


def test_shared_prefixes_do_not_change_the_samples(policy, same_draws):
    """Prompts built like hindsight prompts (a long common head, then each draft), and prompts that share a head then
    differ for many tokens (the head stage): the shared prefill with its [head][pad][middle][pad][suffix] layout gives
    the plain left-padded engine's tokens and log-probs, greedy and sampled.

    What is guaranteed is equality up to float rounding, not bit-equality: the two layouts run attention over
    differently padded keys, and oneDNN / MKL / torch pick other kernels (other summation orders) on AVX-512 than on
    AVX2. So log-probs must agree within LOGPROB_ATOL, and tokens must be equal up to the first draw that was within
    DRAW_MARGIN of drawing a neighbour (tests/conftest.py); a sampled token at such a near-tie may flip on some CPU,
    as one did on an AVX-512 machine (its margin was ~1e-7)."""
    from herl_core.rollout.hf import prefix_plan

    model, tok = policy
    head = encode_prompt(tok, "Revise the draft. [Instruction] Write a poem about the sea, in lowercase. Draft:")
    drafts = [" the sea", " A LONG AND LOUD DRAFT WITH, COMMAS, EVERYWHERE", " waves", "!"]
    hindsight = [head + tok.encode(d, add_special_tokens=False) for d in drafts] + [encode_prompt(tok, "hi")]
    rules = [head + tok.encode(f" then rule {i} " * 6, add_special_tokens=False) for i in range(3)]
    assert prefix_plan([p for p in hindsight for _ in range(2)]) is not None  # the shared path really runs
    assert prefix_plan([p for p in rules for _ in range(2)]).head > 0  # with its head stage
    shared, plain = HFEngine(model, tok), HFEngine(model, tok, share_prefixes=False)
    for prompts, sampling in itertools.product(
        (hindsight, rules), (GREEDY, SamplingParams(temperature=1.0, max_new_tokens=8, seed=3))
    ):
        same_draws(shared.generate(prompts, 2, sampling), plain.generate(prompts, 2, sampling), min_full=0.75)


def test_draw_margins_by_hand():
    import math

    from herl_core.rollout.hf import greedy_with_margin, inverse_cdf_sample_with_margin

    # p = [0.2, 0, 0.8] → cdf = [0.2, 0.2, 1.0]: u = 0.1 draws token 0, 0.1 from both edges; u = 0.25 draws token 2,
    # 0.05 above its lower edge 0.2; u = 0.9 draws token 2, 0.1 below its upper edge 1.0
    logp = torch.tensor([[math.log(0.2), -math.inf, math.log(0.8)]]).expand(3, 3)
    token, margin = inverse_cdf_sample_with_margin(logp, torch.tensor([0.1, 0.25, 0.9]))
    assert token.tolist() == [0, 2, 2]
    torch.testing.assert_close(margin, torch.tensor([0.1, 0.05, 0.1]), atol=1e-6, rtol=0)
    # greedy: the gap between the two best log-probs, log(0.8) - log(0.2) = log 4
    token, gap = greedy_with_margin(torch.tensor([[math.log(0.2), -math.inf, math.log(0.8)]]))
    assert token.tolist() == [2] and gap.item() == pytest.approx(math.log(4.0), abs=1e-6)


def test_generations_carry_one_margin_per_kept_token(policy, prompts):
    model, tok = policy
    for sampling in (GREEDY, SamplingParams(temperature=1.0, max_new_tokens=8, seed=3)):
        for g in HFEngine(model, tok).generate(prompts, 2, sampling):
            assert len(g.margins) == len(g.completion_ids) and all(m >= 0 for m in g.margins)
