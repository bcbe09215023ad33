"""flows/console.py and the pipeline's console filter: what a person reads while herl runs and when it ends."""

from __future__ import annotations

import io

import pytest
from rich.console import Console

import flows.console as con
from flows.pipeline import console_line

STEP = {"reward/mean": 0.2083, "reward/frac_zero_std": 1.0, "herl/rewrite_success_rate": 0.25, "actor/loss": 0.00123,
        "perf/step_s": 52.14, "actor/kl": 0.5}  # fmt: skip


def plain() -> tuple[Console, io.StringIO]:
    out = io.StringIO()
    return Console(file=out, force_terminal=False, width=80), out


def test_a_step_line_has_the_0_based_step_the_progress_and_the_headline_metrics():
    # 2 of 4 steps done: the one just finished is step 1 (MLflow's and steps.jsonl's step), in one short line
    line = con.step_line(2, 4, STEP)
    assert line == "[2/4] step 1  reward 0.208  zero-std 1.000  rewrite-success 0.250  loss 0.00123  52.1 s/step"
    assert len(line) < 100
    grpo = {k: v for k, v in STEP.items() if not k.startswith("herl/")}  # hindsight off: no rewrite column
    assert con.step_line(1, 4, grpo) == "[1/4] step 0  reward 0.208  zero-std 1.000  loss 0.00123  52.1 s/step"
    # a validation step (train.eval_every) adds the validation reward; the other val/* stay in the logs
    val = {**STEP, "val/reward_mean": 0.3125, "val/greedy/reward_mean": 0.5, "val/all_met_frac": 0.0}
    line = con.step_line(1, 4, val)
    assert line == ("[1/4] step 0  reward 0.208  zero-std 1.000  rewrite-success 0.250  loss 0.00123  val-reward 0.312"
                    "  52.1 s/step")  # fmt: skip


def test_progress_in_a_log_file_is_one_plain_line_per_step_with_its_eta(monkeypatch):
    clock = iter([100.0, 130.0, 160.0])  # start, then a step every 30 s
    monkeypatch.setattr(con.time, "monotonic", lambda: next(clock))
    console, out = plain()
    progress, on_step = con.train_progress(4, console)
    with progress:
        on_step(1, STEP)  # 30 s for 1 step, 3 left: 90 s
        on_step(2, STEP)  # 60 s for 2 steps, 2 left: 60 s
    assert out.getvalue().splitlines() == [
        con.step_line(1, 4, STEP) + "  ETA 1m30s",
        con.step_line(2, 4, STEP) + "  ETA 1m00s",
    ]
    assert "\x1b" not in out.getvalue() and "━" not in out.getvalue()  # no bar, no escape codes in a file


def test_a_resumed_run_counts_its_eta_from_its_own_steps(monkeypatch):
    clock = iter([0.0, 40.0])
    monkeypatch.setattr(con.time, "monotonic", lambda: next(clock))
    console, out = plain()
    progress, on_step = con.train_progress(5, console)
    with progress:
        on_step(4, STEP)  # resumed at step 3: one step done here in 40 s, one left
    assert out.getvalue().strip().endswith("ETA 40s")


def test_progress_in_a_terminal_draws_a_bar_with_the_count_and_prints_each_step_above_it():
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=120)
    progress, on_step = con.train_progress(4, console)
    with progress:
        on_step(1, STEP)
        on_step(2, STEP)
    text = out.getvalue()
    assert con.step_line(1, 4, STEP) in text and con.step_line(2, 4, STEP) in text
    assert "━" in text and "2/4" in text and "ETA" in text


def test_evaluate_progress_is_per_benchmark_and_batch():
    console, out = plain()
    progress = con.EvalProgress(console)
    for what, batch in (("ifeval", 1), ("ifeval", 2), ("ifbench", 1)):
        progress(what, batch, 2, 40)
    progress.close()
    lines = [line.split("  ETA")[0] for line in out.getvalue().splitlines()]
    assert lines == [
        "evaluate ifeval: batch 1/2 (40 prompts)",
        "evaluate ifeval: batch 2/2 (40 prompts)",
        "evaluate ifbench: batch 1/2 (40 prompts)",
    ]


@pytest.mark.parametrize(
    "stage, headline, expected",
    [
        ("prepare", {"train/prompts": 16, "train/constraints": 36, "val/prompts": 4, "ifeval/prompts": 541,
                     "ifbench/prompts": 300, "dropped_overlapping_instructions": 0, "disjoint": True},
         "16 training prompts (36 constraints); held out: validation 4, IFEval 541, IFBench 300 prompts; "
         "disjoint: yes"),
        ("rollout", {"prompts": 8, "samples": 32, "reward/mean": 0.25, "reward/frac_zero_std": 0.5, "pass_at_G": 0.125,
                     "failed_group_frac": 1.0, "truncated_frac": 0.0},
         "8 prompts × 4 samples: reward 0.250, pass@G 0.125, groups without signal 0.500, truncated 0.000"),
        ("hindsight", {"groups": 8, "herl/failed_groups": 7.0, "herl/rewrites": 20.0, "herl/rewrite_success_rate": 0.2,
                       "herl/over_prev_best_rate": 0.1, "herl/bonus_mean": 0.0125},
         "7 of 8 groups failed, 20 rewrites: rewrite success 0.200, over the group's best 0.100, bonus 0.013"),
        ("train", {"steps": 4.0, "reward/mean_first": 0.2, "reward/mean": 0.3, "reward/frac_zero_std_first": 1.0,
                   "reward/frac_zero_std": 0.5, "herl/rewrite_success_rate_first": 0.2,
                   "herl/rewrite_success_rate": 0.667, "perf/step_s_mean": 53.04},
         "4 steps, reward 0.200 → 0.300, rewrite success 0.200 → 0.667, groups without signal 1.000 → 0.500, "
         "53.0 s/step"),
        ("train", {"steps": 4.0, "reward/mean_first": 0.2, "reward/mean": 0.3, "reward/frac_zero_std_first": 1.0,
                   "reward/frac_zero_std": 0.5, "val/reward_mean_first": 0.125, "val/reward_mean": 0.25,
                   "perf/step_s_mean": 53.04},
         "4 steps, reward 0.200 → 0.300, groups without signal 1.000 → 0.500, validation reward 0.125 → 0.250, "
         "53.0 s/step"),
        ("evaluate", {"policy": "models/policy", "policy_fallback": False, "ifbench/prompt_strict": 0.025,
                      "ifbench/inst_strict": 0.047, "ifbench/truncated_frac": 0.1, "ifeval/prompt_strict": 0.15,
                      "ifeval/inst_strict": 0.206, "ifeval/truncated_frac": 0.625},
         "IFEval prompt-strict 0.150 inst-strict 0.206 (truncated 0.625); IFBench prompt-strict 0.025 inst-strict "
         "0.047 (truncated 0.100)"),
    ],
)  # fmt: skip
def test_each_stage_summarises_its_headline_in_one_line(stage, headline, expected):
    assert con.stage_summary(stage, headline) == expected


def test_an_untrained_evaluation_says_so():
    text = con.stage_summary("evaluate", {"policy_fallback": True, "ifeval/prompt_strict": 0.1})
    assert text.endswith("UNTRAINED model (no trained policy found)")


def test_numbers_read_as_a_person_reads_them():
    assert con.number(0.20833, "reward/mean") == "0.208" and con.number(1.0, "ifeval/prompt_strict") == "1.000"
    assert con.number(16.0, "herl/rewrites") == "16" and con.number(0.00123, "actor/loss") == "0.00123"
    assert con.number(None) == "n/a" and con.number(float("nan"), "reward/mean") == "nan"
    assert [con.duration(s) for s in (42, 185, 3720)] == ["42s", "3m05s", "1h02m"]


def test_the_mlflow_hint_is_the_servers_url_or_the_ui_command_in_the_model_training_view():
    url = con.mlflow_hint("http://mlflow.example:5000/", "3", "abc")
    assert url == "http://mlflow.example:5000/#/experiments/3/runs/abc?workflowType=machine_learning"
    local = con.mlflow_hint("sqlite:////w/mlruns.db", "3", None)
    assert local.endswith(
        "ui --launch, then http://127.0.0.1:5000/#/experiments/3/runs?viewStateShareKey=herl&"
        "workflowType=machine_learning"
    )


def test_errors_keep_long_paths_whole_and_brackets_literal():
    console, out = plain()
    path = "/a/very/long/path/" + "x" * 90 + "/model.safetensors"
    con.error(f"{path} is truncated; found ['pytorch_model.bin']", console)
    assert out.getvalue() == f"error: {path} is truncated; found ['pytorch_model.bin']\n"


# --------------------------------------------------------------------------------------------------------------------
# herl pipeline's console: DVC's per-stage chatter is left out


DVC_OUTPUT = """\
Running stage 'train':
> scripts/herl train
herl train · profile tiny · model tiny · 2 steps of 4 prompts × G=4 · HeRL · config b21355b2f7dddf91
[1/2] step 0  reward 0.208  zero-std 1.000  loss 0  30.1 s/step  ETA 33s
WARNING: 'herl_core/__init__.py' is empty.
Updating lock file 'dvc.lock'

To track the changes with git, run:

\tgit add dvc.lock

To enable auto staging, run:

\tdvc config core.autostage true
Use `dvc push` to send your updates to remote storage.
Stage 'prepare' didn't change, skipping
error: data/prompts.jsonl:2: field 'prompt': prompt 'long' is 177 tokens once encoded
"""


def test_the_pipeline_console_keeps_the_stage_output_and_drops_dvcs_repeated_advice():
    shown = [s for s in (console_line(line + "\n") for line in DVC_OUTPUT.splitlines()) if s is not None]
    assert shown == [
        "herl train · profile tiny · model tiny · 2 steps of 4 prompts × G=4 · HeRL · config b21355b2f7dddf91",
        "[1/2] step 0  reward 0.208  zero-std 1.000  loss 0  30.1 s/step  ETA 33s",
        "skipped: nothing it reads changed since the last run (dvc.lock)",
        "error: data/prompts.jsonl:2: field 'prompt': prompt 'long' is 177 tokens once encoded",
    ]
