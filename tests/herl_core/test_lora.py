"""LoRA (``model.lora``, herl_core/models.py ``apply_lora``): only adapters train, saved policies are plain merged HF
folders, HF rollouts run through the peft model, and a LoRA run resumes exactly.

Run: nice -n 19 env OMP_NUM_THREADS=1 .venv/bin/pytest tests/herl_core/test_lora.py -x -q
Tiny model (TinyModelConfig defaults): hidden 64, MLP 128, 2 layers, 4 heads = 4 KV heads, so q/k/v/o are 64→64.
"""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from herl_core.checkpoint import TrainerState, load_checkpoint, save_checkpoint
from herl_core.config import Config, LoraConfig, ModelConfig, TinyModelConfig
from herl_core.models import apply_lora, encode_prompt, is_lora, load_policy, save_checkpoint_weights
from herl_core.records import PromptRecord, Verdict
from herl_core.rewards.base import result_from_verdicts
from herl_core.rollout.base import SamplingParams
from herl_core.rollout.hf import HFEngine
from herl_core.train import Trainer

LORA_ON = {"enabled": True}


def tiny_cfg(tmp_path, lora: dict | None = None, **train) -> Config:
    tree = {
        "model": {"name_or_path": "tiny", "lora": lora or {}},
        "rollout": {"n": 4, "max_new_tokens": 8, "engine": {"generation_batch_size": 16}},
        "hindsight": {"rewrite_max_new_tokens": 8},
        "train": {
            "steps": 2, "prompts_per_step": 2, "mini_batch_prompts": 1, "micro_batch_size": 4, "lr": 1e-2,
            "out_dir": str(tmp_path / "policy"), "checkpoint_dir": str(tmp_path / "ckpt"),
            "report_dir": str(tmp_path / "reports"), "data": str(tmp_path / "train.jsonl"), **train,
        },
    }  # fmt: skip
    return Config.model_validate(tree)


class EvenLength:
    """A reward a random tiny model meets about half the time (1 if the response has an even number of characters),
    so groups are not flat and advantages, hence gradients, are non-zero."""

    def score(self, prompts, responses):
        return [
            result_from_verdicts([Verdict(rubric_id="even", description="even length", passed=len(r) % 2 == 0)], r)
            for r in responses
        ]


def trainer(cfg: Config, prompts: list[PromptRecord]) -> Trainer:
    model, tok = load_policy(cfg.model)
    return Trainer(cfg, prompts, model=model, tokenizer=tok, reward=EvenLength())


def weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def randomise_adapters(model, std: float = 0.5, seed: int = 1) -> None:
    """B starts at zero (the peft model equals its base); give it values so the adapters change the outputs."""
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.normal_(0.0, std)


@pytest.fixture(scope="module")
def stepped(tmp_path_factory, four_prompts):
    """A LoRA trainer before and after one step (2 prompts in one mini-batch: one update)."""
    t = trainer(tiny_cfg(tmp_path_factory.mktemp("step"), LORA_ON, mini_batch_prompts=2), four_prompts)
    before = weights(t.model)
    metrics = t.step()
    return t, before, metrics


# ---------------------------------------------------------------------------------------------------- parameters


@pytest.mark.parametrize(
    ("targets", "expected"),
    [
        # r·(in+out) per module = 16·(64+64) = 2048; 4 modules × 2 layers → 16,384
        (["q_proj", "k_proj", "v_proj", "o_proj"], 16 * (64 + 64) * 4 * 2),
        # + gate/up 64→128 and down 128→64: 16·192 = 3072 each → (4·2048 + 3·3072)·2 = 34,816; lm_head excluded
        ("all-linear", (4 * 16 * (64 + 64) + 3 * 16 * (64 + 128)) * 2),
    ],
)
def test_only_adapters_require_grad_and_their_count_is_r_times_in_plus_out(targets, expected):
    model, _ = load_policy(ModelConfig(name_or_path="tiny", lora={"enabled": True, "target_modules": targets}))
    assert is_lora(model)
    trainable = {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}
    assert sum(trainable.values()) == expected
    assert all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert sum(p.numel() for p in model.parameters() if not p.requires_grad) > 49152 * 64  # the frozen base


def test_lora_starts_at_the_base_model_with_a_seeded_init_and_leaves_the_global_rng_alone():
    base, _ = load_policy(ModelConfig(name_or_path="tiny"))
    ids = torch.tensor([[1, 5, 9, 200, 3000]])
    with torch.no_grad():
        want = base(input_ids=ids).logits
    rng = torch.get_rng_state()
    a = apply_lora(base, LoraConfig(enabled=True, seed=3))
    assert torch.equal(torch.get_rng_state(), rng)
    with torch.no_grad():
        assert torch.equal(a(input_ids=ids).logits, want)  # B = 0: W + (α/r)·0·A = W exactly
    b, _ = load_policy(ModelConfig(name_or_path="tiny", lora={"enabled": True, "seed": 3}))
    c, _ = load_policy(ModelConfig(name_or_path="tiny", lora={"enabled": True, "seed": 4}))
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight"
    assert torch.equal(a.state_dict()[key], b.state_dict()[key])
    assert not torch.equal(b.state_dict()[key], c.state_dict()[key])


def test_lora_disabled_keeps_the_plain_model(tmp_path):
    model, tok = load_policy(ModelConfig(name_or_path="tiny"))
    assert not is_lora(model) and type(model).__name__ == "LlamaForCausalLM"
    assert all(p.requires_grad for p in model.parameters())
    folder = save_checkpoint_weights(model, tok, tmp_path / "plain")
    assert not (folder / "adapter_config.json").exists()
    again = AutoModelForCausalLM.from_pretrained(folder)
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in model.state_dict().items())


# ---------------------------------------------------------------------------------------------------- training


def test_a_trainer_step_changes_only_adapter_weights(stepped):
    t, before, metrics = stepped
    assert math.isfinite(metrics["actor/loss"]) and metrics["actor/updates"] == 1
    assert metrics["reward/frac_zero_std"] < 1.0  # some group has a non-zero advantage
    after = weights(t.model)
    adapter = [k for k in before if ".lora_" in k]
    base = [k for k in before if ".lora_" not in k]
    assert len(adapter) == 2 * 4 * 2  # A and B × 4 modules × 2 layers
    assert all(torch.equal(before[k], after[k]) for k in base)  # bit-identical
    # B starts at 0 and moves only through its gradient (weight decay of 0 is 0): a real update happened
    assert any(not torch.equal(before[k], after[k]) for k in adapter if ".lora_B." in k)
    n_opt = sum(p.numel() for g in t.optimizer.param_groups for p in g["params"])
    assert n_opt == 16 * (64 + 64) * 4 * 2  # the optimizer holds the adapters only
    # AdamW state = 2 fp32 moments per trainable parameter: 2 · 4 B · 16,384 = 131,072 bytes (docs/models.md)
    moments = [v for s in t.optimizer.state.values() for k, v in s.items() if k in ("exp_avg", "exp_avg_sq")]
    assert sum(v.numel() * v.element_size() for v in moments) == 2 * 4 * 16384


def test_saved_policy_is_a_plain_merged_model_with_the_live_logits(stepped, tmp_path):
    t, _, _ = stepped
    randomise_adapters(t.model)  # make the merge matter (one step moves B only a little)
    live = weights(t.model)
    folder = save_checkpoint_weights(t.model, t.tokenizer, tmp_path / "policy")
    assert all(torch.equal(live[k], v) for k, v in t.model.state_dict().items())  # the live model is untouched
    assert is_lora(t.model) and not any(m.merged for m in t.model.modules() if hasattr(m, "merged_adapters"))
    assert not (folder / "adapter_config.json").exists()
    plain = AutoModelForCausalLM.from_pretrained(folder)  # no peft involved
    assert type(plain).__name__ == "LlamaForCausalLM"
    assert not any("lora" in k for k in plain.state_dict())
    ids = torch.tensor([[1, 5, 9, 200, 3000, 17, 42]])
    t.model.eval()
    with torch.no_grad():
        want, got = t.model(input_ids=ids).logits, plain(input_ids=ids).logits
        base = t.model.get_base_model()
        with t.model.disable_adapter():
            without = base(input_ids=ids).logits
    assert torch.allclose(got, want, atol=1e-5)
    assert (without - want).abs().max() > 1e-3  # the adapters do change the model


def test_hf_engine_generates_through_the_peft_model_like_the_merged_model(tmp_path):
    tiny = TinyModelConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64)
    model, tok = load_policy(ModelConfig(name_or_path="tiny", tiny=tiny))
    with torch.no_grad(), torch.random.fork_rng(devices=[]):  # peaked distributions (as tests/…/test_hf.py)
        torch.manual_seed(0)
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 1.0)
    peft_model = apply_lora(model, LoraConfig(enabled=True, r=4))
    randomise_adapters(peft_model)
    plain = AutoModelForCausalLM.from_pretrained(save_checkpoint_weights(peft_model, tok, tmp_path / "merged"))
    prompts = [encode_prompt(tok, "Tell me a story about a cat."), encode_prompt(tok, "hi", chat=False)]
    sampling = SamplingParams(temperature=1.0, max_new_tokens=6, seed=0)
    # n = 3: each prompt repeats, so the shared-prefill path (model(..., past_key_values, logits_to_keep)) runs
    got = HFEngine(peft_model, tok, batch_size=8).generate(prompts, 3, sampling)
    want = HFEngine(plain, tok, batch_size=8).generate(prompts, 3, sampling)
    assert [g.completion_ids for g in got] == [g.completion_ids for g in want]
    for a, b in zip(got, want, strict=True):
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-4)
    assert peft_model.training  # the engine restores the mode it found
    with peft_model.disable_adapter():  # the adapters matter: the base model samples other tokens
        base = HFEngine(peft_model, tok, batch_size=8).generate(prompts, 3, sampling)
    assert [g.completion_ids for g in base] != [g.completion_ids for g in got]


# ---------------------------------------------------------------------------------------------------- resume


def test_lora_resume_restores_adapters_and_optimizer_and_continues_identically(tmp_path, four_prompts):
    full = trainer(tiny_cfg(tmp_path / "full", LORA_ON), four_prompts)
    full.train()
    cfg = tiny_cfg(tmp_path / "split", LORA_ON)
    first = trainer(cfg, four_prompts)
    first.train(steps=1)
    folder = first.save(cfg.train.checkpoint_dir)
    assert (tmp_path / "split/ckpt/step-000001/adapter/adapter_config.json").is_file()
    assert type(AutoModelForCausalLM.from_pretrained(folder)).__name__ == "LlamaForCausalLM"
    resumed = trainer(cfg, four_prompts)
    assert resumed.resume(cfg.train.checkpoint_dir) and resumed.state.step == 1
    saved, loaded = first.optimizer.state_dict()["state"], resumed.optimizer.state_dict()["state"]
    assert saved.keys() == loaded.keys() and all(
        torch.equal(saved[i][k], loaded[i][k]) for i in saved for k in saved[i]
    )  # fmt: skip
    assert all(torch.equal(v, resumed.model.state_dict()[k]) for k, v in first.model.state_dict().items())
    resumed.train()
    a, b = weights(full.model), weights(resumed.model)
    assert any(v.abs().max() > 0 for k, v in a.items() if ".lora_B." in k)  # training moved B away from 0
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_resume_refuses_a_different_base_or_a_lora_mismatch(tmp_path):
    model, tok = load_policy(ModelConfig(name_or_path="tiny", lora=LORA_ON))
    randomise_adapters(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    folder = save_checkpoint(tmp_path, model, tok, opt, TrainerState(step=1))
    other_base, _ = load_policy(ModelConfig(name_or_path="tiny", tiny={"seed": 1}, lora=LORA_ON))
    opt2 = torch.optim.AdamW([p for p in other_base.parameters() if p.requires_grad])
    with pytest.raises(ValueError, match="base model differs from the checkpoint's at model.embed_tokens.weight"):
        load_checkpoint(folder, other_base, opt2)
    plain, _ = load_policy(ModelConfig(name_or_path="tiny"))
    with pytest.raises(ValueError, match="a LoRA checkpoint, but model.lora is off"):
        load_checkpoint(folder, plain, torch.optim.AdamW(plain.parameters()))
    plain_opt = torch.optim.AdamW(plain.parameters())
    plain_folder = save_checkpoint(tmp_path / "plain", plain, tok, plain_opt, TrainerState(step=1))
    with pytest.raises(ValueError, match="not a LoRA checkpoint"):
        load_checkpoint(plain_folder, model, opt)
