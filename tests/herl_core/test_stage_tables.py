"""herl_core.stages: the train stage's per-step tables (steps.csv, val.csv) and headline numbers, by hand."""

from __future__ import annotations

import json
from pathlib import Path

from herl_core.stages import headline, summarise, write_step_tables

STEPS = [
    {"step": 0, "reward/mean": 0.25, "actor/loss": 0.5, "perf/step_s": 2.0, "val/reward_mean": 0.125,
     "val/greedy/reward_mean": 0.0, "perf/val_s": 1.0},
    {"step": 1, "reward/mean": 0.5, "actor/loss": 0.25, "perf/step_s": 4.0},
    {"step": 2, "reward/mean": 0.75, "actor/loss": 0.125, "perf/step_s": 3.0, "val/reward_mean": 0.375,
     "val/greedy/reward_mean": 0.5, "perf/val_s": 1.0},
]  # fmt: skip


def write_steps(folder: Path, rows: list[dict]) -> None:
    (folder / "steps.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_steps_csv_has_every_step_and_val_csv_the_validation_steps_only(tmp_path):
    write_steps(tmp_path, STEPS)
    write_step_tables(tmp_path)
    assert (tmp_path / "steps.csv").read_text().splitlines() == [
        "step,reward/mean,actor/loss,perf/step_s,val/reward_mean,val/greedy/reward_mean,perf/val_s",
        "0,0.25,0.5,2.0,0.125,0.0,1.0",
        "1,0.5,0.25,4.0,,,",  # step 1 did not validate: empty cells
        "2,0.75,0.125,3.0,0.375,0.5,1.0",
    ]
    assert (tmp_path / "val.csv").read_text().splitlines() == [
        "step,val/reward_mean,val/greedy/reward_mean",
        "0,0.125,0.0",
        "2,0.375,0.5",
    ]


def test_a_run_without_validation_leaves_no_val_csv_behind(tmp_path):
    write_steps(tmp_path, STEPS)
    write_step_tables(tmp_path)
    write_steps(tmp_path, [{k: v for k, v in r.items() if "val" not in k} for r in STEPS])  # a later run, no validation
    write_step_tables(tmp_path)
    assert not (tmp_path / "val.csv").exists()
    assert (tmp_path / "steps.csv").read_text().splitlines()[0] == "step,reward/mean,actor/loss,perf/step_s"


def test_train_headline_is_the_last_steps_values_and_the_first_and_last_validation():
    h = headline("train", summarise(STEPS))
    assert h == {
        "steps": 3.0,
        "reward/mean_first": 0.25,
        "reward/mean": 0.75,
        "actor/loss": 0.125,
        "val/reward_mean_first": 0.125,
        "val/reward_mean": 0.375,
        "perf/step_s_mean": 3.0,
    }
