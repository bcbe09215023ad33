"""Mixed precision (herl_core/precision.py): fp32 master weights and AdamW state, forward/backward under bf16 (or
fp16 + loss scaling) autocast, on the tiny model on CPU.

What is checked: a bf16-autocast step-0 update computes the fp32 run's loss, log-probs and gradients up to bf16
rounding (tolerances below); at lr 1e-6 every trainable tensor changes after one update, while the explicitly allowed
pure-bf16 mode loses almost every element's update (the bug this layout fixes); generation runs under the same
autocast; the saved policy is written in model.dtype and the checkpoints keep the fp32 masters, so a bf16 run
resumes bit-identically; the config refuses a bf16 optimizer state unless asked for; fp16 runs with a loss scaler
whose state survives a resume; LoRA trains fp32 adapters under autocast.

Run: nice -n 19 env OMP_NUM_THREADS=1 .venv/bin/pytest tests/herl_core/test_precision.py -q
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from herl_core.advantage import get_advantage
from herl_core.config import Config, ConfigError, load_params
from herl_core.precision import Precision
from herl_core.records import PromptRecord, Rubric, Verdict
from herl_core.rewards.base import result_from_verdicts
from herl_core.rollout.groups import call_seed, sample_groups
from herl_core.stages import run_train
from herl_core.train import Trainer
from herl_core.update import compute_advantages, loss_share, micro_batch, micro_batches

PROMPTS = [
    PromptRecord(id=f"p{i}", prompt=p, rubrics=[Rubric(id="punctuation:no_comma")])
    for i, p in enumerate(["Write a note about cats.", "Describe the sea.", "Tell me about trees.", "Explain rain."])
]

BF16 = {"name_or_path": "tiny", "dtype": "bfloat16"}
PURE_BF16 = {"master_dtype": "bfloat16", "allow_low_precision_master": True}


class EvenLength:
    """1 when the response has an even number of characters: a random tiny model meets it about half the time, so
    groups are not flat and the advantages, hence the gradients, are not zero."""

    def score(self, prompts, responses):
        return [
            result_from_verdicts([Verdict(rubric_id="even", description="even length", passed=len(r) % 2 == 0)], r)
            for r in responses
        ]


def tiny_cfg(tmp_path, model: dict | None = None, **train) -> Config:
    tree = {
        "model": model or {"name_or_path": "tiny"},
        "rollout": {"n": 4, "max_new_tokens": 8, "engine": {"generation_batch_size": 16}},
        "hindsight": {"rewrite_max_new_tokens": 8},
        "train": {
            "steps": 2, "prompts_per_step": 2, "mini_batch_prompts": 2, "micro_batch_size": 4, "lr": 1e-6,
            "out_dir": str(tmp_path / "policy"), "checkpoint_dir": str(tmp_path / "ckpt"),
            "report_dir": str(tmp_path / "reports"), "data": str(tmp_path / "train.jsonl"), **train,
        },
    }  # fmt: skip
    return Config.model_validate(tree)


def trainer(cfg: Config) -> Trainer:
    return Trainer(cfg, PROMPTS, reward=EvenLength())


def weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters()}


# ---------------------------------------------------------------------------------------------------- step 0

GRAD_RTOL = 2e-2
"""‖g_bf16 − g_fp32‖ / ‖g_fp32‖, over all parameters and per tensor. Why: bf16 keeps 8 significant bits, so every
operand autocast rounds (the inputs of each linear and matmul; accumulation stays fp32) carries a relative error up to
2^-9 ≈ 2e-3; through the tiny model's embedding, 2 layers and the tied LM head, forward and backward, these add up to
about 4e-3 relative on the gradients (measured on AVX-512 with bf16 instructions: 3.2e-3 to 7.9e-3 per tensor) and
the same on an AVX2 CPU, where oneDNN rounds the operands to bf16 the same way and computes in fp32. 2e-2 leaves a
factor of 2.5 over the worst tensor; a gradient computed without autocast would match to ~1e-6 and one computed
from bf16-rounded weights or with a wrong scale would miss by far more than 2e-2 (see the pure-bf16 test)."""

LOGP_ATOL = 1e-2
"""|log p_bf16 − log p_fp32| per completion token: log-probs near −11 on the tiny model (49k-token vocabulary), logits
rounded at 2^-9 relative; measured max 1.1e-3, mean 3.9e-4."""


def step0_update(t: Trainer, batch, precision: Precision) -> tuple[float, torch.Tensor, dict[str, torch.Tensor]]:
    """The loss, the training forward's log-probs and the gradients of step 0's update of ``batch`` under
    ``precision`` (the optimizer is not stepped)."""
    policy, cfg = t.policy, t.cfg.train
    policy.precision = precision
    policy.optimizer.zero_grad(set_to_none=True)
    acc = {"actor/loss": 0.0, "actor/pg_loss": 0.0, "actor/kl": 0.0, "actor/clipfrac": 0.0}
    logps = []
    for rows, totals in zip(batch.minibatches, batch.totals, strict=True):
        for micro in micro_batches(batch.samples, rows, cfg.micro_batch_size):
            x = micro_batch(policy, batch, micro, None, None, cfg.logprob_temperature)
            assert x.logp.dtype == torch.float32  # log-probs and loss are fp32 whatever the compute dtype
            logps.append(x.logp.detach()[x.mask.bool()])
            per_token, stats = policy.loss_fn(
                x.logp, x.old_logp, x.adv, x.mask, x.guided, clip_low=0.2, clip_high=0.2, clip_c=3.0, gamma=1.0
            )
            loss_share(per_token, stats, x, totals, cfg, acc).backward()
    grads = {n: p.grad.detach().clone() for n, p in t.model.named_parameters()}
    return acc["actor/loss"], torch.cat(logps), grads


def test_bf16_autocast_step0_matches_the_fp32_update_within_bf16_rounding(tmp_path):
    t = trainer(tiny_cfg(tmp_path))
    groups = sample_groups(t.next_prompts(), t.engine, t.reward, t.tokenizer, t.cfg.rollout, call_seed(0, 0, 0))
    batch, _ = compute_advantages(groups, get_advantage("grpo"), t.cfg.train)
    assert batch.advantages.abs().max() > 0  # the groups are not flat: the gradients are not zero
    loss32, logp32, g32 = step0_update(t, batch, Precision())
    loss16, logp16, g16 = step0_update(t, batch, Precision(compute=torch.bfloat16, master=torch.float32))
    assert {p.dtype for p in t.model.parameters()} == {torch.float32}  # the weights stay the fp32 masters
    # step 0, one mini-batch: π_old is the training forward itself, ρ ≡ 1, so the PPO loss is −Σ A·|y| / Σ|y| in any
    # precision (hand-computed from the advantages and the completion lengths)
    lengths = torch.tensor([len(s.completion_ids) for s in batch.samples], dtype=torch.float64)
    expected = float(-(batch.advantages.double() * lengths).sum() / lengths.sum())
    assert loss32 == pytest.approx(expected, abs=1e-6) and loss16 == pytest.approx(expected, abs=1e-6)
    assert (logp16 - logp32).abs().max() < LOGP_ATOL
    assert (logp16 - logp32).abs().max() > 1e-5  # autocast really ran: fp32 would agree to ~1e-6
    flat32, flat16 = torch.cat([g.flatten() for g in g32.values()]), torch.cat([g16[n].flatten() for n in g32])
    assert flat32.norm() > 0
    assert (flat16 - flat32).norm() / flat32.norm() < GRAD_RTOL
    for name, g in g32.items():
        assert (g16[name] - g).norm() / g.norm() < GRAD_RTOL, name


# ---------------------------------------------------------------------------------------------------- updates land


def test_at_lr_1e6_every_trainable_tensor_changes_with_fp32_master_weights(tmp_path):
    """model.dtype bfloat16 (the gpu profile's), master fp32: one update at the reference lr moves every tensor and
    practically every element (AdamW's first step moves each element with a non-zero gradient by about lr; the tied
    embedding is also the LM head, so every row has a gradient)."""
    t = trainer(tiny_cfg(tmp_path, BF16))
    before = weights(t.model)
    m = t.step()
    assert m["actor/updates"] == 1 and m["actor/grad_norm"] > 0
    after = weights(t.model)
    assert all(v.dtype == torch.float32 for v in after.values())
    unchanged = [k for k in before if torch.equal(before[k], after[k])]
    assert unchanged == []
    changed = sum(int((before[k] != after[k]).sum()) for k in before) / sum(v.numel() for v in before.values())
    assert changed > 0.99


def test_pure_bf16_weights_lose_almost_every_update_at_lr_1e6(tmp_path):
    """The layout the fp32 masters replace (weights and AdamW state in bf16; only with allow_low_precision_master):
    a weight moves only where lr ≈ 1e-6 exceeds half its bf16 rounding step, i.e. |w| below ~2.6e-4. The RMSNorm
    weights (all 1.0, step 7.8e-3) never move, and far fewer than 10 % of all elements do (1.4 % measured)."""
    t = trainer(tiny_cfg(tmp_path, BF16, **PURE_BF16))
    assert {p.dtype for p in t.model.parameters()} == {torch.bfloat16}
    before = weights(t.model)
    m = t.step()
    assert m["actor/updates"] == 1 and m["actor/grad_norm"] > 0  # it did step, with a real gradient
    after = weights(t.model)
    norms = [k for k in before if k.endswith("norm.weight")]
    assert norms and all(torch.equal(before[k], after[k]) for k in norms)
    changed = sum(int((before[k] != after[k]).sum()) for k in before) / sum(v.numel() for v in before.values())
    assert changed < 0.1


def test_generation_runs_under_the_training_autocast(tmp_path):
    """The HF engine of a bf16 run samples with bf16 logits: its log-probs of its own greedy tokens equal the bf16
    training forward's within bf16 rounding, and differ from the fp32 model's (autocast was on, the packed fp32
    linears off)."""
    from herl_core.logprobs import pack_batch, sequence_logprobs
    from herl_core.rollout.base import SamplingParams

    t = trainer(tiny_cfg(tmp_path, BF16))
    prompt = t.tokenizer("Describe the sea.", add_special_tokens=False)["input_ids"]
    gen = t.engine.generate([prompt], 1, SamplingParams(temperature=0.0, max_new_tokens=6))[0]
    batch = pack_batch([prompt], [gen.completion_ids], t.tokenizer.pad_token_id)
    with torch.no_grad():
        with Precision(compute=torch.bfloat16, master=torch.float32).autocast("cpu"):
            trained = sequence_logprobs(t.model, batch)
        fp32 = sequence_logprobs(t.model, batch)
    engine = torch.tensor(gen.logprobs)
    assert (engine - trained[0]).abs().max() < LOGP_ATOL
    assert (engine - fp32[0]).abs().max() > 1e-5


# ---------------------------------------------------------------------------------------------------- what is stored


def test_saved_policy_is_written_in_model_dtype_and_checkpoints_keep_fp32_masters(tmp_path):
    from transformers import AutoModelForCausalLM

    cfg = tiny_cfg(tmp_path, BF16, steps=1)
    (tmp_path / "train.jsonl").write_text("".join(p.model_dump_json() + "\n" for p in PROMPTS))
    run_train(cfg, trainer_kwargs={"reward": EvenLength()})
    policy = load_file(str(tmp_path / "policy" / "model.safetensors"))
    assert {v.dtype for v in policy.values()} == {torch.bfloat16}
    assert json.loads((tmp_path / "policy" / "config.json").read_text())["dtype"] == "bfloat16"
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "policy")  # dtype "auto": read from config.json
    assert loaded.dtype == torch.bfloat16
    ckpt = tmp_path / "ckpt" / "step-000001"
    masters = load_file(str(ckpt / "model.safetensors"))
    moments = load_file(str(ckpt / "optimizer.safetensors"))
    assert {v.dtype for v in masters.values()} == {torch.float32}
    assert {v.dtype for k, v in moments.items() if "exp_avg" in k} == {torch.float32}
    # the policy is the masters rounded once to bf16
    assert all(torch.equal(policy[k], masters[k].to(torch.bfloat16)) for k in policy)


def test_bf16_resume_gives_bit_identical_weights(tmp_path):
    full = trainer(tiny_cfg(tmp_path / "full", BF16))
    full.train()
    cfg = tiny_cfg(tmp_path / "split", BF16)
    first = trainer(cfg)
    first.train(steps=1)
    first.save(cfg.train.checkpoint_dir)
    resumed = trainer(cfg)
    assert resumed.resume(cfg.train.checkpoint_dir) and resumed.state.step == 1
    resumed.train()
    a, b = weights(full.model), weights(resumed.model)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], weights(first.model)[k]) for k in a)  # step 2 did change the weights


# ---------------------------------------------------------------------------------------------------- fp16, LoRA


def test_fp16_compute_scales_the_loss_and_resumes_the_scale(tmp_path):
    cfg = tiny_cfg(tmp_path, {"name_or_path": "tiny", "dtype": "float16"})
    first = trainer(cfg)
    before = weights(first.model)
    m = first.step()
    assert m["actor/loss_scale"] == 65536.0 and m["actor/scaler_skipped"] == 0 and m["actor/updates"] == 1
    after = weights(first.model)
    assert all(v.dtype == torch.float32 for v in after.values())
    assert all(not torch.equal(before[k], after[k]) for k in before)  # unscaled: an update of size ~lr everywhere
    first.policy.scaler.update(1024.0)  # a scale a run could have reached: the resume must restore it
    first.save(cfg.train.checkpoint_dir)
    resumed = trainer(cfg)
    assert resumed.resume(cfg.train.checkpoint_dir)
    assert resumed.policy.scaler.get_scale() == 1024.0


def test_lora_trains_fp32_adapters_under_bf16_autocast(tmp_path):
    cfg = tiny_cfg(tmp_path, {**BF16, "lora": {"enabled": True}})
    t = trainer(cfg)
    trainable = {n: p for n, p in t.model.named_parameters() if p.requires_grad}
    assert trainable and {p.dtype for p in trainable.values()} == {torch.float32}
    before = {n: p.detach().clone() for n, p in trainable.items()}
    t.step()
    assert all(not torch.equal(before[n], p) for n, p in trainable.items() if ".lora_B." in n)  # B starts at 0
    t.save_policy(str(tmp_path / "policy"))
    policy = load_file(str(tmp_path / "policy" / "model.safetensors"))
    assert {v.dtype for v in policy.values()} == {torch.bfloat16} and not any("lora" in k for k in policy)


# ---------------------------------------------------------------------------------------------------- config


def test_config_refuses_a_bf16_optimizer_state_unless_asked_for(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text("model:\n  dtype: bfloat16\ntrain:\n  lr: 1.0e-6\n  master_dtype: bfloat16\n")
    with pytest.raises(ConfigError) as err:
        load_params(params)
    message = str(err.value)
    assert f"{params}:3: train:" in message  # the file, the line of the section, the field
    assert "train.allow_low_precision_master: true" in message and "train.master_dtype: float32" in message
    allowed = load_params(params, overrides=["train.allow_low_precision_master=true"])
    assert allowed.train.master_dtype == "bfloat16"
    with pytest.raises(ConfigError, match="needs model.dtype: bfloat16"):
        load_params(params, overrides=["train.allow_low_precision_master=true", "model.dtype=float32"])
    with pytest.raises(ConfigError, match="fsdp with model.dtype: float16"):
        load_params(params, overrides=["model.dtype=float16", "train.master_dtype=float32", "train.parallel=fsdp"])
    # the default: bf16 compute on fp32 masters, accepted as it is
    default = load_params(params, overrides=["train.master_dtype=float32"])
    assert Precision.from_config(default).uses_autocast
