"""herl_core.rollout.vllm: import guard everywhere; real generation only where vLLM and CUDA exist.

Run: .venv/bin/pytest tests/herl_core/rollout/test_vllm.py
"""

from __future__ import annotations

import importlib

import pytest
import torch

from herl_core.config import EngineConfig, ModelConfig, TinyModelConfig
from herl_core.rollout import make_engine
from herl_core.rollout.base import SamplingParams

GPU = importlib.util.find_spec("vllm") is not None and torch.cuda.is_available()


def test_module_imports_without_vllm():
    mod = importlib.import_module("herl_core.rollout.vllm")
    assert hasattr(mod, "VLLMEngine") and "docs/scaling.md" in mod.INSTALL_HINT


def test_constructor_without_vllm_raises_with_install_hint(monkeypatch):
    mod = importlib.import_module("herl_core.rollout.vllm")
    monkeypatch.setattr(mod, "vllm_available", lambda: False)
    with pytest.raises(ImportError, match=r"separate GPU environment as docs/scaling.md.*rollout.engine.backend: hf"):
        mod.VLLMEngine(model=None, tokenizer=None)
    with pytest.raises(ImportError, match="needs vLLM and a CUDA GPU"):
        make_engine(EngineConfig(backend="vllm"), model=None, tokenizer=None)


@pytest.mark.skipif(not GPU, reason="needs vllm and a CUDA GPU")
def test_vllm_generate_and_sync(tmp_path):
    from herl_core.models import encode_prompt, load_policy
    from herl_core.rollout.vllm import VLLMEngine

    tiny = TinyModelConfig(hidden_size=64, num_layers=2, num_heads=4)
    model, tok = load_policy(ModelConfig(name_or_path="tiny", tiny=tiny))
    engine = VLLMEngine(model, tok, gpu_memory_utilization=0.2, work_dir=tmp_path)
    prompts = [encode_prompt(tok, "hi"), encode_prompt(tok, "Write a poem")]
    gens = engine.generate(prompts, 2, SamplingParams(max_new_tokens=5, seed=0))
    assert [g.prompt_ids for g in gens] == [p for p in prompts for _ in range(2)]
    assert all(len(g.logprobs) == len(g.completion_ids) <= 5 for g in gens)
    engine.sync_weights()
    assert engine.version == 2 and sorted(p.name for p in tmp_path.iterdir()) == ["v2"]
