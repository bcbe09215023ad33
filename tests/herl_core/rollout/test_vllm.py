"""herl_core.rollout.vllm in herl's main environment (no vLLM): the import guard and the pure helpers. The engine
itself is tested for real in the vLLM environment: tests/vllm/ (``bash scripts/setup.sh --vllm``).

Run: .venv/bin/pytest tests/herl_core/rollout/test_vllm.py
"""

from __future__ import annotations

import importlib

import pytest
import torch

from herl_core.config import EngineConfig, ModelConfig, TinyModelConfig
from herl_core.rollout import make_engine
from herl_core.rollout.vllm_worker import ALIGN, layout_for, map_shared, views


def test_module_imports_without_vllm():
    mod = importlib.import_module("herl_core.rollout.vllm")
    assert hasattr(mod, "VLLMEngine") and "scripts/setup.sh --vllm" in mod.INSTALL_HINT


def test_constructor_without_vllm_raises_with_install_hint(monkeypatch):
    mod = importlib.import_module("herl_core.rollout.vllm")
    monkeypatch.setattr(mod, "vllm_available", lambda: False)
    with pytest.raises(ImportError, match=r"bash scripts/setup.sh --vllm.*rollout.engine.backend: hf"):
        mod.VLLMEngine(model=None, tokenizer=None)
    with pytest.raises(ImportError, match="needs vLLM"):
        make_engine(EngineConfig(backend="vllm"), model=None, tokenizer=None)


def test_layout_packs_aligned_slots():
    layout, size = layout_for([("a", torch.float32, (3,)), ("b", torch.bfloat16, (2, 5)), ("c", torch.int64, ())])
    # a: 12 bytes -> slot 64; b: 20 bytes at 64 -> slot to 128; c: 8 bytes at 128 -> 192
    assert layout == [("a", "float32", [3], 0), ("b", "bfloat16", [2, 5], 64), ("c", "int64", [], 128)]
    assert size == 192 and all(off % ALIGN == 0 for *_, off in layout)


def test_shared_buffer_round_trip_across_mappings(tmp_path):
    """What the trainer writes through one mapping, a second mapping of the same file reads (as the worker does)."""
    mod = importlib.import_module("herl_core.rollout.vllm")
    state = {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3), "n": torch.tensor([7, 8])}
    shared = mod.SharedWeights(state, torch.bfloat16)
    shared.write(state)
    other = dict(views(map_shared(shared.path, shared.size), shared.layout))
    assert other["w"].dtype == torch.bfloat16 and other["w"].tolist() == [[0, 1, 2], [3, 4, 5]]
    assert other["n"].dtype == torch.int64 and other["n"].tolist() == [7, 8]
    state["w"] += 0.5
    shared.write(state)  # the second mapping sees the new values without being re-opened
    assert other["w"].tolist() == [[0.5, 1.5, 2.5], [3.5, 4.5, 5.5]]
    with pytest.raises(ValueError, match=r"w has shape \[3, 2\], the engine holds \[2, 3\]"):
        shared.write({"w": torch.zeros(3, 2), "n": state["n"]})
    shared.unlink()
    assert not __import__("os").path.exists(shared.path)


def test_policy_state_sends_tied_weights_once_and_lora_merged():
    from herl_core.config import LoraConfig
    from herl_core.models import load_policy, merged_state_dict

    mod = importlib.import_module("herl_core.rollout.vllm")
    tiny = TinyModelConfig(hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2)
    model, _ = load_policy(ModelConfig(name_or_path="tiny", tiny=tiny))
    state = mod.policy_state(model)
    assert "model.embed_tokens.weight" in state and "lm_head.weight" not in state  # tied: one tensor
    lora, _ = load_policy(ModelConfig(name_or_path="tiny", tiny=tiny, lora=LoraConfig(enabled=True, r=2, alpha=4)))
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.fill_(0.1)  # B != 0: merged weights differ from the base weights
    merged = merged_state_dict(lora)
    sent = mod.policy_state(lora)
    assert not any("lora_" in k or "base_layer" in k for k in sent)
    q = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(sent[q], merged[q]) and not torch.equal(sent[q], lora.get_base_model().state_dict()[
        "model.layers.0.self_attn.q_proj.base_layer.weight"])  # fmt: skip
