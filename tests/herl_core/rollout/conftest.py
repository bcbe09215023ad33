"""Fixtures shared by the rollout-engine tests (test_hf.py, test_ray.py)."""

from __future__ import annotations

import pytest
import torch

from herl_core.config import ModelConfig, TinyModelConfig
from herl_core.models import encode_prompt, load_policy


@pytest.fixture(scope="module")
def policy():
    """The tiny random model with its weights redrawn at std 1: peaked next-token distributions, so greedy outputs
    differ between prompts and between steps (order, padding and trimming checks are meaningful)."""
    tiny = TinyModelConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64)
    model, tok = load_policy(ModelConfig(name_or_path="tiny", tiny=tiny))
    with torch.no_grad(), torch.random.fork_rng():
        torch.manual_seed(0)
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 1.0)
    return model, tok


@pytest.fixture(scope="module")
def prompts(policy):
    """Three encoded prompts of different lengths: a chat prompt, a 1-token raw one, a short chat prompt."""
    _, tok = policy
    return [
        encode_prompt(tok, "Tell me a story about a cat."),
        encode_prompt(tok, "hi", chat=False),
        encode_prompt(tok, "Write a poem"),
    ]
