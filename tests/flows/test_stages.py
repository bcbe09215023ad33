"""The five stage commands (``herl prepare|rollout|hindsight|train|evaluate``) on the tiny profile, end to end.

Run: .venv/bin/pytest tests/flows/test_stages.py
One workspace per module (a copy of params.yaml in a temp dir, MLflow on a temp sqlite file); the commands run
in order through typer's CliRunner; each test then checks one stage's files: they validate against the record
models and the summaries agree with counts taken from those files.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from flows.cli import app
from herl_core.config import load_params
from herl_core.io import read_jsonl
from herl_core.records import ControlRecord, ControlTypeRow, HindsightRecord, MergeRecord, PromptRecord, RolloutRecord
from herl_core.resume import train_fingerprint
from herl_core.stages import STAGES, eval_policy, run_hindsight

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
    results["mlflow_uri"] = mlflow_uri
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


def test_hindsight_control_writes_the_table_and_logs_it_to_mlflow(ws):
    root, results = ws
    summary = ok(results["hindsight"])
    folder = root / "data/hindsight"
    records = read_jsonl(folder / "control.jsonl", ControlRecord, unique_field=None)
    report = json.loads((folder / "control.json").read_text())
    # one record per draft the hindsight step selected, paired with that draft's experience
    assert len(records) == summary["herl/drafts"] == report["drafts"] == 16  # 4 failed groups × G = 4 tied drafts
    exps = read_jsonl(folder / "experiences.jsonl", HindsightRecord, unique_field=None)
    by_draft = {(e.prompt_id, e.draft_index): e for e in exps}
    for r in records:
        assert len(r.rewrites) == len(r.resamples) == 1  # hindsight.rewrite_samples
        assert all(o.n_tokens <= 16 for o in r.rewrites + r.resamples)  # the rewrite cap (tiny: 16)
        if r.rewrites[0].reward is not None:
            assert r.rewrites[0].text == by_draft[(r.prompt_id, r.draft_index)].rewrite
    # the CSV is the table: ControlTypeRow columns, the `all` row first, numbers equal to control.json
    with (folder / "control_types.csv").open(newline="") as fh:
        table = list(csv.DictReader(fh))
    assert list(table[0]) == list(ControlTypeRow.model_fields) and table[0]["type"] == "all"
    assert [r["type"] for r in table[1:]] == sorted(report["per_type"])
    assert int(table[0]["drafts"]) == report["overall"]["drafts"] == report["compared"]
    assert float(table[0]["rewrite_beats"]) == pytest.approx(report["overall"]["rewrite_beats"])
    tokens = sum(o.n_tokens for r in records for o in r.resamples)
    assert report["budget"]["resample"]["tokens"] == tokens and report["budget"]["allotted_tokens_per_draft"] == 16
    # the verdict: in the summary (DVC metric) and on the console
    assert summary["control"]["verdict"] == report["verdict"]
    assert f"control: {report['verdict'][:40]}" in " ".join(results["hindsight"].stderr.split())
    # MLflow: the per-type table beside the experiences table, and the records as artifacts
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=results["mlflow_uri"])
    exp = client.get_experiment_by_name("herl-tiny")
    (run,) = client.search_runs([exp.experiment_id], "attributes.run_name = 'hindsight'")
    logged = {a["path"] for a in json.loads(run.data.tags["mlflow.loggedArtifacts"])}
    assert logged == {"experiences.json", "control_types.json"}
    dst = root.parent / "mlflow-dl"
    logged_table = json.loads(
        Path(client.download_artifacts(run.info.run_id, "control_types.json", str(dst))).read_text()
    )
    assert logged_table["columns"][: len(ControlTypeRow.model_fields)] == list(ControlTypeRow.model_fields)
    assert len(logged_table["data"]) == len(table)
    assert run.data.metrics["control/drafts"] == 16.0
    assert {p.path for p in client.list_artifacts(run.info.run_id, "records")} >= {"records/control.jsonl"}


def test_hindsight_control_budget_rule_and_unchanged_outputs(ws, tmp_path):
    """Two rewrites per draft under a 10-token cap (the rollout's is 16): two resamples per draft, each <= 10
    tokens. The control changes no other output: experiences, merges and the rest of the summary are the same with
    it off, and its files are gone."""
    root, _ = ws
    for path in ("params.yaml", "data/prepared/train.jsonl", "data/rollout/rollouts.jsonl"):
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(root / path, tmp_path / path)
    knobs = ["hindsight.rewrite_samples=2", "hindsight.rewrite_max_new_tokens=10"]
    on = run_hindsight(load_params(tmp_path / "params.yaml", profile="tiny", overrides=knobs_in(tmp_path, knobs)))
    folder = tmp_path / "data/hindsight"
    records = read_jsonl(folder / "control.jsonl", ControlRecord, unique_field=None)
    assert records and all(len(r.rewrites) == len(r.resamples) == 2 for r in records)
    assert all(o.n_tokens <= 10 for r in records for o in r.rewrites + r.resamples)
    assert max(o.n_tokens for r in records for o in r.resamples) == 10  # the random tiny model runs to the cap
    budget = json.loads((folder / "control.json").read_text())["budget"]
    assert (budget["generations_per_draft"], budget["max_new_tokens"], budget["allotted_tokens_per_draft"]) == (
        2,
        10,
        20,
    )
    assert budget["rewrite"]["generations"] == budget["resample"]["generations"] == 2 * len(records)
    before = {name: (folder / name).read_bytes() for name in ("experiences.jsonl", "merges.jsonl")}
    off = run_hindsight(
        load_params(
            tmp_path / "params.yaml", profile="tiny", overrides=knobs_in(tmp_path, [*knobs, "probe.control=false"])
        )
    )
    assert {name: (folder / name).read_bytes() for name in before} == before
    assert {k: v for k, v in on.items() if k != "control"} == off and "control" not in off
    assert sorted(p.name for p in folder.iterdir()) == [
        "experiences.jsonl",
        "merges.jsonl",
        "metrics.json",
        "summary.json",
    ]


def knobs_in(root: Path, knobs: list[str]) -> list[str]:
    """``knobs`` plus the workspace's paths (params.yaml's are relative to the working directory)."""
    paths = {"train.data": "data/prepared/train.jsonl", "probe.rollout_dir": "data/rollout",
             "probe.hindsight_dir": "data/hindsight"}  # fmt: skip
    return [*knobs, *(f"{k}={root / v}" for k, v in paths.items())]


def test_train_writes_policy_step_log_and_summary(ws):
    root, results = ws
    summary = ok(results["train"])
    assert (root / "models/policy/config.json").is_file()
    steps = [json.loads(x) for x in (root / "reports/train/steps.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps] == [0] and summary["steps"] == 1.0
    assert summary["reward/mean_last"] == pytest.approx(steps[0]["reward/mean"])


def test_train_tables_metrics_and_mlflow_carry_the_validation_metrics(ws, mlflow_uri):
    """Validation on: step 0's val/* are columns of steps.csv, the first row of val.csv, headline numbers of
    metrics.json and metric points of the MLflow train run, all with the values of steps.jsonl; the trained policy's
    point (validation_final.json, at step 1 = train.steps) ends val.csv and the MLflow curves, and is the headline's
    last val/reward_mean."""
    import csv

    from mlflow import MlflowClient

    root, results = ws
    (step,) = [json.loads(x) for x in (root / "reports/train/steps.jsonl").read_text().splitlines()]
    val_keys = sorted(k for k in step if k.startswith("val/"))
    assert {"val/reward_mean", "val/all_met_frac", "val/pass_at_k", "val/greedy/reward_mean"} <= set(val_keys)
    (row,) = list(csv.DictReader((root / "reports/train/steps.csv").open()))
    assert float(row["val/reward_mean"]) == pytest.approx(step["val/reward_mean"])
    final = json.loads((root / "reports/train/validation_final.json").read_text())
    assert final["step"] == 1 and set(val_keys) <= set(final)
    val_row, final_row = list(csv.DictReader((root / "reports/train/val.csv").open()))
    assert val_row["step"] == "0" and final_row["step"] == "1"
    assert set(val_row) == {"step", *(k for k in final if k.startswith("val/"))} | set(val_keys)  # val/* only
    assert float(val_row["val/greedy/reward_mean"]) == pytest.approx(step["val/greedy/reward_mean"])
    assert float(final_row["val/greedy/reward_mean"]) == pytest.approx(final["val/greedy/reward_mean"])
    headline = json.loads((root / "reports/train/metrics.json").read_text())
    assert headline["val/reward_mean_first"] == pytest.approx(step["val/reward_mean"])
    assert headline["val/reward_mean"] == pytest.approx(final["val/reward_mean"])
    assert len(headline) <= 12
    client = MlflowClient(mlflow_uri)
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()], "attributes.run_name = 'train'")
    for key in ("val/reward_mean", "val/greedy/reward_mean", "val/all_met_frac"):
        history = [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, key)]
        assert history == [(0, pytest.approx(step[key])), (1, pytest.approx(final[key]))], key


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
    # the truncation rate sits beside the scores: answers cut at the 16-token cap without EOS
    assert metrics["max_new_tokens"] == 16 and all(s["response_tokens"] <= 16 for s in samples)
    cut = [s["truncated"] for s in samples]
    assert metrics["ifeval/n_truncated"] == sum(cut) and metrics["ifeval/truncated_frac"] == sum(cut) / 4
    assert all(s["response_tokens"] == 16 for s in samples if s["truncated"])
    headline = json.loads((root / "reports/evaluate/metrics.json").read_text())  # the DVC metric: the headline
    assert headline == {k: metrics[k] for k in ("policy", "policy_fallback")} | {
        f"ifeval/{k}": metrics[f"ifeval/{k}"]
        for k in ("prompt_strict", "inst_strict", "prompt_loose", "inst_loose", "truncated_frac")
    }
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
