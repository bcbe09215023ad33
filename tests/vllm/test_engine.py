"""The vLLM engine against herl's HF engine on SmolLM2 (fp32, CPU): greedy tokens, log-probs, records, weight sync.

Run (vLLM environment): .venv-vllm/bin/pytest -m vllm tests/vllm/test_engine.py

What is compared, and within what. vLLM's CPU kernels (packed GEMMs, its paged attention) and the HF engine's
(oneDNN linears, SDPA) sum in other orders, so their fp32 logits differ by float rounding (measured here: log-probs
within ~1e-5). Tokens are compared only while the HF model's top-2 logit gap at every step so far exceeds ``GAP``
(a greedy choice rounding cannot flip); log-probs within ``TOL`` (absolute, nats), two orders above what was seen.
"""

from __future__ import annotations

import copy
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

GAP = 1e-2
TOL = 2e-3
PROMPTS = [
    "What is 2+2?",
    "Name three colors.",
    "Write one sentence about the sea.",
    "Give me a synonym for happy.",
    "List two prime numbers.",
    "Translate 'good morning' to French.",
]


def encode(tok, texts):
    from herl_core.models import encode_prompt

    return [encode_prompt(tok, t) for t in texts]


def hf_logits(model, prompt: list[int], completion: list[int]) -> torch.Tensor:
    """(len(completion), V) fp32 logits of the HF model at each completion position (teacher-forced)."""
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].float()
    return logits[len(prompt) - 1 : len(prompt) - 1 + len(completion)]


def hf_logprobs(model, prompt: list[int], completion: list[int], temperature: float = 1.0) -> list[float]:
    logp = torch.log_softmax(hf_logits(model, prompt, completion) / temperature, dim=-1)
    return logp.gather(-1, torch.tensor(completion)[:, None]).squeeze(-1).tolist()


def clear_prefix(logits: torch.Tensor) -> int:
    """Number of leading steps whose top-2 logit gap exceeds GAP."""
    top2 = logits.topk(2, dim=-1).values
    gaps = (top2[:, 0] - top2[:, 1]).tolist()
    return next((i for i, g in enumerate(gaps) if g <= GAP), len(gaps))


def test_greedy_tokens_and_logprobs_match_the_hf_engine(smollm2, engine):
    from herl_core.rollout.base import SamplingParams
    from herl_core.rollout.hf import HFEngine

    model, tok = smollm2
    prompts = encode(tok, PROMPTS)
    sampling = SamplingParams(temperature=0.0, max_new_tokens=24)
    ours = engine.generate(prompts, 1, sampling)
    ref = HFEngine(model, tok).generate(prompts, 1, sampling)
    compared = total = 0
    worst = 0.0
    for p, v, h in zip(prompts, ours, ref, strict=True):
        k = clear_prefix(hf_logits(model, p, h.completion_ids))
        assert v.completion_ids[:k] == h.completion_ids[:k], (tok.decode(p), v.text, h.text)
        if k == len(h.completion_ids):  # the whole answer was clear: same length, same end, same text
            assert (v.completion_ids, v.finished, v.text) == (h.completion_ids, h.finished, h.text)
        worst = max([worst, *(abs(a - b) for a, b in zip(v.logprobs[:k], h.logprobs[:k], strict=True))])
        compared, total = compared + k, total + len(h.completion_ids)
    assert worst <= TOL, worst
    assert compared >= total // 2 > 0, (compared, total)  # the comparison covered most of the tokens


def test_sampled_records_have_the_hf_engine_layout_and_logprob_meaning(smollm2, engine):
    """Prompt-major n samples per prompt; each sample's tokens depend on (seed, key, j) alone; EOS kept and
    ``finished`` iff it ends with an EOS; text = the HF tokenizer's decoding; log-probs = the sampled tokens'
    log-probs under the warped distribution (here temperature 0.7: log_softmax(logits / 0.7)), as the HF engine's."""
    from herl_core.rollout.base import SamplingParams

    model, tok = smollm2
    prompts = encode(tok, PROMPTS[:3])
    sampling = SamplingParams(temperature=0.7, max_new_tokens=12, seed=11, keys=(5, 6, 7))
    gens = engine.generate(prompts, 3, sampling)
    assert [g.prompt_ids for g in gens] == [p for p in prompts for _ in range(3)]
    eos = set(engine.eos_token_ids)
    for g in gens:
        assert len(g.logprobs) == len(g.completion_ids) >= 1
        assert g.finished == (g.completion_ids[-1] in eos) and not eos & set(g.completion_ids[:-1])
        assert g.finished or len(g.completion_ids) == 12
        assert g.text == tok.decode(g.completion_ids, skip_special_tokens=True)
        ref = hf_logprobs(model, g.prompt_ids, g.completion_ids, temperature=0.7)
        assert max(abs(a - b) for a, b in zip(g.logprobs, ref, strict=True)) <= TOL
    assert len({tuple(g.completion_ids) for g in gens[:3]}) > 1  # the n samples of a prompt are not copies
    # the second prompt alone, with its key: the same three samples (batch mates and position do not matter)
    alone = engine.generate(prompts[1:2], 3, SamplingParams(temperature=0.7, max_new_tokens=12, seed=11, keys=(6,)))
    assert [g.completion_ids for g in alone] == [g.completion_ids for g in gens[3:6]]


def train_once(model, tok, prompts, lr: float = 1e-4):
    """One AdamW update (herl's optimizer) of ``model`` on the mean NLL of its own greedy answers."""
    from herl_core.rollout.base import SamplingParams
    from herl_core.rollout.hf import HFEngine

    answers = HFEngine(model, tok).generate(prompts, 1, SamplingParams(temperature=0.0, max_new_tokens=12))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    loss = 0.0
    for g in answers:
        ids = torch.tensor([g.prompt_ids + g.completion_ids])
        logits = model(input_ids=ids).logits[0, len(g.prompt_ids) - 1 : -1]
        loss = loss + torch.nn.functional.cross_entropy(logits, torch.tensor(g.completion_ids))
    (loss / len(answers)).backward()
    opt.step()
    model.eval()
    return answers


def test_weight_sync_after_an_update_serves_the_new_weights(smollm2, engine):
    """After one update of the policy and ``sync_weights``, vLLM's log-probs of a fixed completion equal the updated
    HF model's; without the sync they stay the old model's (the update moves them by far more than TOL)."""
    model, tok = smollm2
    prompts = encode(tok, PROMPTS[:3])
    policy = copy.deepcopy(model)
    fixed = [g.completion_ids for g in train_once(policy, tok, prompts)]  # policy is now one update ahead
    before = [hf_logprobs(model, p, c) for p, c in zip(prompts, fixed, strict=True)]
    after = [hf_logprobs(policy, p, c) for p, c in zip(prompts, fixed, strict=True)]
    moved = max(abs(a - b) for x, y in zip(before, after, strict=True) for a, b in zip(x, y, strict=True))
    assert moved > 20 * TOL, moved  # the update is visible at this tolerance
    engine.model = policy
    try:
        engine.sync_weights()
        served = engine.score(prompts, fixed)
        err = max(abs(a - b) for x, y in zip(served, after, strict=True) for a, b in zip(x, y, strict=True))
        assert err <= TOL, f"vLLM serves log-probs {err:.3g} away from the updated policy's (moved {moved:.3g})"
    finally:
        engine.model = model
        engine.sync_weights()
    restored = engine.score(prompts, fixed)
    assert max(abs(a - b) for x, y in zip(restored, before, strict=True) for a, b in zip(x, y, strict=True)) <= TOL


def test_lora_policy_syncs_its_merged_weights(smollm2, engine):
    """A LoRA policy (B != 0, so the adapters change the outputs): vLLM serves W + (alpha/r)·B·A."""
    from herl_core.config import LoraConfig
    from herl_core.models import apply_lora

    model, tok = smollm2
    lora = apply_lora(copy.deepcopy(model), LoraConfig(enabled=True, r=4, alpha=8))
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.02, generator=torch.Generator().manual_seed(0))
    prompts = encode(tok, PROMPTS[:2])
    fixed = [[504, 2988, 288, 451, 8170], [504, 2380, 339, 5248, 12634]]
    want = [hf_logprobs(lora, p, c) for p, c in zip(prompts, fixed, strict=True)]
    base = [hf_logprobs(model, p, c) for p, c in zip(prompts, fixed, strict=True)]
    assert max(abs(a - b) for x, y in zip(want, base, strict=True) for a, b in zip(x, y, strict=True)) > 20 * TOL
    engine.model = lora
    try:
        engine.sync_weights()
        got = engine.score(prompts, fixed)
    finally:
        engine.model = model
        engine.sync_weights()
    assert max(abs(a - b) for x, y in zip(got, want, strict=True) for a, b in zip(x, y, strict=True)) <= TOL
    assert all(math.isfinite(x) for row in got for x in row)


def test_bad_calls_are_refused(engine):
    from herl_core.rollout.base import SamplingParams

    with pytest.raises(ValueError, match="n must be >= 1"):
        engine.generate([[1, 2]], 0, SamplingParams())
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        engine.generate([[1, 2], []], 1, SamplingParams())
    with pytest.raises(ValueError, match="2 keys for 1 prompts"):
        engine.generate([[1, 2]], 1, SamplingParams(keys=(1, 2)))


def test_an_engine_built_outside_the_main_guard_is_refused_with_the_advice(tmp_path):
    """vLLM spawns its processes, which re-import the caller's __main__: a script that builds an engine at import time
    fails with herl's advice (raised in the child before it loads anything), not with a hang or a fork bomb."""
    script = tmp_path / "no_guard.py"
    script.write_text(
        textwrap.dedent("""
        from herl_core.config import ModelConfig, TinyModelConfig
        from herl_core.models import load_policy
        from herl_core.rollout.vllm import VLLMEngine

        tiny = TinyModelConfig(hidden_size=64, num_layers=1, num_heads=2)
        model, tok = load_policy(ModelConfig(name_or_path="tiny", tiny=tiny, device="cpu"))
        VLLMEngine(model, tok, kv_cache_gb=0.25)
        print("built without a guard")
    """)
    )
    root = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": root}
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode != 0 and "built without a guard" not in done.stdout
    assert 'so build the engine under `if __name__ == "__main__":`' in done.stderr, done.stderr[-3000:]
