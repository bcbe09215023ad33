"""herl_core.models: cache, tiny model, loading rules, prompts, checkpoints.

Run: .venv/bin/pytest tests/herl_core/test_models.py

Uses the SmolLM2 tokenizer from the default cache (converted model or tokenizer alone, built once if missing).
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from herl_core import models
from herl_core.config import ModelConfig, TinyModelConfig
from herl_core.models import (
    COMPLETE_MARK,
    ModelSourceError,
    build_atomically,
    build_tiny,
    cache_dir,
    encode_prompt,
    is_complete,
    load_policy,
    save_checkpoint_weights,
)

TINY = ModelConfig(name_or_path="tiny", tiny=TinyModelConfig(hidden_size=32, num_layers=1, num_heads=2))


@pytest.fixture(scope="module")
def tiny():
    return load_policy(TINY)


# -------------------------------------------------------------------------------------------------- cache folders


def test_cache_dir_precedence(monkeypatch, tmp_path):
    monkeypatch.delenv("HERL_CACHE", raising=False)
    assert cache_dir() == Path.home() / ".cache" / "herl"
    monkeypatch.setenv("HERL_CACHE", str(tmp_path / "env"))
    assert cache_dir() == tmp_path / "env"
    assert cache_dir(ModelConfig()) == tmp_path / "env"
    assert cache_dir(ModelConfig(cache_dir=str(tmp_path / "cfg"))) == tmp_path / "cfg"


def _writer(calls: list, delay: float = 0.0):
    def build(out: Path) -> None:
        calls.append(out)
        time.sleep(delay)
        (out / "weights.txt").write_text("w")

    return build


def test_build_atomically_builds_once_then_reuses(tmp_path):
    calls: list = []
    target = build_atomically(tmp_path / "m", _writer(calls))
    assert (target / "weights.txt").read_text() == "w" and is_complete(target)
    build_atomically(tmp_path / "m", _writer(calls))
    assert len(calls) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [".m.lock", "m"]  # no temp folder left


def test_interrupted_build_leaves_nothing_complete(tmp_path):
    def crash(out: Path) -> None:
        (out / "half.bin").write_text("x")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        build_atomically(tmp_path / "m", crash)
    assert not (tmp_path / "m").exists()
    assert not list(tmp_path.glob(".m.tmp-*"))


def test_leftovers_of_a_killed_build_are_not_complete_and_get_rebuilt(tmp_path):
    # a killed process leaves its temp folder, and an unmarked target counts as incomplete too
    (tmp_path / ".m.tmp-dead").mkdir()
    (tmp_path / ".m.tmp-dead" / "model.safetensors").write_text("partial")
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    assert not is_complete(tmp_path / "m")
    calls: list = []
    build_atomically(tmp_path / "m", _writer(calls))
    assert len(calls) == 1
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == [COMPLETE_MARK, "weights.txt"]
    assert not (tmp_path / ".m.tmp-dead").exists()


def test_concurrent_builders_build_once(tmp_path):
    calls: list = []
    threads = [threading.Thread(target=build_atomically, args=(tmp_path / "m", _writer(calls, 0.3))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and is_complete(tmp_path / "m")


def test_main_converts_into_given_cache(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(models, "_convert_smollm2", _writer([]))
    assert models.main([str(tmp_path)]) == 0
    assert capsys.readouterr().out.startswith(str(tmp_path / "smollm2-135m-instruct"))
    assert is_complete(tmp_path / "smollm2-135m-instruct")


# -------------------------------------------------------------------------------------------------- tiny model


def test_tiny_is_deterministic_and_leaves_global_rng_alone():
    state = torch.get_rng_state()
    a, _ = build_tiny(TINY)
    b, _ = build_tiny(TINY)
    assert torch.equal(torch.get_rng_state(), state)
    for (name, pa), (_, pb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(pa, pb), name
    other = TINY.model_copy(update={"tiny": TINY.tiny.model_copy(update={"seed": 1})})
    c, _ = build_tiny(other)
    assert not torch.equal(a.model.embed_tokens.weight, c.model.embed_tokens.weight)


def test_tiny_has_smollm2_vocab_template_and_eos(tiny):
    model, tok = tiny
    assert model.config.vocab_size == 49152 and len(tok) == 49152
    assert model.config.hidden_size == 32 and model.config.num_hidden_layers == 1
    assert model.config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_id == 2
    assert tok.pad_token_id == 2 and tok.padding_side == "left"
    assert model.generation_config.eos_token_id == 2
    assert tok.chat_template and "<|im_start|>" in tok.chat_template


def test_tiny_dtype_from_config():
    model, _ = load_policy(TINY.model_copy(update={"dtype": "bfloat16"}))
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


# -------------------------------------------------------------------------------------------------- prompts


def test_encode_prompt_chat_and_raw(tiny):
    _, tok = tiny
    chat = encode_prompt(tok, "Name a color.", system_prompt="Be brief.")
    assert tok.decode(chat) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nName a color.<|im_end|>\n<|im_start|>assistant\n"
    )
    default = tok.decode(encode_prompt(tok, "Name a color."))
    assert default.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    raw = encode_prompt(tok, "Name a color.", chat=False)
    assert raw == tok("Name a color.", add_special_tokens=False)["input_ids"]
    assert tok.decode(raw) == "Name a color." and 1 not in raw and 2 not in raw  # no <|im_start|> / <|im_end|>


# -------------------------------------------------------------------------------------------------- checkpoints


def test_checkpoint_loads_with_plain_transformers(tiny, tmp_path):
    model, tok = tiny
    folder = save_checkpoint_weights(model, tok, tmp_path / "ckpt")
    names = {p.name for p in folder.iterdir()}
    assert "model.safetensors" in names and not any(n.endswith((".bin", ".pt", ".pkl")) for n in names)
    plain = AutoModelForCausalLM.from_pretrained(folder)
    ids = torch.tensor([encode_prompt(tok, "hello")])
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=0)
    assert AutoTokenizer.from_pretrained(folder).eos_token_id == 2
    # loading the folder through herl: local folder path, left padding kept
    again, tok2 = load_policy(ModelConfig(name_or_path=str(folder)))
    assert tok2.padding_side == "left" and tok2.pad_token_id == 2
    assert torch.equal(again.model.embed_tokens.weight, model.model.embed_tokens.weight)


def test_checkpoint_overwrite_replaces_folder(tiny, tmp_path):
    model, tok = tiny
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "stale.bin").write_text("old")
    save_checkpoint_weights(model, tok, tmp_path / "ckpt")
    assert not (tmp_path / "ckpt" / "stale.bin").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


# -------------------------------------------------------------------------------------------------- loading rules


def test_hub_id_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelSourceError, match=r"'Qwen/Qwen3-0.6B' is not a local folder.*offline.*local model folder"):
        load_policy(ModelConfig(name_or_path="Qwen/Qwen3-0.6B"))


def test_missing_local_folder_is_a_clear_error():
    with pytest.raises(ModelSourceError, match="local folder './no/such/model' does not exist"):
        load_policy(ModelConfig(name_or_path="./no/such/model"))


def _model_files(folder: Path) -> None:
    """What check_model_source wants of a folder besides config.json: safetensors weights and a tokenizer file."""
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(folder / "model.safetensors"))
    (folder / "tokenizer_config.json").write_text("{}")


def _remote_code_folder(root: Path) -> Path:
    """A folder whose config asks for code shipped with it; importing that code would create a sentinel file."""
    folder = root / "remote"
    folder.mkdir()
    _model_files(folder)
    sentinel = root / "code_ran"
    config = {
        "model_type": "herl_remote_test",
        "architectures": ["EvilModel"],
        "auto_map": {"AutoConfig": "configuration_evil.EvilConfig", "AutoModelForCausalLM": "modeling_evil.EvilModel"},
    }
    (folder / "config.json").write_text(json.dumps(config))
    code = f"open({str(sentinel)!r}, 'w').write('ran')\nfrom transformers import PretrainedConfig\n"
    (folder / "configuration_evil.py").write_text(code + "class EvilConfig(PretrainedConfig):\n    pass\n")
    (folder / "modeling_evil.py").write_text(code)
    return folder


def test_remote_code_is_refused_by_default(tmp_path):
    folder = _remote_code_folder(tmp_path)
    with pytest.raises(ValueError, match="trust_remote_code"):
        load_policy(ModelConfig(name_or_path=str(folder)))
    assert not (tmp_path / "code_ran").exists()


@pytest.mark.parametrize("trust", [False, True])
def test_trust_remote_code_is_passed_explicitly(monkeypatch, tmp_path, trust):
    seen: list[dict] = []

    class Spy:
        generation_config = type("G", (), {"pad_token_id": 2})()

        def to(self, device):
            return self

    def spy_model(where, **kwargs):
        seen.append(kwargs)
        return Spy()

    def spy_tok(where, **kwargs):
        seen.append(kwargs)
        return type("T", (), {"pad_token_id": 2, "padding_side": "right"})()

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", spy_model)
    monkeypatch.setattr(AutoTokenizer, "from_pretrained", spy_tok)
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    _model_files(tmp_path)
    load_policy(ModelConfig(name_or_path=str(tmp_path), trust_remote_code=trust))
    assert [kw["trust_remote_code"] for kw in seen] == [trust, trust]
    assert all(kw["local_files_only"] for kw in seen)


def test_model_device_resolution():
    import torch

    from herl_core.models import ModelSourceError, resolve_device

    assert resolve_device("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected  # auto follows what is visible
    if not torch.cuda.is_available():
        with pytest.raises(ModelSourceError, match="model.device: 'cuda' but no CUDA GPU"):
            resolve_device("cuda")
