"""The five stage commands (``herl prepare|rollout|hindsight|train|evaluate``) on the tiny profile, end to end.

Run: .venv/bin/pytest tests/flows/test_stages.py
One workspace per module (a copy of params.yaml in a temp dir, MLflow on a temp sqlite file); the commands run
in order through typer's CliRunner; each test then checks one stage's files: they validate against the record
models and the summaries agree with counts taken from those files.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from flows.cli import app
from herl_core.config import load_params
from herl_core.io import read_jsonl
from herl_core.records import HindsightRecord, MergeRecord, PromptRecord, RolloutRecord
from herl_core.resume import train_fingerprint
from herl_core.stages import STAGES, eval_policy

ROOT = Path(__file__).resolve().parents[2]
RUNNER = CliRunner()
TINY = ["--profile", "tiny"]


VALIDATION = ["--set", "train.eval_every=1", "--set", "train.eval_prompts=2", "--set", "train.eval_samples=2"]
"""Validation on in the workspace's train (step 0 validates on the first 2 prompts of data/prepared/val.jsonl)."""


@pytest.fixture(scope="module")
def ws(tmp_path_factory, mlflow_uri):
    """A workspace where every stage ran once (train: one step); returns the results by stage."""
    root = tmp_path_factory.mktemp("ws")
    shutil.copy(ROOT / "params.yaml", root / "params.yaml")
    results = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        mp.setenv("MLFLOW_TRACKING_URI", mlflow_uri)
        for stage in STAGES:
            extra = ["--set", "train.steps=1", *VALIDATION] if stage == "train" else []
            results[stage] = RUNNER.invoke(app, [stage, *TINY, *extra, "--json"])
    return root, results


def ok(result) -> dict:
    """Exit code 0 and the summary JSON the command printed on stdout (``--json``)."""
    assert result.exit_code == 0, result.output + repr(result.exception)
    return json.loads(result.stdout)


def cfg_of(root: Path):
    return load_params(root / "params.yaml", profile="tiny")


def test_every_command_has_help():
    top = RUNNER.invoke(app, ["--help"])
    assert top.exit_code == 0
    for stage in STAGES:
        assert stage in top.stdout
        sub = RUNNER.invoke(app, [stage, "--help"])
        assert sub.exit_code == 0 and "--profile" in sub.stdout and "--set" in sub.stdout, stage


def test_bad_params_exit_2_naming_file_line_field(tmp_path):
    bad = tmp_path / "params.yaml"
    bad.write_text("# a comment\nrollout:\n  n: 1\n")  # n = G must be >= 2; the key `n` is on line 3
    result = RUNNER.invoke(app, ["rollout", "--params", str(bad)])
    assert result.exit_code == 2
    text = " ".join(result.output.split())  # rich wraps long lines
    assert f"{bad}:3" in text and "rollout.n" in text


def test_config_prints_the_resolved_layout_and_names_the_new_place_of_an_old_key():
    shown = RUNNER.invoke(app, ["config", "--params", str(ROOT / "params.yaml"), *TINY])
    assert shown.exit_code == 0, shown.output
    cfg = json.loads(shown.stdout)
    assert list(cfg) == ["profile", "model", "reward", "prepare", "rollout", "hindsight", "train", "evaluate",
                         "probe", "tracking"]  # fmt: skip
    assert cfg["rollout"]["engine"]["generation_batch_size"] == 16 and cfg["probe"]["prompts"] == 4  # tiny's
    old = RUNNER.invoke(app, ["config", "--params", str(ROOT / "params.yaml"), "--set", "herl.bonus_alpha=0.1"])
    assert old.exit_code == 2
    assert "herl.bonus_alpha moved to hindsight.bonus_alpha" in " ".join(old.output.split())


def test_prepare_writes_validated_splits_and_report(ws):
    root, results = ws
    report = ok(results["prepare"])
    train = read_jsonl(root / "data/prepared/train.jsonl", PromptRecord)
    ifeval = read_jsonl(root / "data/prepared/ifeval.jsonl", PromptRecord)
    assert len(train) == 16  # profiles.tiny.prepare.n_train
    assert len(ifeval) == 541 and report["splits"]["ifeval"]["prompts"] == 541
    assert report["splits"]["train"]["constraints"] == sum(len(r.rubrics) for r in train)
    assert report["disjoint"] is True
    assert json.loads((root / "data/prepared/report.json").read_text()) == report


def test_rollout_summary_recounts_from_the_jsonl(ws):
    root, results = ws
    summary = ok(results["rollout"])
    rows = read_jsonl(root / "data/rollout/rollouts.jsonl", RolloutRecord)
    first4 = [r.id for r in read_jsonl(root / "data/prepared/train.jsonl", PromptRecord)[:4]]
    # tiny: probe.prompts = 4, G = rollout.n = 4 → 16 rows, group-major, indices 0..3
    assert [(r.prompt_id, r.sample_index) for r in rows] == [(p, k) for p in first4 for k in range(4)]
    assert all(r.n_tokens <= 16 for r in rows)  # rollout.max_new_tokens
    scores = [r.reward.score for r in rows]
    assert summary["reward/mean"] == pytest.approx(sum(scores) / len(scores))
    met = {r.prompt_id for r in rows if r.reward.verdicts and all(v.passed for v in r.reward.verdicts)}
    assert summary["pass_at_G"] == pytest.approx(len(met) / 4)
    n_verdicts = sum(1 for r in rows for v in r.reward.verdicts if v.passed is not None)
    assert sum(t["n"] for t in summary["per_type"].values()) == n_verdicts
    assert summary["policy"] == "tiny"


def test_hindsight_writes_train_schema_and_a_consistent_probe(ws):
    root, results = ws
    summary = ok(results["hindsight"])
    exps = read_jsonl(root / "data/hindsight/experiences.jsonl", HindsightRecord, unique_field=None)
    merges = read_jsonl(root / "data/hindsight/merges.jsonl", MergeRecord, unique_field=None)
    # the tiny random model meets no rubric set: every group fails, one merge per failed group (replace_top_n = 1)
    assert summary["groups"] == 4 and summary["herl/failed_groups"] == len(merges) == 4
    assert summary["herl/rewrites"] == len(exps) and exps
    scored = [e for e in exps if e.rewrite_dense is not None]
    improved = sum(e.rewrite_dense > e.draft_dense for e in scored)
    assert summary["herl/rewrite_success_rate"] == pytest.approx(improved / len(scored))
    failed_draft_verdicts = sum(1 for e in exps for v in e.verdicts if v.passed is False)
    assert sum(t["n"] for t in summary["per_type"].values()) == failed_draft_verdicts
    # the train stage logs experiences in the very same schema
    ok(results["train"])
    train_exps = read_jsonl(root / "reports/train/experiences.jsonl", HindsightRecord, unique_field=None)
    assert set(train_exps[0].model_dump()) == set(exps[0].model_dump())


def test_train_writes_policy_step_log_and_summary(ws):
    root, results = ws
    summary = ok(results["train"])
    assert (root / "models/policy/config.json").is_file()
    steps = [json.loads(x) for x in (root / "reports/train/steps.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps] == [0] and summary["steps"] == 1.0
    assert summary["reward/mean_last"] == pytest.approx(steps[0]["reward/mean"])


def test_train_tables_metrics_and_mlflow_carry_the_validation_metrics(ws, mlflow_uri):
    """Validation on: step 0's val/* are columns of steps.csv, the rows of val.csv, headline numbers of metrics.json
    and metric points of the MLflow train run, all with the values of steps.jsonl."""
    import csv

    from mlflow import MlflowClient

    root, results = ws
    (step,) = [json.loads(x) for x in (root / "reports/train/steps.jsonl").read_text().splitlines()]
    val_keys = sorted(k for k in step if k.startswith("val/"))
    assert {"val/reward_mean", "val/all_met_frac", "val/pass_at_k", "val/greedy/reward_mean"} <= set(val_keys)
    (row,) = list(csv.DictReader((root / "reports/train/steps.csv").open()))
    assert float(row["val/reward_mean"]) == pytest.approx(step["val/reward_mean"])
    (val_row,) = list(csv.DictReader((root / "reports/train/val.csv").open()))
    assert sorted(val_row) == sorted(["step", *val_keys]) and val_row["step"] == "0"
    assert float(val_row["val/greedy/reward_mean"]) == pytest.approx(step["val/greedy/reward_mean"])
    headline = json.loads((root / "reports/train/metrics.json").read_text())
    assert headline["val/reward_mean"] == headline["val/reward_mean_first"] == pytest.approx(step["val/reward_mean"])
    assert len(headline) <= 12
    client = MlflowClient(mlflow_uri)
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()], "attributes.run_name = 'train'")
    for key in ("val/reward_mean", "val/greedy/reward_mean", "val/all_met_frac"):
        history = [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, key)]
        assert history == [(0, pytest.approx(step[key]))], key


def test_a_stage_prints_progress_a_summary_line_and_where_to_look(ws, mlflow_uri):
    """What a person reads on stderr (a pipe here, so plain lines): train's step line (the 0-based step as MLflow
    logs it, and how many steps are done), the one-line summary, and the closing block with the files and the run."""
    root, results = ws
    err = results["train"].stderr
    assert "herl train · profile tiny · model tiny · 1 step of 4 prompts × G=4 · HeRL" in err
    steps = [json.loads(x) for x in (root / "reports/train/steps.jsonl").read_text().splitlines()]
    assert f"[1/1] step 0  reward {steps[0]['reward/mean']:.3f}" in err
    assert "\ntrain: 1 step, reward " in err and "herl train done in" in err
    for path in ("reports/train/metrics.json", "reports/train/steps.csv", "models/policy"):
        assert path in err
    from mlflow import MlflowClient

    client = MlflowClient(mlflow_uri)
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()], "attributes.run_name = 'train'")
    assert f"#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}?workflowType=machine_learning" in err
    evaluate = results["evaluate"].stderr
    assert "evaluate ifeval: batch 1/1 (4 prompts)" in evaluate and "evaluate: IFEval prompt-strict " in evaluate
    assert '"splits"' not in results["prepare"].stderr  # no JSON dump on the console: the summary is one line
    assert len(results["prepare"].stderr.splitlines()) < 15


def test_evaluate_scores_the_trained_policy(ws):
    root, results = ws
    metrics = ok(results["evaluate"])
    assert metrics["policy"] == "models/policy" and metrics["policy_fallback"] is False
    samples = [json.loads(x) for x in (root / "reports/evaluate/ifeval/samples.jsonl").read_text().splitlines()]
    assert len(samples) == 4  # profiles.tiny.evaluate.limit
    scored = [s for s in samples if s["prompt_strict"] is not None]
    assert metrics["ifeval/prompt_strict"] == pytest.approx(sum(s["prompt_strict"] for s in scored) / len(scored))
    assert json.loads((root / "reports/evaluate/metrics.json").read_text()) == metrics
    assert "ifbench/prompt_strict" not in metrics  # tiny evaluates IFEval only


def test_evaluate_falls_back_to_the_base_model_without_a_trained_policy(tmp_path):
    cfg = load_params(ROOT / "params.yaml", profile="tiny", overrides=[f"train.out_dir={tmp_path / 'none'}"])
    model_cfg, name, fallback = eval_policy(cfg)
    assert (model_cfg.name_or_path, name, fallback) == ("tiny", "tiny", True)


def test_train_fingerprint_ignores_run_length_but_not_hindsight_settings(tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text("{}\n")
    base = ["profile=tiny", f"train.data={data}"]
    fp = train_fingerprint(load_params(ROOT / "params.yaml", overrides=base))
    more_steps = train_fingerprint(load_params(ROOT / "params.yaml", overrides=[*base, "train.steps=9"]))
    alpha = train_fingerprint(load_params(ROOT / "params.yaml", overrides=[*base, "hindsight.bonus_alpha=0.1"]))
    probe = train_fingerprint(load_params(ROOT / "params.yaml", overrides=[*base, "probe.prompts=2"]))
    assert fp == more_steps == probe and fp != alpha
    data.write_text("{}\n{}\n")  # new data: a checkpoint of the old data must not be resumed
    assert train_fingerprint(load_params(ROOT / "params.yaml", overrides=base)) != fp


def test_train_fingerprint_holds_the_validation_settings_only_when_validation_is_on(tmp_path):
    """A run's val/* curves belong to one validation setup: with train.eval_every > 0 its knobs and the bytes of
    train.eval_set are part of the fingerprint (another setup starts fresh); with validation off they change
    nothing."""
    data, val = tmp_path / "train.jsonl", tmp_path / "val.jsonl"
    data.write_text("{}\n")
    val.write_text("{}\n")
    base = ["profile=tiny", f"train.data={data}", f"train.eval_set={val}"]

    def fingerprint(*over: str) -> str:
        return train_fingerprint(load_params(ROOT / "params.yaml", overrides=[*base, *over]))

    off = fingerprint()
    assert fingerprint("train.eval_samples=2") == fingerprint("train.eval_prompts=3") == off
    on = fingerprint("train.eval_every=2")
    assert on != off and fingerprint("train.eval_every=2", "train.eval_samples=2") != on
    val.write_text("{}\n{}\n")  # another validation set
    assert fingerprint("train.eval_every=2") != on and fingerprint() == off


def test_stage_names_agree_between_dvc_yaml_cli_and_params():
    import yaml

    from herl_core.config import SECTIONS, Config

    dvc = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    assert list(dvc["stages"]) == list(STAGES)
    for name, stage in dvc["stages"].items():
        assert stage["cmd"] == f"scripts/herl {name}"  # `herl {name}` with or without an activated environment
        assert name in SECTIONS and name in Config.model_fields and name in params  # the section of the same name
        assert {"profile", name, f"profiles.${{profile}}.{name}"} <= set(stage["params"]), name
