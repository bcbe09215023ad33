"""flows/study.py: resumability (finished runs are skipped, a foreign finished run is refused), the MLflow parent /
arm structure and the report, with a fake ``herl`` command; and (integration) the tiny study end to end."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from mlflow import MlflowClient

import flows.study as fs
from flows.study_plan import StudyError, load_study, plan
from herl_core.config import load_params

ROOT = Path(__file__).resolve().parents[2]
STUDY = "arms: [base, grpo, herl]\nseeds: [0, 1]\nexperiment: {exp}\nprofiles:\n  t:\n    params_profile: tiny\n"


@pytest.fixture
def project(tmp_path, mlflow_uri, monkeypatch, request) -> Path:
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    (tmp_path / "study.yaml").write_text(STUDY.format(exp=f"s-{request.node.name}"), encoding="utf-8")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_uri)
    return tmp_path


def _sets(cmd: list[str]) -> dict[str, str]:
    return dict(cmd[i + 1].split("=", 1) for i, a in enumerate(cmd) if a == "--set")


def fake_herl(calls: list[list[str]], score: dict[int | None, float]):
    """A stand-in for ``run_command`` that writes what each herl stage would write (no model)."""

    def run(cmd, root, log, env, label="herl"):
        calls.append(cmd)
        sets, root = _sets(cmd), Path(root)
        if cmd[1] == "prepare":
            (root / sets["prepare.out_dir"]).mkdir(parents=True, exist_ok=True)
            (root / sets["prepare.out_dir"] / "report.json").write_text("{}")
        elif cmd[1] == "train":
            seed = int(sets["train.seed"])
            steps = [{"step": s, "reward/mean": 0.1 * (s + seed), "perf/gen_tokens": 100.0} for s in range(2)]
            (root / sets["train.report_dir"]).mkdir(parents=True, exist_ok=True)
            (root / sets["train.report_dir"] / "steps.jsonl").write_text("".join(json.dumps(r) + "\n" for r in steps))
        else:
            seed = int(sets["train.seed"]) if "train.seed" in sets else None
            out = root / sets["evaluate.out_dir"]
            (out / "ifeval").mkdir(parents=True, exist_ok=True)
            (out / "ifeval" / "metrics.json").write_text(json.dumps({"rounds": [{"prompt_strict": score[seed]}]}))
            (out / "metrics.json").write_text(json.dumps({"ifeval/prompt_strict": score[seed], "policy": "p"}))

    return run


def test_finished_runs_are_skipped_and_the_report_is_complete(project, monkeypatch, mlflow_uri):
    calls: list[list[str]] = []
    monkeypatch.setattr(fs, "run_command", fake_herl(calls, {None: 0.25, 0: 0.5, 1: 0.75}))
    summary = fs.study.fn(study_file="study.yaml", profile="t", root=str(project))
    # prepare + base evaluate + 2 arms × 2 seeds × (train, evaluate) = 1 + 1 + 8 commands
    assert [c[1] for c in calls] == ["prepare", "evaluate"] + ["train", "evaluate"] * 4
    # grpo: seeds [0.5, 0.75] → mean 0.625, s = 0.176777, h = 12.7062 · 0.176777 / √2 = 1.588275
    grpo = summary["eval"]["grpo"]["ifeval/prompt_strict"]
    assert grpo["mean"] == pytest.approx(0.625) and grpo["half"] == pytest.approx(1.588275, abs=1e-5)
    text = (project / "reports/study.md").read_text()
    assert "| grpo | 2 | 62.5 ± 158.8 |" in text and "| base | 1 | 25.0 (CI n/a) |" in text
    assert (project / "reports/study/reward_curves.png").is_file() and (project / "reports/study.json").is_file()

    # second call: every run has its metrics.json → nothing recomputed, every run marked reused
    calls.clear()
    again = fs.study.fn(study_file="study.yaml", profile="t", root=str(project))
    assert calls == []
    assert all(r["reused"] for r in again["meta"]["runs"])
    assert again["eval"] == summary["eval"]

    # MLflow: one parent "study" with one child per arm, reused across the two calls
    client = MlflowClient(mlflow_uri)
    ids = json.loads((project / "runs/study/mlflow_runs.json").read_text())["runs"]
    children = client.search_runs(
        [client.get_run(ids["study"]).info.experiment_id], f"tags.mlflow.parentRunId = '{ids['study']}'"
    )
    assert sorted(r.info.run_name for r in children) == ["base", "grpo", "herl"]
    grpo_run = client.get_run(ids["grpo"])
    assert grpo_run.data.metrics["ifeval/prompt_strict/mean"] == pytest.approx(0.625)
    assert grpo_run.info.status == "FINISHED"
    assert "study.md" in {a.path.split("/")[-1] for a in client.list_artifacts(ids["study"], "report")}


def test_report_only_rewrites_the_report_from_finished_runs(project, monkeypatch):
    calls: list[list[str]] = []
    monkeypatch.setattr(fs, "run_command", fake_herl(calls, {None: 0.25, 0: 0.5, 1: 0.75}))
    with pytest.raises(fs.StudyError, match="run the study first"):
        fs.rerender("study.yaml", "t", str(project))
    first = fs.study.fn(study_file="study.yaml", profile="t", root=str(project))
    calls.clear()
    (project / "reports/study.md").write_text("stale")
    again = fs.rerender("study.yaml", "t", str(project))
    assert calls == []  # nothing ran
    assert again["eval"] == first["eval"] and again["meta"]["finished"] == first["meta"]["finished"]
    text = (project / "reports/study.md").read_text()
    assert "| grpo | 2 | 62.5 ± 158.8 |" in text and "re-rendered" in text and "--report-only" in text
    shutil.rmtree(project / "runs/study/grpo-s1/evaluate")
    with pytest.raises(fs.StudyError, match="have not finished: grpo-s1"):
        fs.rerender("study.yaml", "t", str(project))


def test_an_unfinished_run_is_resumed_and_gets_its_arm_as_mlflow_parent(project, monkeypatch):
    calls: list[list[str]] = []
    envs: list[dict] = []
    fake = fake_herl(calls, {None: 0.25, 0: 0.5, 1: 0.75})

    def run(cmd, root, log, env, label="herl"):
        envs.append(env)
        fake(cmd, root, log, env, label)

    monkeypatch.setattr(fs, "run_command", run)
    fs.study.fn(study_file="study.yaml", profile="t", root=str(project), arms=["grpo"], seeds=[0])
    (project / "runs/study/grpo-s0/evaluate/metrics.json").unlink()  # evaluate "crashed" before writing it
    calls.clear()
    fs.study.fn(study_file="study.yaml", profile="t", root=str(project), arms=["grpo"], seeds=[0])
    assert [c[1] for c in calls] == ["train", "evaluate"]  # data was prepared before: no prepare
    ids = json.loads((project / "runs/study/mlflow_runs.json").read_text())["runs"]
    assert envs[-1]["HERL_MLFLOW_PARENT_RUN_ID"] == ids["grpo"]


def test_a_finished_run_of_another_config_is_refused(project, monkeypatch):
    monkeypatch.setattr(fs, "run_command", fake_herl([], {None: 0.25, 0: 0.5}))
    fs.study.fn(study_file="study.yaml", profile="t", root=str(project), arms=["grpo"], seeds=[0])
    record = project / "runs/study/grpo-s0" / fs.RUN_FILE
    record.write_text(json.dumps({"config_hash": "0000"}))
    with pytest.raises(StudyError, match=r"grpo-s0 holds a finished run made under config 0000"):
        fs.study.fn(study_file="study.yaml", profile="t", root=str(project), arms=["grpo"], seeds=[0])


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
    """The repo's tiny study profile, restricted to base + grpo + herl with one seed, run by the real flow."""
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    shutil.copy(ROOT / "study.yaml", tmp_path / "study.yaml")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_uri)
    summary = fs.study(study_file="study.yaml", profile="tiny", root=str(tmp_path), arms=["base", "grpo", "herl"])
    study = load_study(tmp_path / "study.yaml", "tiny")
    report = tmp_path / study.report
    text = report.read_text()
    for arm in ("base", "grpo", "herl"):
        assert f"| {arm} | 1 |" in text
    assert (report.with_suffix("") / "reward_curves.png").is_file()
    assert (report.with_suffix("") / "eval_bars.png").is_file()
    # equal budget and real training logs: both trained arms ran train.steps steps of the same shape
    cfg = load_params(tmp_path / "params.yaml", "tiny", plan(study)[1]["overrides"])
    for arm in ("grpo", "herl"):
        steps = (tmp_path / study.out_dir / f"{arm}-s0/train/steps.jsonl").read_text().splitlines()
        assert len(steps) == cfg.train.steps
    assert summary["train"]["herl"]["gen_tokens"]["mean"] >= summary["train"]["grpo"]["gen_tokens"]["mean"] > 0
    # the pipeline's DVC outputs were not touched
    assert not (tmp_path / "models").exists() and not (tmp_path / "data").exists()


def test_register_adds_the_study_command():
    import typer
    from typer.testing import CliRunner

    app = typer.Typer()

    @app.command()
    def other() -> None:  # a second command, so typer keeps subcommand names
        pass

    from flows.study_cli import register

    register(app)
    result = CliRunner().invoke(app, ["study", "--help"])
    assert result.exit_code == 0
    for option in ("--study", "--profile", "--arms", "--seeds"):
        assert option in result.output


def test_data_prepared_under_other_settings_is_refused(project, monkeypatch):
    monkeypatch.setattr(fs, "run_command", fake_herl([], {None: 0.25, 0: 0.5}))
    fs.study.fn(study_file="study.yaml", profile="t", root=str(project), arms=["base"])
    record = project / "runs/study/data" / fs.RUN_FILE
    assert json.loads(record.read_text())["prepare"]["train_source"] == "synthetic"  # the tiny params profile
    record.write_text(json.dumps({"prepare": {"seed": 7}}))
    with pytest.raises(StudyError, match=r"prepared under other prepare settings \(\{'seed': 7\}\)"):
        fs.study.fn(study_file="study.yaml", profile="t", root=str(project), arms=["base"])
