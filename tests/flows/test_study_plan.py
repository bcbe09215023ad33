"""flows/study_plan.py: study.yaml, the run folders and commands of every arm × seed, the equal-budget check."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from flows.study_plan import ARMS, StudyConfig, StudyError, check_equal_budget, load_study, plan
from herl_core.config import load_params

ROOT = Path(__file__).resolve().parents[2]


# ---------------------------------------------------------------------------------------------------- planning


def test_plan_puts_every_output_under_the_run_folder():
    study = StudyConfig(params_profile="tiny", seeds=[0, 1], overrides=["train.steps=2"], out_dir="runs/s")
    runs = plan(study)
    # base once, then 3 trained arms × 2 seeds, seed-major
    assert [r["name"] for r in runs] == [
        "base",
        "grpo-s0",
        "herl-s0",
        "herl_no_bonus-s0",
        "grpo-s1",
        "herl-s1",
        "herl_no_bonus-s1",
    ]
    herl = runs[2]
    sets = dict(item.split("=", 1) for item in herl["overrides"])
    for key in ("train.out_dir", "train.checkpoint_dir", "train.report_dir", "evaluate.out_dir", "evaluate.policy"):
        assert sets[key].startswith("runs/s/herl-s0/"), key
    assert sets["train.seed"] == "0" and sets["train.steps"] == "2" and sets["tracking.log_model"] == "false"
    assert sets["train.data"] == "runs/s/data/train.jsonl" and sets["train.eval_set"] == "runs/s/data/val.jsonl"
    assert herl["results"] == "results/study/default/herl-s0"
    assert [c[:2] for c in herl["commands"]["train"]] == [["herl", "train"]]
    assert [c[:2] for c in herl["commands"]["broad"]] == [["herl", "evaluate"]]
    assert "hindsight.bonus_enabled=false" in runs[3]["overrides"] and "hindsight.enabled=false" in runs[1]["overrides"]
    base = dict(item.split("=", 1) for item in runs[0]["overrides"])
    assert "train.seed" not in base and "evaluate.policy" not in base  # falls back to model.name_or_path
    assert base["train.out_dir"] == "runs/s/base/policy"
    assert runs[0]["commands"]["train"] == [] and [c[1] for c in runs[0]["commands"]["broad"]] == ["evaluate"]


def test_variants_and_the_equal_token_arm():
    study = StudyConfig(
        params_profile="tiny",
        arms=["grpo", "grpo_equal_tokens"],
        seeds=[0],
        variants={"full": ["train.lr=1e-5"], "lora": ["model.lora.enabled=true"]},
        equal_tokens={"rollout_n": 7, "source": "measured"},
    )
    runs = plan(study)
    assert [r["name"] for r in runs] == [
        "grpo-full-s0", "grpo_equal_tokens-full-s0", "grpo-lora-s0", "grpo_equal_tokens-lora-s0"
    ]  # fmt: skip
    assert "train.lr=1e-5" in runs[0]["overrides"] and "model.lora.enabled=true" in runs[2]["overrides"]
    assert runs[1]["overrides"][-8:-6] == ["hindsight.enabled=false", "rollout.n=7"]
    configs = {r["name"]: load_params(ROOT / "params.yaml", "tiny", r["overrides"]) for r in runs}
    check_equal_budget(configs, runs)  # variants differ in lr/LoRA, equal_tokens in G: both allowed
    assert configs["grpo_equal_tokens-full-s0"].rollout.n == 7
    with pytest.raises(StudyError, match=r"rollout\.n differs"):
        check_equal_budget({k: v for k, v in configs.items() if "full" in k})  # without the plan: no exemption
    with pytest.raises(ValueError, match="grpo_equal_tokens needs equal_tokens"):
        StudyConfig(arms=["grpo_equal_tokens"])
    with pytest.raises(ValueError, match="variant name 'a b'"):
        StudyConfig(variants={"a b": []})


def test_equal_budget_check():
    study = StudyConfig(params_profile="tiny", seeds=[0])
    runs = plan(study)
    configs = {r["name"]: load_params(ROOT / "params.yaml", "tiny", r["overrides"]) for r in runs}
    check_equal_budget(configs, runs)  # arms differ only in hindsight.* and seeds: passes
    configs["herl-s0"] = load_params(ROOT / "params.yaml", "tiny", [*runs[2]["overrides"], "rollout.n=6"])
    with pytest.raises(StudyError, match=r"rollout\.n differs"):
        check_equal_budget(configs, runs)
    configs["herl-s0"] = load_params(ROOT / "params.yaml", "tiny", [*runs[2]["overrides"], "train.eval_prompts=3"])
    with pytest.raises(StudyError, match=r"train\.eval_prompts differs"):
        check_equal_budget(configs, runs)


# ---------------------------------------------------------------------------------------------------- study.yaml


REPO_PROFILES = list(yaml.safe_load((ROOT / "study.yaml").read_text(encoding="utf-8"))["profiles"])


def test_the_repo_profiles_are_all_checked():
    assert {"tiny", "cpu", "pilot", "ratio", "targeted", "gpu-ratio", "gpu"} <= set(REPO_PROFILES)


@pytest.mark.parametrize("profile", REPO_PROFILES)
def test_repo_study_yaml_profiles_validate_with_params(profile):
    """Every profile of the shipped study.yaml loads, and its runs' overrides validate against params.yaml."""
    study = load_study(ROOT / "study.yaml", profile)
    assert set(study.arms) <= set(ARMS)
    for run in plan(study)[:2]:
        load_params(ROOT / study.params, study.params_profile, run["overrides"])  # raises on a bad override


@pytest.mark.parametrize(("profile", "cap"), [("targeted", 128), ("gpu", 1280)])
def test_the_broad_phase_scores_the_whole_benchmarks(profile, cap):
    """The broad test scores all 541 IFEval and 300 IFBench prompts, greedy, with one revision round; a params
    profile's smoke-check sample (the cpu profile scores 40 prompts) must not leak in. The GPU study answers with
    lm-eval's 1280-token budget; the CPU's targeted study with 128 tokens at batch 32, the settings of the base
    model's full-benchmark runs in docs/evaluation.md §6 (1280 costs 4-14 h per policy there: docs/study.md)."""
    study = load_study(ROOT / "study.yaml", profile)
    for run in plan(study)[:2]:
        e = load_params(ROOT / study.params, study.params_profile, run["overrides"]).evaluate
        assert (e.limit, e.max_new_tokens, e.temperature, e.self_improve_rounds) == (None, cap, 0.0, 1), run["name"]
        assert e.benchmarks == ["ifeval", "ifbench"]
    if profile == "targeted":
        assert e.batch_size == 32


def test_load_study_errors_name_file_and_line(tmp_path):
    path = tmp_path / "study.yaml"
    path.write_text("seeds: [0]\nprofiles:\n  a:\n    seedz: [1]\n", encoding="utf-8")
    with pytest.raises(StudyError, match=r"study\.yaml:4: seedz: Extra inputs"):
        load_study(path, "a")
    with pytest.raises(StudyError, match="unknown study profile 'b'"):
        load_study(path, "b")
    path.write_text("seeds: [0, 0]\n", encoding="utf-8")
    with pytest.raises(StudyError, match=r"study\.yaml:1: seeds: .*unique"):
        load_study(path)
    path.write_text("arms: [base, dpo]\n", encoding="utf-8")
    with pytest.raises(StudyError, match=r"arms\.1"):
        load_study(path)


def test_a_repeated_key_in_study_yaml_is_an_error_naming_both_lines(tmp_path):
    path = tmp_path / "study.yaml"
    path.write_text("params_profile: tiny\nseeds: [0, 1]\nseeds: [2]\n")
    with pytest.raises(StudyError) as err:
        load_study(path)
    assert f"{path}:3: seeds: duplicate key (first at line 2)" in str(err.value)
