"""The online loop end to end on the tiny model: HeRL and GRPO through one code path, determinism, resume,
the old-log-prob shortcut, the reference model only when β > 0, the non-finite guard, and validation during
training that changes no training number."""

from __future__ import annotations

import json

import pytest
import torch

from herl_core.checkpoint import latest_checkpoint, list_checkpoints
from herl_core.config import Config
from herl_core.models import load_policy
from herl_core.records import PromptRecord, Rubric
from herl_core.stages import run_train
from herl_core.train import Trainer
from herl_core.update import NonFiniteError

PROMPTS = [
    PromptRecord(
        id=f"p{i}", prompt=p, rubrics=[Rubric(id=c), Rubric(id="keywords:existence", kwargs={"keywords": ["blue"]})]
    )
    for i, (p, c) in enumerate(
        [
            ("Write a note about cats.", "change_case:english_lowercase"),
            ("Describe the sea.", "punctuation:no_comma"),
            ("Tell me about trees.", "change_case:english_capital"),
            ("Explain rain.", "punctuation:no_comma"),
        ]
    )
]


def tiny_cfg(tmp_path, **over) -> Config:
    tree = {
        "model": {"name_or_path": "tiny"},
        "rollout": {"n": 4, "max_new_tokens": 8, "engine": {"generation_batch_size": 16}},
        "hindsight": {"rewrite_max_new_tokens": 8},
        "train": {
            "steps": 2, "prompts_per_step": 2, "mini_batch_prompts": 1, "micro_batch_size": 4, "lr": 1e-3,
            "out_dir": str(tmp_path / "policy"), "checkpoint_dir": str(tmp_path / "ckpt"),
            "report_dir": str(tmp_path / "reports"), "data": str(tmp_path / "train.jsonl"),
        },
    }  # fmt: skip
    for section, values in over.items():
        tree.setdefault(section, {}).update(values)
    return Config.model_validate(tree)


def trainer(cfg: Config) -> Trainer:
    model, tok = load_policy(cfg.model)
    return Trainer(cfg, PROMPTS, model=model, tokenizer=tok)


def weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_two_herl_steps_change_the_policy_and_report_every_metric(tmp_path):
    t = trainer(tiny_cfg(tmp_path))
    before = weights(t.model)
    history = t.train()
    assert len(history) == 2 and t.state.step == 2
    for key in ["reward/mean", "reward/frac_zero_std", "herl/failed_groups", "herl/rewrites",
                "herl/rewrite_success_rate", "herl/over_prev_best_rate", "herl/bonus_mean", "actor/loss",
                "actor/kl", "actor/clipfrac", "perf/tokens_per_s", "perf/step_s"]:  # fmt: skip
        assert key in history[0], key
    # a random tiny model meets few constraints → failed groups → rewrites
    assert sum(h["herl/rewrites"] for h in history) > 0
    assert all(h["actor/updates"] == 2 for h in history)  # 2 prompts / 1 per mini-batch
    after = weights(t.model)
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_grpo_flag_uses_the_same_loop_without_hindsight(tmp_path, monkeypatch):
    import herl_core.train

    batches = []
    real_update = herl_core.train.update
    monkeypatch.setattr(
        herl_core.train, "update", lambda policy, batch, *a: batches.append(batch) or real_update(policy, batch, *a)
    )
    t = trainer(tiny_cfg(tmp_path, hindsight={"enabled": False}))
    history = t.train()
    assert not any(k.startswith("herl/") for k in history[0])
    assert len(batches) == 2 and all(not s.guided for b in batches for s in b.samples)


def test_same_seed_same_rollouts_and_losses(tmp_path):
    h1 = trainer(tiny_cfg(tmp_path / "a")).train()
    h2 = trainer(tiny_cfg(tmp_path / "b")).train()
    for a, b in zip(h1, h2, strict=True):
        for k in a:
            if not k.startswith("perf/"):
                assert a[k] == b[k], k


def test_single_pass_takes_old_logprobs_from_the_training_forward(tmp_path, monkeypatch):
    import herl_core.update

    calls = []
    orig = herl_core.update.no_grad_logprobs
    monkeypatch.setattr(herl_core.update, "no_grad_logprobs", lambda *a, **k: calls.append(1) or orig(*a, **k))
    # one mini-batch, one epoch: ρ ≡ 1, so nothing can be clipped and the ratio mean is exactly 1
    t = trainer(tiny_cfg(tmp_path, train={"mini_batch_prompts": 2}))
    m = t.step()
    assert calls == [] and m["actor/clipfrac"] == 0.0 and m["actor/updates"] == 1
    # two mini-batches: one no-grad pass for π_old over the whole batch
    t2 = trainer(tiny_cfg(tmp_path / "2"))
    t2.step()
    assert calls == [1]


def test_reference_model_only_when_kl_is_on(tmp_path):
    assert trainer(tiny_cfg(tmp_path)).ref_model is None
    t = trainer(tiny_cfg(tmp_path / "kl", train={"kl_coef": 0.1}))
    assert t.ref_model is not None
    m = t.step()
    # first update of step 0 starts at π_θ = π_ref: KL of the first mini-batch is 0; after an update it is > 0
    assert m["actor/kl"] >= 0.0


def test_resume_gives_the_same_weights_as_an_uninterrupted_run(tmp_path):
    full = trainer(tiny_cfg(tmp_path / "full"))
    full.train()
    cfg = tiny_cfg(tmp_path / "split")
    first = trainer(cfg)
    first.train(steps=1)
    first.save(cfg.train.checkpoint_dir)
    resumed = trainer(cfg)
    assert resumed.resume(cfg.train.checkpoint_dir) and resumed.state.step == 1
    resumed.train()
    a, b = weights(full.model), weights(resumed.model)
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_nonfinite_updates_are_skipped_then_stop_the_run(tmp_path, monkeypatch):
    cfg = tiny_cfg(tmp_path, train={"max_nonfinite_steps": 2, "mini_batch_prompts": 2})
    t = trainer(cfg)
    before = weights(t.model)
    orig = t.policy.loss_fn

    def nan_loss(*a, **k):
        per_token, m = orig(*a, **k)
        return per_token * float("nan"), m

    t.policy.loss_fn = nan_loss
    m = t.step()  # first non-finite update: skipped and counted
    assert m["actor/nonfinite_skipped"] == 1 and t.state.nonfinite_total == 1
    assert all(torch.equal(before[k], v) for k, v in weights(t.model).items())
    with pytest.raises(NonFiniteError, match="2 consecutive updates"):
        t.step()


def test_run_train_writes_policy_reports_and_resumes(tmp_path):
    from transformers import AutoModelForCausalLM

    cfg = tiny_cfg(tmp_path)
    (tmp_path / "train.jsonl").write_text("".join(p.model_dump_json() + "\n" for p in PROMPTS))
    summary = run_train(cfg)
    assert summary["steps"] == 2
    model = AutoModelForCausalLM.from_pretrained(cfg.train.out_dir)  # plain transformers loads it
    assert model.config.vocab_size == 49152
    steps = [json.loads(x) for x in (tmp_path / "reports" / "steps.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps] == [0, 1]
    exp = (tmp_path / "reports" / "experiences.jsonl").read_text().splitlines()
    assert exp and "hindsight_prompt" in json.loads(exp[0])
    assert latest_checkpoint(cfg.train.checkpoint_dir).name == "step-000002"
    # a second call resumes at step 2 = done: nothing is recomputed, the step log is not duplicated
    run_train(cfg)
    steps2 = [json.loads(x)["step"] for x in (tmp_path / "reports" / "steps.jsonl").read_text().splitlines()]
    assert steps2 == [0, 1] and len(list_checkpoints(cfg.train.checkpoint_dir)) == 1


@pytest.mark.smollm2
def test_one_herl_step_on_smollm2_with_real_ifeval_rubrics(tmp_path):
    cfg = tiny_cfg(
        tmp_path,
        model={"name_or_path": "smollm2-135m-instruct"},
        rollout={"n": 2, "max_new_tokens": 24},
        hindsight={"rewrite_max_new_tokens": 24},
        train={"steps": 1, "prompts_per_step": 1, "mini_batch_prompts": 1, "lr": 1e-6},
    )
    t = trainer(cfg)
    m = t.step()
    assert m["perf/gen_tokens"] > 0 and torch.isfinite(torch.tensor(m["actor/loss"]))


def test_padded_split_minimises_padded_tokens_by_hand():
    from herl_core.update import padded_split

    # (prompt, completion) lengths, max 2 per micro-batch, 32 token-equivalents per forward:
    #   [0,1) [1,3) [3,4): (80+10)+32 + 2·(80+64)+32 + (400+90)+32 = 122 + 320 + 522 = 964   ← best
    #   [0,2) [2,4):       2·(80+60)+32 + 2·(400+90)+32            = 312 + 1012      = 1324
    #   singletons:        122 + 172 + 176 + 522                                     = 992
    shapes = [(80, 10), (80, 60), (80, 64), (400, 90)]
    assert padded_split(shapes, max_size=2) == [(0, 1), (1, 3), (3, 4)]
    assert padded_split(shapes, max_size=1) == [(0, 1), (1, 2), (2, 3), (3, 4)]
    # equal shapes: one micro-batch saves the per-forward overhead
    assert padded_split([(10, 10)] * 4, max_size=4) == [(0, 4)]


VAL_PROMPTS = [
    PromptRecord(id=f"v{i}", prompt=p, rubrics=[Rubric(id=c)])
    for i, (p, c) in enumerate(
        [("Write about snow.", "change_case:english_lowercase"), ("Name a bird.", "punctuation:no_comma")]
    )
]


def test_validation_logs_val_metrics_and_changes_no_training_number(tmp_path):
    """3 steps with validation every 2 steps: val/* and perf/val_s at steps 0 and 2 (2 is also the last step), none
    at step 1; every training metric and the final weights equal those of the same run without validation."""
    off = trainer(tiny_cfg(tmp_path / "off", train={"steps": 3}))
    h_off = off.train()
    cfg = tiny_cfg(tmp_path / "on", train={"steps": 3, "eval_every": 2, "eval_samples": 2})
    model, tok = load_policy(cfg.model)
    on = Trainer(cfg, PROMPTS, model=model, tokenizer=tok, val_prompts=VAL_PROMPTS)
    h_on = on.train()
    assert [s for s, h in enumerate(h_on) if "val/reward_mean" in h] == [0, 2]
    assert all("val/greedy/reward_mean" in h and h["perf/val_s"] > 0 for h in (h_on[0], h_on[2]))
    for a, b in zip(h_off, h_on, strict=True):
        trained = {k: v for k, v in b.items() if not k.startswith(("val/", "perf/"))}
        assert trained == {k: v for k, v in a.items() if not k.startswith("perf/")}
    a, b = weights(off.model), weights(on.model)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_validation_needs_its_prompts(tmp_path):
    with pytest.raises(ValueError, match="train.eval_every = 2 needs validation prompts"):
        trainer(tiny_cfg(tmp_path, train={"eval_every": 2}))
