"""herl_core.logprobs: packing layout and per-token log-probs (spec §3.10).

Run: .venv/bin/pytest tests/herl_core/test_logprobs.py
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from herl_core.logprobs import pack_batch, sequence_logprobs

PAD = 9


class BigramModel(torch.nn.Module):
    """logits[t] = table[input_ids[t]]: the next-token distribution depends only on the current token."""

    def __init__(self, probs: list[list[float]]):
        super().__init__()
        self.table = torch.nn.Parameter(torch.tensor(probs).log())
        self.seen: dict = {}

    def forward(self, input_ids, attention_mask, position_ids, logits_to_keep, use_cache):
        self.seen = {"logits_to_keep": logits_to_keep, "position_ids": position_ids}
        return SimpleNamespace(logits=self.table[input_ids][:, -logits_to_keep:, :])


def _bigram() -> BigramModel:
    # vocab of 10 (id 9 = pad); rows 0..9 are next-token distributions
    rows = [[0.1] * 10 for _ in range(10)]
    rows[2] = [0.05, 0.5, 0.05, 0.05, 0.05, 0.05, 0.05, 0.1, 0.05, 0.05]
    rows[1] = [0.05, 0.05, 0.05, 0.25, 0.05, 0.05, 0.05, 0.05, 0.35, 0.05]
    return BigramModel(rows)


def test_pack_batch_layout():
    b = pack_batch([[5, 6, 7], [4]], [[1], [2, 3]], pad_id=PAD)
    # P = 3 (longest prompt), R = 2 (longest completion): rows are [pad.. prompt | completion ..pad]
    assert b.prompt_width == 3 and b.response_width == 2
    assert b.input_ids.tolist() == [[5, 6, 7, 1, PAD], [PAD, PAD, 4, 2, 3]]
    assert b.attention_mask.tolist() == [[1, 1, 1, 1, 0], [0, 0, 1, 1, 1]]
    assert b.position_ids.tolist() == [[0, 1, 2, 3, 3], [0, 0, 0, 1, 2]]
    assert b.response_mask.tolist() == [[1.0, 0.0], [1.0, 1.0]]
    assert b.response_ids.tolist() == [[1, PAD], [2, 3]]


def test_pack_batch_rejects_bad_input():
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        pack_batch([[1], []], [[2], [3]], pad_id=PAD)
    with pytest.raises(ValueError, match="2 prompts but 1 completions"):
        pack_batch([[1], [2]], [[3]], pad_id=PAD)


def test_bigram_logprobs_by_hand():
    model = _bigram()
    b = pack_batch([[0, 2], [5]], [[1, 8], [3]], pad_id=PAD)
    lp = sequence_logprobs(model, b)
    # row 0: p(1 | 2) = 0.5, p(8 | 1) = 0.35; row 1: p(3 | 5) = 0.1, then padding → 0
    expected = torch.tensor([[math.log(0.5), math.log(0.35)], [math.log(0.1), 0.0]])
    torch.testing.assert_close(lp, expected)
    assert model.seen["logits_to_keep"] == 3  # R + 1


def test_bigram_temperature_by_hand():
    model = _bigram()
    b = pack_batch([[2]], [[1]], pad_id=PAD)
    lp = sequence_logprobs(model, b, temperature=2.0)
    # logits/2 = 0.5·log p → softmax ∝ sqrt(p); row 2: sqrt(.5) / (8·sqrt(.05) + sqrt(.5) + sqrt(.1))
    z = 8 * math.sqrt(0.05) + math.sqrt(0.5) + math.sqrt(0.1)
    assert lp.item() == pytest.approx(math.log(math.sqrt(0.5) / z), abs=1e-6)


def test_bigram_gradient_by_hand():
    model = _bigram()
    b = pack_batch([[2], [2]], [[1], []], pad_id=PAD)
    sequence_logprobs(model, b).sum().backward()
    # only row 0's token 1 after token 2 counts: d log softmax(w)[1] / dw = onehot(1) - p(·|2);
    # row 1 has no completion, so its padded position adds nothing.
    expected = -torch.tensor([0.05, 0.5, 0.05, 0.05, 0.05, 0.05, 0.05, 0.1, 0.05, 0.05])
    expected[1] += 1.0
    torch.testing.assert_close(model.table.grad[2], expected)
    assert model.table.grad[[0, 1, 3, 4, 5, 6, 7, 8, 9]].abs().sum() == 0


def _llama() -> LlamaForCausalLM:
    cfg = LlamaConfig(
        vocab_size=32,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
        initializer_range=0.5,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).eval()


def _manual(model, prompt: list[int], completion: list[int], temperature: float = 1.0) -> list[float]:
    """One forward per completion token on the unpadded prefix."""
    out = []
    for j, tok in enumerate(completion):
        ids = torch.tensor([prompt + completion[:j]])
        logits = model(input_ids=ids).logits[0, -1] / temperature
        out.append(torch.log_softmax(logits, dim=-1)[tok].item())
    return out


def test_llama_matches_manual_loop_and_padding_does_not_change_values():
    model = _llama()
    prompts = [[3, 4, 5, 6, 7, 8], [10, 11], [12, 13, 14]]
    completions = [[1, 2], [20, 21, 22, 23], [24]]
    with torch.no_grad():
        lp = sequence_logprobs(model, pack_batch(prompts, completions, pad_id=0), temperature=0.7)
        for i, (p, c) in enumerate(zip(prompts, completions, strict=True)):
            expected = torch.tensor(_manual(model, p, c, temperature=0.7))
            torch.testing.assert_close(lp[i, : len(c)], expected, atol=1e-5, rtol=1e-5)
            assert lp[i, len(c) :].abs().sum() == 0
            alone = sequence_logprobs(model, pack_batch([p], [c], pad_id=0), temperature=0.7)
            torch.testing.assert_close(alone[0], lp[i, : len(c)], atol=1e-5, rtol=1e-5)


def test_llama_gradients_flow():
    model = _llama().train()
    lp = sequence_logprobs(model, pack_batch([[3, 4], [5]], [[6, 7], [8]], pad_id=0))
    assert lp.requires_grad
    lp.sum().backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None for g in grads)
    assert sum(g.abs().sum().item() for g in grads) > 0


def test_rejects_non_positive_temperature():
    with pytest.raises(ValueError, match="temperature must be > 0"):
        sequence_logprobs(_bigram(), pack_batch([[1]], [[2]], pad_id=PAD), temperature=0.0)
