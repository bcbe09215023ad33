"""Which MLflow run a ``herl train`` writes to, as a new user meets it: the CLI on the tiny profile, a temp sqlite
store, in a fresh workspace.

1. ``herl train``, then ``herl train --set hindsight.bonus_alpha=0.1``: other settings, so the second command starts
   fresh (step 0) in a NEW run; the first run's history is left as it was (before the fix, both experiments' steps
   0 and 1 landed in one run, twice each).
2. That second command interrupted after its first step, then run again unchanged: a true resume, so it continues
   the checkpoint in the SAME run, each step logged once.

Run: .venv/bin/pytest tests/flows/test_resume_identity.py (about a minute on 2 cores).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from mlflow import MlflowClient
from typer.testing import CliRunner

from flows.cli import app
from herl_core.train import Trainer

ROOT = Path(__file__).resolve().parents[2]
RUNNER = CliRunner()
TINY = ["--profile", "tiny"]
ALPHA = ["--set", "hindsight.bonus_alpha=0.1"]


def invoke(*args: str):
    result = RUNNER.invoke(app, list(args))
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result


def train_runs(client: MlflowClient) -> dict[str, object]:
    exp = client.get_experiment_by_name("herl-tiny")
    runs = client.search_runs([exp.experiment_id], "attributes.run_name = 'train'", order_by=["attributes.start_time"])
    return {r.info.run_id: r for r in runs}


def steps(client: MlflowClient, run_id: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, "reward/mean"))


def checkpoint_run(root: Path) -> str:
    folder = sorted((root / "runs/train/checkpoints").glob("step-*"))[-1]
    return json.loads((folder / "trainer_state.json").read_text())["trainer"]["extras"]["mlflow_run_id"]


@pytest.fixture
def ws(tmp_path, monkeypatch, mlflow_uri):
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_uri)
    invoke("prepare", *TINY)
    return tmp_path


def test_a_config_change_opens_a_new_run_and_a_true_resume_continues_its_run(ws, monkeypatch, mlflow_uri):
    client = MlflowClient(tracking_uri=mlflow_uri)
    invoke("train", *TINY)
    (first,) = train_runs(client)
    assert steps(client, first) == [0, 1]

    # other settings, interrupted after its first step (the checkpoint after step 0 is written first)
    real_step = Trainer.step

    def crash_in_second_step(self):
        if self.state.step == 1:
            raise RuntimeError("interrupted")
        return real_step(self)

    monkeypatch.setattr(Trainer, "step", crash_in_second_step)
    crashed = RUNNER.invoke(app, ["train", *TINY, *ALPHA])
    assert isinstance(crashed.exception, RuntimeError)
    runs = train_runs(client)
    (second,) = set(runs) - {first}  # a new run for the new settings...
    assert runs[second].info.status == "FAILED" and steps(client, second) == [0]  # ...from step 0
    assert "herl.resumed_at_step" not in runs[second].data.tags
    assert steps(client, first) == [0, 1] and runs[first].info.status == "FINISHED"  # the first run is untouched
    assert checkpoint_run(ws) == second
    report = [json.loads(x)["step"] for x in (ws / "reports/train/steps.jsonl").read_text().splitlines()]
    assert report == [0]  # the train report restarted too

    # the same command again: a true resume of the interrupted run, into the same MLflow run
    monkeypatch.setattr(Trainer, "step", real_step)
    invoke("train", *TINY, *ALPHA)
    runs = train_runs(client)
    assert set(runs) == {first, second}
    assert runs[second].info.status == "FINISHED" and runs[second].data.tags["herl.resumed_at_step"] == "1"
    assert steps(client, second) == [0, 1] and steps(client, first) == [0, 1]  # each step once, in its own run
    assert runs[second].data.params["hindsight.bonus_alpha"] == "0.1"
    assert runs[first].data.params["hindsight.bonus_alpha"] == "0.05"
