"""Models a user brings: a GGUF file (written here with the ``gguf`` package, laid out as llama.cpp's converter lays
out a Llama) and a model folder without a chat template (``model.prompt_format``).

Run: .venv/bin/pytest tests/herl_core/test_models_gguf.py

The GGUF model is a tiny random Llama (2 layers, 4 query and 2 key/value heads, so the q/k permutation of llama.cpp
is exercised with grouped-query attention) with a 512-token cut of the SmolLM2 tokenizer: a conversion takes about a
second, where the full 49,152-token vocabulary takes ~20 s of metadata parsing in transformers.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from herl_core import models
from herl_core.config import Config, HindsightConfig, ModelConfig, RolloutConfig
from herl_core.models import (
    COMPLETE_MARK,
    PLAIN_SEPARATOR,
    SOURCE_FILE,
    ModelSourceError,
    adds_bos,
    check_model_source,
    encode_prompt,
    load_policy,
    load_tokenizer,
    save_checkpoint_weights,
)
from herl_core.records import PromptRecord, RewardResult, Rubric, Verdict

VOCAB = 512
Q = gguf.GGMLQuantizationType
TEXT = "Hello, world! It's 2024.\n\nNew paragraph   with spaces."


# --------------------------------------------------------------------------------------------------------------------
# a tiny Llama and its GGUF file


def small_tokenizer(add_bos: bool = False):
    """The SmolLM2 tokenizer cut to its first ``VOCAB`` tokens (the merges among them), with its chat template."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    full = load_tokenizer(ModelConfig(name_or_path="tiny"))
    data = json.loads(full.backend_tokenizer.to_str())
    vocab = {t: i for t, i in data["model"]["vocab"].items() if i < VOCAB}
    data["model"]["vocab"] = vocab
    data["model"]["merges"] = [
        m for m in data["model"]["merges"] if m[0] in vocab and m[1] in vocab and m[0] + m[1] in vocab
    ]
    data["added_tokens"] = [a for a in data["added_tokens"] if a["id"] < VOCAB]
    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(data)),
        bos_token="<|im_start|>", eos_token="<|im_end|>", unk_token="<|endoftext|>", pad_token="<|im_end|>",
    )  # fmt: skip
    tok.chat_template = full.chat_template
    tok.add_bos_token = add_bos
    return tok


def tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5, tie_word_embeddings=True,
        bos_token_id=1, eos_token_id=2, pad_token_id=2,
    )  # fmt: skip
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):  # norms of ones would hide a mix-up between the two norms of a layer
                p.data.uniform_(0.5, 1.5)
    return model.eval()


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's rotary layout of q/k rows: each head's two halves interleaved (transformers undoes this)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


LAYER_TENSORS = {
    "attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}  # fmt: skip


def write_llama_gguf(path: Path, model, tok, qtype=Q.F32, chat_template: bool = True) -> Path:
    """Write ``model`` + ``tok`` as a llama.cpp-style GGUF: llama.* hyper-parameters, a gpt2 (byte-level BPE)
    tokenizer, ``token_embd`` / ``blk.N.*`` / ``output_norm`` tensors (no ``output``: tied embeddings), 2-D weights
    in ``qtype``, norms in F32 (as llama.cpp keeps them)."""
    c = model.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("herl tiny test llama")
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    w.add_vocab_size(c.vocab_size)
    data = json.loads(tok.backend_tokenizer.to_str())
    tokens = sorted(data["model"]["vocab"], key=data["model"]["vocab"].get)
    special = {a["id"] for a in data["added_tokens"] if a["special"]}
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types([gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL for i in range(len(tokens))])
    w.add_token_merges([" ".join(m) for m in data["model"]["merges"]])
    w.add_bos_token_id(tok.bos_token_id)
    w.add_eos_token_id(tok.eos_token_id)
    w.add_unk_token_id(tok.unk_token_id)
    w.add_pad_token_id(tok.pad_token_id)
    w.add_add_bos_token(adds_bos(tok))
    if chat_template:
        w.add_chat_template(tok.chat_template)

    def put(name: str, t: torch.Tensor) -> None:
        a = t.detach().float().numpy()
        if a.ndim == 1 or qtype == Q.F32:
            w.add_tensor(name, a.astype(np.float32))
        elif qtype == Q.F16:
            w.add_tensor(name, a.astype(np.float16))
        else:
            packed = gguf.quants.quantize(a, qtype)
            w.add_tensor(name, packed, raw_shape=packed.shape, raw_dtype=qtype)

    sd = model.state_dict()
    put("token_embd.weight", sd["model.embed_tokens.weight"])
    put("output_norm.weight", sd["model.norm.weight"])
    for i in range(c.num_hidden_layers):
        for short, long in LAYER_TENSORS.items():
            t = sd[f"model.layers.{i}.{long}.weight"]
            if short in ("attn_q", "attn_k"):
                heads = c.num_attention_heads if short == "attn_q" else c.num_key_value_heads
                t = torch.from_numpy(_permute(t.numpy(), heads))
            put(f"blk.{i}.{short}.weight", t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """(the GGUF file in F32, the model and tokenizer it was written from)."""
    model, tok = tiny_llama(), small_tokenizer()
    path = write_llama_gguf(tmp_path_factory.mktemp("gguf") / "tiny-llama.gguf", model, tok)
    return path, model, tok


def _cfg(path: Path, cache: Path, **kw) -> ModelConfig:
    return ModelConfig(name_or_path=str(path), cache_dir=str(cache), **kw)


# --------------------------------------------------------------------------------------------------------------------
# loading a GGUF file


def test_a_gguf_file_loads_with_the_written_weights_and_tokenizer(written, tmp_path):
    path, want, want_tok = written
    model, tok = load_policy(_cfg(path, tmp_path / "cache"))
    got = model.state_dict()
    assert got.keys() == want.state_dict().keys()
    for key, value in want.state_dict().items():
        assert torch.equal(got[key], value), key  # F32 in, float32 out: the same numbers, q/k un-permuted
    assert model.config.tie_word_embeddings and model.config.num_key_value_heads == 2
    assert "quantization_config" not in model.config.to_dict()  # a plain dense model
    ids = torch.tensor([want_tok(TEXT)["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, want(input_ids=ids).logits, rtol=0, atol=0)
    # the tokenizer came through the GGUF metadata: same ids, special tokens, chat template
    assert tok(TEXT, add_special_tokens=False)["input_ids"] == want_tok(TEXT, add_special_tokens=False)["input_ids"]
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.padding_side) == (1, 2, 2, "left")
    assert encode_prompt(tok, "Name a color.", "Be brief.") == encode_prompt(want_tok, "Name a color.", "Be brief.")
    assert tok.decode(encode_prompt(tok, "Hi")).endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    # the conversion: <cache>/gguf/<stem>-<sha256[:16]>-<dtype>, marked complete, with its source recorded
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    folder = tmp_path / "cache" / "gguf" / f"tiny-llama-{digest[:16]}-float32"
    assert (folder / COMPLETE_MARK).is_file() and (folder / "model.safetensors").is_file()
    source = json.loads((folder / SOURCE_FILE).read_text())
    assert (source["gguf"], source["sha256"], source["bytes"]) == (str(path), digest, path.stat().st_size)
    lock = f".{folder.name}.lock"  # build_atomically's lock; .sha256 holds the memoised file digest
    assert sorted(p.name for p in (tmp_path / "cache" / "gguf").iterdir()) == sorted([".sha256", lock, folder.name])


def test_the_second_load_uses_the_cache(written, tmp_path, monkeypatch):
    path, want, _ = written
    cfg = _cfg(path, tmp_path / "cache")
    load_policy(cfg)
    (folder,) = (p for p in (tmp_path / "cache" / "gguf").iterdir() if p.name.startswith("tiny-llama-"))
    mark = (folder / COMPLETE_MARK).stat().st_mtime_ns

    def no_conversion(*args, **kwargs):
        raise AssertionError("converted again")

    def no_hashing(*args, **kwargs):
        raise AssertionError("the file was hashed again")

    monkeypatch.setattr(models, "convert_gguf", no_conversion)
    monkeypatch.setattr(hashlib, "file_digest", no_hashing)  # the digest is memoised per (path, size, mtime, inode)
    model, _ = load_policy(cfg)
    assert torch.equal(model.model.embed_tokens.weight, want.model.embed_tokens.weight)
    assert (folder / COMPLETE_MARK).stat().st_mtime_ns == mark
    assert check_model_source(cfg) == folder


def test_a_changed_file_is_converted_again(tmp_path, monkeypatch):
    path = tmp_path / "m.gguf"
    tok = small_tokenizer()
    write_llama_gguf(path, tiny_llama(seed=0), tok)
    cfg = _cfg(path, tmp_path / "cache")
    first = check_model_source(cfg)
    calls = []
    real = models.convert_gguf
    monkeypatch.setattr(models, "convert_gguf", lambda *a, **k: (calls.append(a[0]), real(*a, **k)))
    os.utime(path)  # touched, same bytes: hashed again (new mtime), same folder, no conversion
    assert check_model_source(cfg) == first and calls == []
    other = tiny_llama(seed=1)
    write_llama_gguf(path, other, tok)  # new weights under the same name
    model, _ = load_policy(cfg)
    assert calls == [path] and check_model_source(cfg) != first
    assert torch.equal(model.model.embed_tokens.weight, other.model.embed_tokens.weight)


def test_f16_weights_load_as_their_float16_values(tmp_path):
    want = tiny_llama()
    path = write_llama_gguf(tmp_path / "f16.gguf", want, small_tokenizer(), qtype=Q.F16)
    model, _ = load_policy(_cfg(path, tmp_path / "cache"))
    for key, value in want.state_dict().items():
        expected = value if value.ndim == 1 else value.half().float()  # norms stay F32
        assert torch.equal(model.state_dict()[key], expected), key


def test_q8_0_weights_are_dequantised_within_half_a_quantisation_step(tmp_path):
    want = tiny_llama()
    path = write_llama_gguf(tmp_path / "q8.gguf", want, small_tokenizer(), qtype=Q.Q8_0)
    model, _ = load_policy(_cfg(path, tmp_path / "cache"))
    for key, value in want.state_dict().items():
        got = model.state_dict()[key]
        if value.ndim == 1:
            assert torch.equal(got, value), key
            continue
        # Q8_0: blocks of 32 along a row, q = round(x / d) with d = max|x| / 127, stored as q · fp16(d). So
        # |x - q·fp16(d)| <= d/2 + 127·|d - fp16(d)| <= d/2 + 127·d·2^-11 < 0.57·d per block.
        blocks = value.reshape(-1, 32)
        step = blocks.abs().amax(dim=1, keepdim=True) / 127
        err = (got.reshape(-1, 32) - blocks).abs()
        assert bool((err <= 0.57 * step).all()), key
        assert bool((err > 0).any()), key  # really quantised, not passed through


def test_bf16_conversion_is_its_own_cache_folder(written, tmp_path):
    path, want, _ = written
    model, _ = load_policy(_cfg(path, tmp_path / "cache", dtype="bfloat16"))
    assert model.dtype == torch.bfloat16
    assert torch.equal(model.model.embed_tokens.weight, want.model.embed_tokens.weight.bfloat16())
    names = sorted(p.name for p in (tmp_path / "cache" / "gguf").iterdir() if not p.name.startswith("."))
    assert len(names) == 1 and names[0].endswith("-bfloat16")


def test_a_gguf_file_without_the_suffix_is_recognised_by_its_magic(written, tmp_path):
    path, want, _ = written
    bare = tmp_path / "model-file"
    bare.write_bytes(path.read_bytes())
    model, _ = load_policy(_cfg(bare, tmp_path / "cache"))
    assert torch.equal(model.model.norm.weight, want.model.norm.weight)


def _unsupported_architecture(path: Path) -> None:
    w = gguf.GGUFWriter(str(path), "rwkv6")  # a GGUF architecture transformers' loader does not know
    w.add_name("x")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.close()


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: None, "model.name_or_path: GGUF file {p} does not exist"),
        (lambda p: p.write_text("not a model\n"), "model.name_or_path: {p} is not a GGUF file (it starts with "
                                                  "b'not '; a GGUF file starts with b'GGUF')"),
        (lambda p: p.mkdir(), "model.name_or_path: {p} is not a file (a .gguf path must name a GGUF file)"),
        (lambda p: p.write_bytes(b"GGUF" + bytes(60)), "model.name_or_path: transformers {v} could not convert the "
                                                      "GGUF file {p} (64 bytes): "),
        (_unsupported_architecture, "model.name_or_path: {p}: transformers {v} cannot load GGUF architecture "
                                    "'rwkv6' (its GGUF loader knows "),
    ],
    ids=["missing", "not_gguf", "folder", "damaged", "architecture"],
)  # fmt: skip
def test_a_bad_gguf_path_is_a_clear_error_and_leaves_no_conversion(tmp_path, make, message):
    import transformers

    path = tmp_path / "model.gguf"
    make(path)
    with pytest.raises(ModelSourceError) as err:
        check_model_source(_cfg(path, tmp_path / "cache"))
    assert str(err.value).startswith(message.format(p=path, v=transformers.__version__)), str(err.value)
    cache = tmp_path / "cache" / "gguf"
    left = sorted(p.name for p in cache.iterdir()) if cache.exists() else []
    assert [n for n in left if n != ".sha256" and not n.endswith(".lock")] == []  # no folder, whole or half


# --------------------------------------------------------------------------------------------------------------------
# models without a chat template: model.prompt_format


@pytest.fixture(scope="module")
def no_template_gguf(tmp_path_factory):
    """A GGUF without tokenizer.chat_template whose tokenizer adds BOS (as many base models' do)."""
    model, tok = tiny_llama(), small_tokenizer(add_bos=True)
    assert tok("a")["input_ids"][0] == tok.bos_token_id == 1
    return write_llama_gguf(tmp_path_factory.mktemp("gguf") / "base.gguf", model, tok, chat_template=False)


def test_plain_prompts_start_with_bos_once_when_the_tokenizer_adds_it(no_template_gguf, tmp_path):
    cfg = _cfg(no_template_gguf, tmp_path / "cache")
    _, tok = load_policy(cfg)
    assert tok.chat_template is None and adds_bos(tok)
    body = tok("Name a color." + PLAIN_SEPARATOR, add_special_tokens=False)["input_ids"]
    assert encode_prompt(tok, "Name a color.") == [1, *body]
    assert tok.decode(encode_prompt(tok, "Name a color.")) == "<|im_start|>Name a color.\n\n"
    assert tok.decode(encode_prompt(tok, "Name a color.", "Be brief.")) == "<|im_start|>Be brief.\n\nName a color.\n\n"
    # the raw (hindsight) prompt: the text itself, BOS as the tokenizer needs it, no EOS
    assert encode_prompt(tok, "Revise it.", chat=False) == [
        1,
        *tok("Revise it.", add_special_tokens=False)["input_ids"],
    ]
    # a text that already starts with the BOS token does not get a second one
    assert encode_prompt(tok, "<|im_start|>Hi", chat=False).count(1) == 1
    with pytest.raises(ModelSourceError) as err:
        check_model_source(cfg.model_copy(update={"prompt_format": "chat"}))
    assert str(err.value).startswith("model.prompt_format: 'chat', but the tokenizer of ")
    assert "has no chat template. Set model.prompt_format: plain" in str(err.value)


@pytest.fixture(scope="module")
def no_template_folder(tmp_path_factory):
    """The tiny model saved as a folder whose tokenizer has no chat template (SmolLM2's adds no BOS)."""
    model, tok = load_policy(ModelConfig(name_or_path="tiny"))
    tok.chat_template = None
    folder = save_checkpoint_weights(model, tok, tmp_path_factory.mktemp("models") / "base")
    assert not (folder / "chat_template.jinja").exists()
    assert not json.loads((folder / "tokenizer_config.json").read_text()).get("chat_template")
    return folder


def test_prompt_format_auto_falls_back_to_plain_and_chat_is_a_clear_error(no_template_folder, caplog):
    with caplog.at_level("WARNING", logger="herl_core.models"):
        _, tok = load_policy(ModelConfig(name_or_path=str(no_template_folder)))
    assert "has no chat template: prompts are plain text (model.prompt_format: auto)" in caplog.text
    assert not adds_bos(tok)
    assert encode_prompt(tok, "Name a color.") == tok("Name a color.\n\n", add_special_tokens=False)["input_ids"]
    for fmt in ("auto", "plain"):
        _, again = load_policy(ModelConfig(name_or_path=str(no_template_folder), prompt_format=fmt))
        assert encode_prompt(again, "Name a color.") == encode_prompt(tok, "Name a color.")
    # 'chat' is refused before anything loads, naming the option (not transformers' own error)
    cfg = ModelConfig(name_or_path=str(no_template_folder), prompt_format="chat")
    with pytest.raises(ModelSourceError) as err:
        check_model_source(cfg)
    assert str(err.value) == (
        f"model.prompt_format: 'chat', but the tokenizer of {no_template_folder} has no chat template. Set "
        "model.prompt_format: plain (prompts as plain text, for base models) or auto (the chat template when there "
        "is one, else plain)"
    )
    with pytest.raises(ModelSourceError, match="model.prompt_format: 'chat'"):
        load_policy(cfg)
    # a tokenizer made elsewhere (no herl prompt format) without a template: the same option is named
    from transformers import AutoTokenizer

    bare = AutoTokenizer.from_pretrained(no_template_folder)
    with pytest.raises(ModelSourceError, match="the tokenizer has no chat template. Set model.prompt_format: plain"):
        encode_prompt(bare, "Hi")


def test_prompt_format_plain_on_a_chat_model_ignores_its_template():
    _, tok = load_policy(ModelConfig(name_or_path="tiny", prompt_format="plain"))
    assert tok.chat_template  # SmolLM2's, unused
    assert tok.decode(encode_prompt(tok, "Hi", "Be brief.")) == "Be brief.\n\nHi\n\n"
    _, chat = load_policy(ModelConfig(name_or_path="tiny"))  # auto on a chat model: today's chat template
    assert tok.decode(encode_prompt(chat, "Hi", "Be brief.")).startswith("<|im_start|>system\nBe brief.<|im_end|>")


def _cats() -> PromptRecord:
    return PromptRecord(id="p0", prompt="Write a note about cats.", rubrics=[Rubric(id="punctuation:no_comma")])


def test_rollout_and_hindsight_prompts_use_the_plain_format(no_template_folder):
    from herl_core.hindsight.prompt import build_hindsight_prompt
    from herl_core.hindsight.step import collect_jobs
    from herl_core.rollout.groups import encode_prompts
    from herl_core.samples import Group, Sample

    _, tok = load_policy(ModelConfig(name_or_path=str(no_template_folder)))
    record = _cats()
    (prompt_ids,) = encode_prompts([record], tok, RolloutConfig())
    assert tok.decode(prompt_ids) == record.prompt + "\n\n"
    verdicts = [Verdict(rubric_id="punctuation:no_comma", description="No commas.", passed=False)]
    reward = RewardResult(score=0.0, dense=0.0, verdicts=verdicts)
    group = Group(record, prompt_ids, [Sample(prompt_ids, [5, 2], "a, b", reward, 0.0) for _ in range(2)])
    instruction = record.prompt + "\n\n"  # the decoded prompt (§3.5): the plain format's text
    text = build_hindsight_prompt(instruction, verdicts, "a, b")
    for chat, expected in ((False, text), (True, text + "\n\n")):
        (job,) = collect_jobs([group], tok, HindsightConfig(hindsight_chat_template=chat, candidate_limit=1), 6144)
        assert job.hindsight_prompt == text and tok.decode(job.prompt_ids) == expected


def test_evaluation_uses_the_plain_format(no_template_folder, tmp_path, monkeypatch):
    import herl_core.rollout as rollout
    from herl_core.io import write_jsonl_atomic
    from herl_core.stages import run_evaluate

    seen: list[list[int]] = []
    real = rollout.make_engine

    def spy(*args, **kwargs):
        engine = real(*args, **kwargs)
        generate = engine.generate

        def record(prompts, n, sampling):
            seen.extend(prompts)
            return generate(prompts, n, sampling)

        engine.generate = record
        return engine

    monkeypatch.setattr(rollout, "make_engine", spy)
    records = [_cats(), PromptRecord(id="p1", prompt="Say hi.", rubrics=[Rubric(id="punctuation:no_comma")])]
    write_jsonl_atomic(tmp_path / "prepared" / "ifeval.jsonl", records)
    cfg = Config.model_validate(
        {
            "model": {"name_or_path": str(no_template_folder), "device": "cpu"},
            "prepare": {"out_dir": str(tmp_path / "prepared")},
            "evaluate": {"benchmarks": ["ifeval"], "max_new_tokens": 2, "policy": str(no_template_folder),
                         "out_dir": str(tmp_path / "eval")},
        }
    )  # fmt: skip
    run_evaluate(cfg)
    _, tok = load_policy(cfg.model)
    # in the engine's order (by length, batch by batch): compare as sets of prompts
    assert sorted(seen) == sorted(tok(r.prompt + "\n\n", add_special_tokens=False)["input_ids"] for r in records)
