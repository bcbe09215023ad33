"""The real embedded SmolLM2-135M-Instruct (marked smollm2: uses the default cache, converted once, ~20 s).

Run: .venv/bin/pytest tests/herl_core/test_models_smollm2.py -m smollm2
"""

from __future__ import annotations

import time

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from herl_core import models
from herl_core.config import ModelConfig
from herl_core.models import COMPLETE_MARK, encode_prompt, ensure_smollm2, is_complete, load_policy

pytestmark = pytest.mark.smollm2


@pytest.fixture(scope="module")
def folder():
    return ensure_smollm2()


def test_second_call_reuses_the_folder_without_converting(folder, monkeypatch):
    mark = (folder / COMPLETE_MARK).stat().st_mtime_ns

    def no_conversion(out):
        raise AssertionError("ensure_smollm2 converted again")

    monkeypatch.setattr(models, "_convert_smollm2", no_conversion)
    start = time.perf_counter()
    assert ensure_smollm2() == folder
    assert time.perf_counter() - start < 1.0
    assert (folder / COMPLETE_MARK).stat().st_mtime_ns == mark
    assert {"config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja"} <= {
        p.name for p in folder.iterdir()
    }


def test_plain_transformers_loads_it_and_greedy_answer_is_sensible(folder):
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(folder)
    assert model.num_parameters() == 134_515_008 and "quantization_config" not in model.config.to_dict()
    ids = torch.tensor([encode_prompt(tok, "What is the capital of France? Answer in one sentence.")])
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


def test_load_policy_default_is_smollm2_with_pad_eq_eos(folder):
    model, tok = load_policy(ModelConfig())
    assert model.config.vocab_size == 49152 and model.dtype == torch.float32
    assert tok.pad_token == tok.eos_token == "<|im_end|>" and tok.pad_token_id == 2
    assert tok.padding_side == "left"


def test_interrupted_conversion_does_not_count(tmp_path, monkeypatch):
    # what a killed conversion leaves: a temp folder with partial weights, never a marked target
    partial = tmp_path / ".smollm2-135m-instruct.tmp-killed"
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"\0" * 16)
    assert not is_complete(tmp_path / "smollm2-135m-instruct")
    calls = []
    monkeypatch.setattr(models, "_convert_smollm2", lambda out: calls.append(out))
    folder = ensure_smollm2(tmp_path)
    assert len(calls) == 1 and is_complete(folder) and not partial.exists()


def test_the_wheel_s_gguf_through_the_generic_gguf_route_equals_the_default(folder, tmp_path):
    # a real quantised GGUF (Q4_1 / Q8_0 tensors) named by its path, as a user's model.name_or_path would be
    import hashlib
    import json

    from safetensors.torch import load_file

    from herl_core.models import GGUF_FILE, SOURCE_FILE, gguf_dir

    path = gguf_dir() / GGUF_FILE
    model, tok = load_policy(ModelConfig(name_or_path=str(path), cache_dir=str(tmp_path)))
    (converted,) = (p for p in (tmp_path / "gguf").iterdir() if not p.name.startswith("."))
    want = load_file(str(folder / "model.safetensors"))
    got = load_file(str(converted / "model.safetensors"))
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    assert tok.chat_template and tok.eos_token == "<|im_end|>" and model.num_parameters() == 134_515_008
    source = json.loads((converted / SOURCE_FILE).read_text())
    assert source["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert converted.name == f"SmolLM2-135M-Instruct.Q4_1-{source['sha256'][:16]}-float32"
