"""flows/study.py: resumability (finished runs are skipped, a foreign finished run is refused), the MLflow parent /
arm structure and the report, with a fake ``herl`` command; and (integration) the tiny study end to end."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from mlflow import MlflowClient

import flows.study as fs
from flows.study_cli import register
from flows.study_plan import StudyError, load_study, plan
from herl_core.config import load_params

ROOT = Path(__file__).resolve().parents[2]
STUDY = (
    "arms: [base, grpo, herl]\nseeds: [0, 1]\nexperiment: {exp}\nresults_dir: results/study/t\n"
    "overrides: [train.eval_every=1]\nprofiles:\n  t:\n    params_profile: tiny\n"
)


@pytest.fixture
def project(tmp_path, mlflow_uri, monkeypatch, request) -> Path:
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    (tmp_path / "study.yaml").write_text(STUDY.format(exp=f"s-{request.node.name}"), encoding="utf-8")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_uri)
    return tmp_path


def _sets(cmd: list[str]) -> dict[str, str]:
    return dict(cmd[i + 1].split("=", 1) for i, a in enumerate(cmd) if a == "--set")


def fake_herl(calls: list[list[str]], score: dict[int | None, float]):
    """A stand-in for ``run_command`` that writes what each herl stage would write (no model): train → steps.jsonl
    (validation at step 0), validation_final.json and val_outcomes.jsonl (4 prompts, 4 answers, the final all-met
    count = 4 · score of the seed); evaluate → metrics and samples."""

    def run(cmd, root, log, env, label="herl"):
        calls.append(cmd)
        sets, root = _sets(cmd), Path(root)
        if cmd[1] == "prepare":
            out = root / sets["prepare.out_dir"]
            out.mkdir(parents=True, exist_ok=True)
            for name in ("train.jsonl", "val.jsonl"):
                (out / name).write_text(name)
            (out / "report.json").write_text(json.dumps({"splits": {"train": {"prompts": 1}}}))
        elif cmd[1] == "train":
            seed, steps = int(sets["train.seed"]), 2
            rows = [{"step": s, "reward/mean": 0.1 * (s + seed), "perf/gen_tokens": 100.0} for s in range(steps)]
            rows[0] |= {"val/all_met_frac": 0.25}
            out = root / sets["train.report_dir"]
            out.mkdir(parents=True, exist_ok=True)
            (out / "steps.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
            (out / "summary.json").write_text("{}")
            (out / "validation_final.json").write_text(json.dumps({"step": 2, "val/all_met_frac": score[seed]}))
            outcomes = [
                {"step": st, "part": "val/", "prompt_id": f"p{i}", "answers": 4, "scored": 4,
                 "all_met": 1 if st == 0 else round(4 * score[seed]), "types": {}}
                for st in (0, steps) for i in range(4)
            ]  # fmt: skip
            (out / "val_outcomes.jsonl").write_text("".join(json.dumps(r) + "\n" for r in outcomes))
            (out / "rollouts.jsonl").write_text("big\n")  # stays in the run folder
            policy = root / sets["train.out_dir"]
            policy.mkdir(parents=True, exist_ok=True)
            (policy / "config.json").write_text("{}")
        else:
            seed = int(sets["train.seed"]) if "train.seed" in sets else None
            out = root / sets["evaluate.out_dir"]
            (out / "ifeval").mkdir(parents=True, exist_ok=True)
            rounds = [{"prompt_strict": score[seed]}]
            (out / "ifeval" / "metrics.json").write_text(json.dumps({"rounds": rounds}))
            (out / "ifeval" / "per_type.json").write_text("{}")
            sample = {"id": "ifeval-1", "prompt": "long text", "response": "long text", "prompt_strict": True,
                      "instructions": [{"id": "x", "strict": True, "loose": True}], "round": 0, "truncated": True,
                      "response_tokens": 128}  # fmt: skip
            (out / "ifeval" / "samples.jsonl").write_text(json.dumps(sample) + "\n")
            (out / "metrics.json").write_text(json.dumps({"ifeval/prompt_strict": score[seed], "policy": "p"}))

    return run


def test_finished_runs_are_skipped_and_the_report_is_complete(project, monkeypatch, mlflow_uri):
    calls: list[list[str]] = []
    monkeypatch.setattr(fs, "run_command", fake_herl(calls, {None: 0.25, 0: 0.5, 1: 0.75}))
    summary = fs.study.fn(study_file="study.yaml", profile="t", root=str(project))
    # prepare; phase train: 2 arms × 2 seeds; phase broad: base + 4 runs
    assert [c[1] for c in calls] == ["prepare"] + ["train"] * 4 + ["evaluate"] * 5
    # grpo final all-met: seeds [0.5, 0.75] → mean 0.625, s = 0.176777, h = 12.7062 · 0.176777 / √2 = 1.588275
    grpo = summary["arms"]["grpo"]["metrics"]["val/all_met_frac"]
    assert grpo["mean"] == pytest.approx(0.625) and grpo["half"] == pytest.approx(1.588275, abs=1e-5)
    text = (project / "reports/study.md").read_text()
    assert "| grpo | 2 | 62.5 ± 158.8 | 50.0, 75.0 |" in text and "| base | 2 | 25.0 ± 0.0 |" in text
    assert "Status: train: 4 of 4 runs done; broad: 5 of 5 runs done." in text
    assert (project / "reports/study/learning_curves.png").is_file() and (project / "reports/study.json").is_file()
    # the committed results: small files only, texts stripped, a record per phase with commit and commands
    res = project / "results/study/t/grpo-s0"
    assert sorted(p.name for p in (res / "train").iterdir()) == [
        "steps.jsonl", "summary.json", "val_outcomes.jsonl", "validation_final.json"
    ]  # fmt: skip
    outcome = json.loads((res / "evaluate/ifeval/outcomes.jsonl").read_text())
    assert outcome == {"id": "ifeval-1", "round": 0, "prompt_strict": True, "truncated": True, "response_tokens": 128,
                       "instructions": [{"id": "x", "strict": True, "loose": True}]}  # fmt: skip
    record = json.loads((res / "study_run.json").read_text())
    assert record["arm"] == "grpo" and record["seed"] == 0 and set(record["phases"]) == {"train", "broad"}
    assert record["phases"]["train"]["commands"][0].startswith("herl train --params params.yaml --profile tiny")
    assert json.loads((res / "config.json").read_text())["train"]["seed"] == 0
    assert json.loads((project / "results/study/t/data.json").read_text())["sha256"].keys() == {
        "train.jsonl", "val.jsonl"
    }  # fmt: skip

    # second call: every phase of every run has its results → nothing recomputed, the same report
    calls.clear()
    again = fs.study.fn(study_file="study.yaml", profile="t", root=str(project))
    assert calls == []
    assert again["arms"] == summary["arms"] and (project / "reports/study.md").read_text() == text

    # MLflow: one parent "study" with one child per arm, reused across the two calls
    client = MlflowClient(mlflow_uri)
    ids = json.loads((project / "runs/study/mlflow_runs.json").read_text())["runs"]
    children = client.search_runs(
        [client.get_run(ids["study"]).info.experiment_id], f"tags.mlflow.parentRunId = '{ids['study']}'"
    )
    assert sorted(r.info.run_name for r in children) == ["base", "grpo", "herl"]
    grpo_run = client.get_run(ids["grpo"])
    assert grpo_run.data.metrics["val/all_met_frac/mean"] == pytest.approx(0.625)
    assert grpo_run.info.status == "FINISHED"
    assert "study.md" in {a.path.split("/")[-1] for a in client.list_artifacts(ids["study"], "report")}


def test_report_only_renders_the_same_report_from_committed_results_alone(project, monkeypatch):
    """Resume across machines: delete every run folder (weights, logs, prepared data), keep results/ → the report
    is the same file; a run folder deleted on a new machine reuses the committed results (nothing reruns)."""
    calls: list[list[str]] = []
    monkeypatch.setattr(fs, "run_command", fake_herl(calls, {None: 0.25, 0: 0.5, 1: 0.75}))
    with pytest.raises(fs.StudyError, match="no run of this study has finished"):
        fs.rerender("study.yaml", "t", str(project))
    fs.study.fn(study_file="study.yaml", profile="t", root=str(project))
    report = (project / "reports/study.md").read_text()
    png = (project / "reports/study/learning_curves.png").read_bytes()
    shutil.rmtree(project / "runs")
    (project / "reports/study.md").write_text("stale")
    calls.clear()
    again = fs.rerender("study.yaml", "t", str(project))
    assert calls == []  # nothing ran
    assert (project / "reports/study.md").read_text() == report
    assert (project / "reports/study/learning_curves.png").read_bytes() == png
    assert again["status"]["complete"]
    # the study itself on the "new machine": prepares its data again (same bytes), runs nothing else
    fs.study.fn(study_file="study.yaml", profile="t", root=str(project))
    assert [c[1] for c in calls] == ["prepare"]
    assert (project / "reports/study.md").read_text() == report


def test_a_partial_study_reports_what_remains(project, monkeypatch):
    monkeypatch.setattr(fs, "run_command", fake_herl([], {None: 0.25, 0: 0.5, 1: 0.75}))
    fs.study.fn(study_file="study.yaml", profile="t", root=str(project), arms=["grpo"], seeds=[0], phases=["train"])
    text = (project / "reports/study.md").read_text()
    assert "Status: train: 1 of 4 runs done; broad: 0 of 5 runs done." in text
    assert "Continue with `herl study --study study.yaml --profile t`" in text


def test_an_unfinished_run_is_resumed_and_gets_its_arm_as_mlflow_parent(project, monkeypatch):
    calls: list[list[str]] = []
    envs: list[dict] = []
    fake = fake_herl(calls, {None: 0.25, 0: 0.5, 1: 0.75})

    def run(cmd, root, log, env, label="herl"):
        envs.append(env)
        fake(cmd, root, log, env, label)

    monkeypatch.setattr(fs, "run_command", run)
    fs.study.fn(study_file="study.yaml", profile="t", root=str(project), arms=["grpo"], seeds=[0])
    record = project / "results/study/t/grpo-s0/study_run.json"
    data = json.loads(record.read_text())
    del data["phases"]["broad"]  # evaluate "crashed" before its results were saved
    record.write_text(json.dumps(data))
    calls.clear()
    fs.study.fn(study_file="study.yaml", profile="t", root=str(project), arms=["grpo"], seeds=[0])
    assert [c[1] for c in calls] == ["evaluate"]  # data prepared and train finished before: only evaluate
    ids = json.loads((project / "runs/study/mlflow_runs.json").read_text())["runs"]
    assert envs[-1]["HERL_MLFLOW_PARENT_RUN_ID"] == ids["grpo"]
    # trained on another machine (no policy folder here): the broad phase retrains first and says so
    shutil.rmtree(project / "runs/study/grpo-s0/policy")
    data = json.loads(record.read_text())
    del data["phases"]["broad"]
    record.write_text(json.dumps(data))
    calls.clear()
    fs.study.fn(study_file="study.yaml", profile="t", root=str(project), arms=["grpo"], seeds=[0])
    assert [c[1] for c in calls] == ["train", "evaluate"]
    assert json.loads(record.read_text())["phases"]["broad"]["retrained"] is True


def test_a_finished_run_of_another_config_is_refused(project, monkeypatch):
    monkeypatch.setattr(fs, "run_command", fake_herl([], {None: 0.25, 0: 0.5}))
    fs.study.fn(study_file="study.yaml", profile="t", root=str(project), arms=["grpo"], seeds=[0])
    record = project / "results/study/t/grpo-s0" / fs.RUN_FILE
    data = json.loads(record.read_text())
    data["phases"]["train"]["config_hash"] = "0000"
    record.write_text(json.dumps(data))
    with pytest.raises(StudyError, match=r"grpo-s0 holds the train phase of a run made under config 0000"):
        fs.study.fn(study_file="study.yaml", profile="t", root=str(project), arms=["grpo"], seeds=[0])


def test_data_that_differs_from_the_committed_fingerprint_is_refused(project, monkeypatch):
    monkeypatch.setattr(fs, "run_command", fake_herl([], {None: 0.25, 0: 0.5}))
    fs.study.fn(study_file="study.yaml", profile="t", root=str(project), arms=["base"])
    (project / "runs/study/data/val.jsonl").write_text("other bytes")
    with pytest.raises(StudyError, match="differs from the data the results in results/study/t were made from"):
        fs.study.fn(study_file="study.yaml", profile="t", root=str(project), arms=["base"])


def test_commit_records_each_finished_phase(project, monkeypatch):
    import subprocess

    def git(*args):
        return subprocess.run(["git", *args], cwd=project, capture_output=True, text=True, check=True).stdout

    git("init", "-q")
    git("config", "user.email", "t@example.com")
    git("config", "user.name", "t")
    (project / "unrelated.txt").write_text("staged but not the study's")
    git("add", "unrelated.txt")
    monkeypatch.setattr(fs, "run_command", fake_herl([], {None: 0.25, 0: 0.5}))
    fs.study.fn(study_file="study.yaml", profile="t", root=str(project), arms=["grpo"], seeds=[0], commit=True)
    log = git("log", "--format=%s").splitlines()
    assert log == [
        "study t: report (train: 1 of 4 runs done; broad: 1 of 5 runs done)",
        "study t: grpo-s0 broad phase finished",
        "study t: grpo-s0 train phase finished",
        "study t: data fingerprint",
    ]
    assert "results/study/t/grpo-s0/train/steps.jsonl" in git("show", "--name-only", "--format=", "HEAD~2")
    assert "unrelated.txt" not in git("ls-tree", "-r", "--name-only", "HEAD")  # only the study's files
    assert "A  unrelated.txt" in git("status", "--porcelain")  # still staged, untouched


def test_bad_override_fails_before_anything_runs(project, monkeypatch):
    calls: list = []
    monkeypatch.setattr(fs, "run_command", fake_herl(calls, {}))
    (project / "study.yaml").write_text("overrides: [rollout.n=1]\nprofiles:\n  t:\n    params_profile: tiny\n")
    with pytest.raises(ValueError, match="rollout.n"):
        fs.study.fn(study_file="study.yaml", profile="t", root=str(project))
    assert calls == [] and not (project / "runs").exists()


def test_run_command_reports_failure_with_log_tail(tmp_path):
    with pytest.raises(fs.CommandError, match=r"(?s)exited with 3 .*boom"):
        fs.run_command.fn(["sh", "-c", "echo boom; exit 3"], str(tmp_path), "x.log", {"PATH": "/usr/bin:/bin"})
    assert "boom" in (tmp_path / "x.log").read_text()


# ---------------------------------------------------------------------------------------------------- end to end


@pytest.mark.integration
def test_tiny_study_end_to_end(tmp_path, mlflow_uri, monkeypatch):
    """The repo's tiny study profile (targeted data, validation, both phases), restricted to base + grpo + herl, run
    by the real flow; then the report rendered again from the results alone, with every run folder deleted."""
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    shutil.copy(ROOT / "study.yaml", tmp_path / "study.yaml")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_uri)
    summary = fs.study(study_file="study.yaml", profile="tiny", root=str(tmp_path), arms=["base", "grpo", "herl"])
    study = load_study(tmp_path / "study.yaml", "tiny")
    report = tmp_path / study.report
    text = report.read_text()
    for arm in ("base", "grpo", "herl"):
        assert f"| {arm} | 1 |" in text  # the primary metric: base from step 0, the arms after training
    assert "| herl − grpo |" in text and "herl − grpo = " in text
    assert (report.with_suffix("") / "learning_curves.png").is_file()
    assert "train: 2 of 3 runs done; broad: 3 of 4 runs done" in summary["status"]["line"]  # no grpo_equal_tokens
    # real training logs of the same shape; validation at steps 0, 1 and after the last update (step 2)
    cfg = load_params(tmp_path / "params.yaml", "tiny", plan(study)[1]["overrides"])
    results = tmp_path / study.results_dir
    for arm in ("grpo", "herl"):
        steps = (results / f"{arm}-s0/train/steps.jsonl").read_text().splitlines()
        assert len(steps) == cfg.train.steps == 2
        assert summary["arms"][arm]["curves"]["val/all_met_frac"]["step"] == [0, 1, 2]
    assert summary["arms"]["herl"]["tokens_vs"]["grpo"] >= 1.0
    # the targeted data: only the two listed constraint types in training and validation
    data = json.loads((results / "data.json").read_text())["report"]
    assert set(data["splits"]["val"]["per_type"]) <= {"change_case:english_lowercase", "punctuation:no_comma"}
    # the pipeline's DVC outputs were not touched
    assert not (tmp_path / "models").exists() and not (tmp_path / "data").exists()
    # resume from committed results: no run folder, the same report
    shutil.rmtree(tmp_path / study.out_dir)
    fs.rerender("study.yaml", "tiny", str(tmp_path))
    assert report.read_text() == text


def test_register_adds_the_study_command():
    import typer
    from typer.testing import CliRunner

    app = typer.Typer()

    @app.command()
    def other() -> None:  # a second command, so typer keeps subcommand names
        pass

    register(app)
    result = CliRunner().invoke(app, ["study", "--help"])
    assert result.exit_code == 0
    for option in ("--study", "--profile", "--arms", "--seeds", "--phase", "--commit", "--report-only"):
        assert option in result.output


def test_data_prepared_under_other_settings_is_refused(project, monkeypatch):
    monkeypatch.setattr(fs, "run_command", fake_herl([], {None: 0.25, 0: 0.5}))
    fs.study.fn(study_file="study.yaml", profile="t", root=str(project), arms=["base"])
    record = project / "runs/study/data" / fs.RUN_FILE
    assert json.loads(record.read_text())["prepare"]["train_source"] == "synthetic"  # the tiny params profile
    record.write_text(json.dumps({"prepare": {"seed": 7}}))
    with pytest.raises(StudyError, match=r"prepared under other prepare settings \(\{'seed': 7\}\)"):
        fs.study.fn(study_file="study.yaml", profile="t", root=str(project), arms=["base"])
