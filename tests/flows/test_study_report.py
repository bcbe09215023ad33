"""flows/study_report.py: the report from committed results alone: primary metric, paired differences, base from
step 0, curves, budget, broad test, power, status — every number by hand."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from flows.study_plan import StudyConfig, plan
from flows.study_report import (
    build_report,
    fmt_ci,
    plot_all,
    render_markdown,
    round_outcomes,
    short_answers,
    verdict,
)

PROMPTS = ["p0", "p1", "p2", "p3"]


def _outcomes(step: int, all_met: list[int], k: int = 4) -> list[dict]:
    return [
        {"step": step, "part": "val/", "prompt_id": p, "answers": k, "scored": k, "all_met": m, "reward_sum": 0.0,
         "truncated": 0, "tokens": 10, "types": {}}
        for p, m in zip(PROMPTS, all_met, strict=True)
    ]  # fmt: skip


def write_run(
    results: Path, run: dict, step0: list[int], final: list[int], tokens: list[float], broad: dict | None = None
) -> None:
    """A finished run's results folder as flows/study.py writes it: 2 training steps, validation at step 0 and after
    the last update (step 2), k = 4 answers per prompt."""
    folder = results / run["name"]
    (folder / "train").mkdir(parents=True)
    history = [
        {"step": s, "reward/mean": 0.1 * (s + 1), "perf/gen_tokens": t, "perf/step_s": 2.0}
        for s, t in enumerate(tokens)
    ]
    history[0] |= {"val/all_met_frac": sum(step0) / 16, "perf/val_s": 1.0, "perf/val_tokens": 40.0}
    (folder / "train" / "steps.jsonl").write_text("".join(json.dumps(h) + "\n" for h in history))
    final_metrics = {"step": 2, "val/all_met_frac": sum(final) / 16, "val/type/lower": sum(final) / 32,
                     "perf/val_s": 1.0, "perf/val_tokens": 40.0}  # fmt: skip
    (folder / "train" / "validation_final.json").write_text(json.dumps(final_metrics))
    rows = _outcomes(0, step0) + _outcomes(2, final)
    (folder / "train" / "val_outcomes.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    phases = {"train": {"config_hash": "h", "commit": "abc1234def", "commands": ["herl train x"], "wall_s": 30.0,
                        "started": "2026-12-01T10:00:00+00:00", "finished": "2026-12-01T10:00:30+00:00",
                        "host": {"cpu": "EPYC", "cores": 2, "load_avg_1_5_15": [3.0, 3.0, 3.0]}}}  # fmt: skip
    if broad is not None:
        (folder / "evaluate" / "ifeval").mkdir(parents=True)
        (folder / "evaluate" / "metrics.json").write_text(json.dumps({"ifeval/prompt_strict": broad["rounds"][-1]}))
        rounds = [{"prompt_strict": x, "inst_strict": x} for x in broad["rounds"]]
        bench = {"rounds": rounds, "truncated_frac": broad.get("truncated", 0.0)}
        (folder / "evaluate" / "ifeval" / "metrics.json").write_text(json.dumps(bench))
        phases["broad"] = {**phases["train"], "commands": ["herl evaluate x"]}
    record = {k: run[k] for k in ("name", "arm", "variant", "seed")} | {"phases": phases}
    (folder / "study_run.json").write_text(json.dumps(record))


def write_base(results: Path, rounds: list[float]) -> None:
    folder = results / "base"
    (folder / "evaluate" / "ifeval").mkdir(parents=True)
    (folder / "evaluate" / "metrics.json").write_text(json.dumps({"ifeval/prompt_strict": rounds[-1]}))
    bench = {"rounds": [{"prompt_strict": x, "inst_strict": x} for x in rounds]}
    (folder / "evaluate" / "ifeval" / "metrics.json").write_text(json.dumps(bench))
    record = {"name": "base", "arm": "base", "variant": None, "seed": None,
              "phases": {"broad": {"commit": "abc", "commands": ["herl evaluate b"], "wall_s": 5.0}}}  # fmt: skip
    (folder / "study_run.json").write_text(json.dumps(record))


STEP0 = {0: [0, 0, 1, 0], 1: [0, 1, 0, 0]}  # the untrained policy's all-met counts (of 4) per prompt, per seed
FINAL = {
    ("grpo", 0): [1, 0, 2, 0],  # shares .25 0 .5 0 → .1875
    ("grpo", 1): [0, 1, 1, 0],  # 0 .25 .25 0 → .125
    ("herl", 0): [2, 0, 2, 1],  # .5 0 .5 .25 → .3125
    ("herl", 1): [1, 1, 2, 0],  # .25 .25 .5 0 → .25
}


@pytest.fixture
def study_results(tmp_path):
    study = StudyConfig(arms=["base", "grpo", "herl"], seeds=[0, 1, 2], results_dir="results/s",
                        preregistered={"primary": "held-out all-met", "mde_points": "20"})  # fmt: skip
    runs = plan(study)
    results = tmp_path / "results/s"
    write_base(results, [0.25, 0.5])
    for run in runs:
        key = (run["arm"], run["seed"])
        if key in FINAL:  # seed 2 has not run
            tokens = [100.0, 100.0] if run["arm"] == "grpo" else [150.0, 250.0]
            write_run(results, run, STEP0[run["seed"]], FINAL[key], tokens, broad={"rounds": [0.2, 0.4]})
    return study, runs, tmp_path


def test_primary_metric_base_and_paired_difference_by_hand(study_results):
    study, runs, root = study_results
    s = build_report(study, runs, root, "t", "study.yaml")
    grpo = s["arms"]["grpo"]["metrics"]["val/all_met_frac"]
    # [0.1875, 0.125]: mean 0.15625, sd 0.0441942, half 12.7062 · 0.0441942 / √2 = 12.7062 · 0.03125 = 0.397069
    assert grpo["mean"] == pytest.approx(0.15625) and grpo["half"] == pytest.approx(0.397069, abs=1e-5)
    # base = step 0 of the trained runs: 1/16 in both seeds → 0.0625, no spread
    base = s["arms"]["base"]["metrics"]["val/all_met_frac"]
    assert base["mean"] == pytest.approx(0.0625) and base["half"] == pytest.approx(0.0)
    assert s["step0_check"]["max_spread"] == 0.0  # grpo and herl of a seed saw the same step 0
    # herl − grpo per prompt: s0 [.25, 0, 0, .25], s1 [.25, 0, .25, 0] → mean 1/8
    (headline,) = [p for p in s["paired"] if (p["a"], p["b"]) == ("herl", "grpo")]
    assert headline["estimate"] == pytest.approx(0.125) and (headline["seeds"], headline["prompts"]) == (2, 4)
    assert headline["lo"] <= 0.125 <= headline["hi"] and headline["lo"] >= 0.0  # no cell is negative
    # grpo − base: s0 [.25, 0, .25, 0], s1 [0, 0, .25, 0] → 0.75 / 8 = 0.09375
    (vs_base,) = [p for p in s["paired"] if (p["a"], p["b"]) == ("grpo", "base")]
    assert vs_base["estimate"] == pytest.approx(0.09375)


def test_the_primary_contrast_comes_first(tmp_path):
    """HeRL − GRPO at equal tokens leads the paired differences, whatever the order of the arms in study.yaml."""
    study = StudyConfig(arms=["grpo", "grpo_equal_tokens", "herl"], seeds=[0], results_dir="results/s",
                        equal_tokens={"rollout_n": 8, "source": "test"})  # fmt: skip
    runs = plan(study)
    final = {"grpo": FINAL[("grpo", 0)], "grpo_equal_tokens": [1, 1, 1, 0], "herl": FINAL[("herl", 0)]}
    for run in runs:
        write_run(tmp_path / "results/s", run, STEP0[0], final[run["arm"]], [100.0, 100.0])
    s = build_report(study, runs, tmp_path, "t", "study.yaml")
    trained = [(p["a"], p["b"]) for p in s["paired"] if p["b"] != "base"]
    assert trained == [("herl", "grpo_equal_tokens"), ("herl", "grpo"), ("grpo_equal_tokens", "grpo")]
    # herl [.5, 0, .5, .25] − grpo_equal_tokens [.25, .25, .25, 0] = [.25, −.25, .25, .25] → mean 0.125
    assert s["paired"][0]["estimate"] == pytest.approx(0.125)


def test_budget_curves_broad_and_status(study_results):
    study, runs, root = study_results
    s = build_report(study, runs, root, "t", "study.yaml")
    # tokens per run: grpo 200, herl 400 → herl is 2.00 × grpo; validation 40 + 40 tokens per run
    assert s["arms"]["herl"]["tokens_vs"]["grpo"] == pytest.approx(2.0)
    assert s["arms"]["grpo"]["budget"]["val_tokens"]["mean"] == 80.0
    assert s["arms"]["grpo"]["budget"]["wall_s"]["mean"] == 30.0
    # the curve ends with the final validation (step 2 = train.steps)
    c = s["arms"]["herl"]["curves"]["val/all_met_frac"]
    assert c["step"] == [0, 2] and c["mean"] == [pytest.approx(0.0625), pytest.approx(0.28125)]
    # broad test: round 0 and 1 of base (one run) and of grpo (two seeds, equal values → no spread)
    assert s["broad"]["base"][1]["ifeval/prompt_strict"]["mean"] == 0.5
    assert s["broad"]["grpo"][0]["ifeval/prompt_strict"]["mean"] == 0.2
    # seed 2 never ran: 4 of 6 train runs, 5 of 7 broad runs, the command that continues
    assert s["status"]["line"] == "train: 4 of 6 runs done; broad: 5 of 7 runs done"
    assert s["status"]["remaining"]["train"] == ["grpo-s2", "herl-s2"]
    assert s["status"]["continue"] == "herl study --study study.yaml --profile t"


def test_markdown_report(study_results):
    study, runs, root = study_results
    summary = build_report(study, runs, root, "t", "study.yaml")
    text = render_markdown(summary)
    assert "Status: train: 4 of 6 runs done; broad: 5 of 7 runs done." in text
    assert "Continue with `herl study --study study.yaml --profile t`" in text
    assert "- **primary**: held-out all-met" in text
    # seed sd of grpo: |0.1875 − 0.125| / √2 = 0.0441942 → 4.4 points
    assert "| grpo | 2 | 15.6 ± 39.7 | 18.8, 12.5 | 4.4 |" in text
    assert "| base | 2 | 6.2 ± 0.0 | 6.2, 6.2 | 0.0 |" in text
    assert "| herl − grpo | +12.5 |" in text
    assert "below the pre-registered MDE of 20.0 points" in text or "herl is better" in text
    assert "- `grpo-s0` train: commit `abc1234def`" in text and "  - `herl train x`" in text
    assert "30.0 s wall on 2 × EPYC (load 3.00)" in text  # the 1-minute load average, two decimals
    assert "| herl | 400 ± 0 | 2.00 / 1.00 |" in text
    assert render_markdown(summary) == text  # deterministic


def test_verdict_sentences():
    base = {"a": "herl", "b": "grpo", "seeds": 3, "prompts": 128}
    assert "herl is better" in verdict({**base, "estimate": 0.05, "lo": 0.01, "hi": 0.09})
    assert "grpo is better" in verdict({**base, "estimate": -0.05, "lo": -0.09, "hi": -0.01})
    text = verdict({**base, "estimate": 0.01, "lo": -0.03, "hi": 0.05}, mde=0.08)
    assert text == (
        "herl − grpo = +1.0 points, 95 % interval [-3.0, +5.0] (3 seeds × 128 prompts): no detectable difference, "
        "the interval covers 0; differences below the pre-registered MDE of 8.0 points were not resolvable."
    )


def test_power_of_a_pilot_by_hand(tmp_path):
    """Pilot: two variants of grpo, one seed. prompt_var = variance over prompts of the per-prompt difference
    between the two trained policies; MDE for 128 prompts × 3 seeds with the assumed seed sd."""
    study = StudyConfig(arms=["grpo"], seeds=[0], variants={"a": ["train.lr=1e-5"], "b": ["train.lr=2e-5"]},
                        results_dir="results/p", phases=["train"],
                        power={"prompts": 128, "seeds": 3, "seed_sd": 0.03})  # fmt: skip
    runs = plan(study)
    results = tmp_path / "results/p"
    write_run(results, runs[0], STEP0[0], [1, 0, 2, 0], [100.0, 100.0])  # .25 0 .5 0
    write_run(results, runs[1], STEP0[0], [2, 0, 2, 1], [100.0, 100.0])  # .5 0 .5 .25
    s = build_report(study, runs, tmp_path, "p", "study.yaml")
    power = s["power"]
    # d = b − a... the pair (a, b): [.25−.5, 0, 0, −.25] = [−.25, 0, 0, −.25]: mean −.125, s² = 4·.015625/3 = 1/48
    (pair,) = [p for p in power["pairs"] if p["b"] != "base"]
    assert pair["var"] == pytest.approx(1 / 48)
    assert power["prompt_var"] == pytest.approx(1 / 48) and power["seed_var"] == pytest.approx(0.0009)
    # se = √(0.0009/3 + (1/48)/128) = √(0.0003 + 0.00016276) = 0.0215119; MDE = 2.801585 · se = 0.0602674
    assert power["mde"]["se"] == pytest.approx(0.0215119, abs=1e-6)
    assert power["mde"]["mde"] == pytest.approx(0.0602674, abs=1e-6)
    assert "**MDE = 6.0 points**" in render_markdown(s)
    assert s["status"]["line"] == "train: 2 of 2 runs done" and s["status"]["continue"] is None


def test_fmt_ci():
    assert fmt_ci({"mean": 0.4, "half": 0.49683}) == "40.0 ± 49.7"
    assert fmt_ci({"mean": 0.4123, "half": None}) == "41.2 (n = 1)"
    assert fmt_ci(None) == "–"
    assert fmt_ci({"mean": 1234.4, "half": 10.26}, 1.0, 0) == "1234 ± 10"


def test_plots_are_png(study_results, tmp_path):
    study, runs, root = study_results
    made = plot_all(build_report(study, runs, root, "t", "study.yaml"), tmp_path / "plots")
    for path in made.values():
        assert path is not None and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_diagnostics_average_each_run_over_its_steps_then_over_seeds(tmp_path):
    """Training diagnostics: per run the mean over the steps that logged the metric, then mean ± 95 % over seeds;
    a metric no run logged (GRPO's herl/*) is '–', a metric no arm logged gets no column."""
    study = StudyConfig(arms=["grpo", "herl"], seeds=[0, 1], results_dir="results/s")
    runs = plan(study)
    results = tmp_path / "results/s"
    cut = {("grpo", 0): [0.5, 0.25], ("grpo", 1): [0.25, 0.25], ("herl", 0): [0.75, 0.75], ("herl", 1): [1.0, 0.5]}
    for run in runs:
        key = (run["arm"], run["seed"])
        write_run(results, run, STEP0[run["seed"]], FINAL[key], [100.0, 100.0])
        path = results / run["name"] / "train" / "steps.jsonl"
        history = [json.loads(x) for x in path.read_text().splitlines()]
        for h, c in zip(history, cut[key], strict=True):
            h["rollout/truncated_frac"] = c
            if run["arm"] == "herl":
                h["herl/rewrite_truncated_frac"] = 1.0 - c
        path.write_text("".join(json.dumps(h) + "\n" for h in history))
        final_path = results / run["name"] / "train" / "validation_final.json"
        final = json.loads(final_path.read_text()) | {"val/truncated_frac": 0.5 if run["arm"] == "herl" else 0.25}
        final_path.write_text(json.dumps(final))
    s = build_report(study, runs, tmp_path, "t", "study.yaml")
    # grpo: run means 0.375 and 0.25 → 0.3125; herl: 0.75 and 0.75 → 0.75 (no spread)
    assert s["arms"]["grpo"]["training"]["rollout/truncated_frac"]["mean"] == pytest.approx(0.3125)
    assert s["arms"]["herl"]["training"]["rollout/truncated_frac"]["mean"] == pytest.approx(0.75)
    assert s["arms"]["herl"]["training"]["rollout/truncated_frac"]["half"] == pytest.approx(0.0)
    # herl's rewrites: 1 − c → run means 0.25 and 0.25
    assert s["arms"]["herl"]["training"]["herl/rewrite_truncated_frac"]["mean"] == pytest.approx(0.25)
    assert s["arms"]["grpo"]["training"]["herl/rewrite_truncated_frac"]["mean"] is None
    text = render_markdown(s)
    assert "| arm | held-out cut % | held-out length | rollouts cut % | rewrites cut % |" in text
    # base = step 0 (no val/truncated_frac logged there in this fixture); grpo 25 %, herl 50 % held out
    assert "| grpo | 25.0 ± 0.0 | – | 31.2 ± " in text and "| – |\n" in text
    assert "| herl | 50.0 ± 0.0 | – | 75.0 ± 0.0 | 25.0 ± 0.0 |" in text
    assert "rewrite length" not in text  # no run logged herl/rewrite_len


def _broad_outcomes(folder: Path, rows: list[tuple[str, int, bool | None]]) -> None:
    """(prompt id, round of the kept answer, its prompt-level strict verdict) → evaluate/ifeval/outcomes.jsonl."""
    lines = [json.dumps({"id": p, "round": r, "prompt_strict": ok, "instructions": []}) + "\n" for p, r, ok in rows]
    (folder / "evaluate" / "ifeval" / "outcomes.jsonl").write_text("".join(lines))


def test_round_outcomes_from_kept_answers():
    """After round r a prompt is met iff its kept answer is from a round <= r and meets every instruction."""
    rows = [{"id": "a", "round": 0, "prompt_strict": True}, {"id": "b", "round": 1, "prompt_strict": True},
            {"id": "c", "round": 1, "prompt_strict": False}, {"id": "d", "round": 0, "prompt_strict": None},
            {"id": "e", "prompt_strict": True}]  # fmt: skip
    assert round_outcomes(rows, 0) == {"a": 1.0, "b": 0.0, "c": 0.0, "e": 1.0}  # no round recorded: round 0
    assert round_outcomes(rows, 1) == {"a": 1.0, "b": 1.0, "c": 0.0, "e": 1.0}


def test_broad_paired_differences_by_hand(tmp_path):
    """grpo (two seeds) − base (one greedy run, standing for both seeds), per round, on the scored prompts."""
    study = StudyConfig(arms=["base", "grpo"], seeds=[0, 1], results_dir="results/s")
    runs = plan(study)
    results = tmp_path / "results/s"
    write_base(results, [0.25, 0.5])
    for run in runs[1:]:
        write_run(results, run, STEP0[run["seed"]], FINAL[("grpo", run["seed"])], [1.0, 1.0], broad={"rounds": [0, 0]})
    # base: p0 met at round 0, p1 only after its revision, p2 never, p3 unscorable → r0 [1, 0, 0], r1 [1, 1, 0]
    _broad_outcomes(results / "base", [("p0", 0, True), ("p1", 1, True), ("p2", 0, False), ("p3", 0, None)])
    # seed 0: r0 [1, 1, 0], r1 [1, 1, 0] (p2's revision met more instructions, not all)
    _broad_outcomes(results / "grpo-s0", [("p0", 0, True), ("p1", 0, True), ("p2", 1, False), ("p3", 0, None)])
    # seed 1: r0 [0, 0, 1], r1 [1, 0, 1]
    _broad_outcomes(results / "grpo-s1", [("p0", 1, True), ("p1", 0, False), ("p2", 0, True), ("p3", 0, None)])
    for name in ("base", "grpo-s0", "grpo-s1"):  # what a real run also records: prompt counts and the answer cap
        metrics = results / name / "evaluate" / "ifeval" / "metrics.json"
        metrics.write_text(json.dumps(json.loads(metrics.read_text()) | {"n_prompts": 4, "n_prompts_scored": 3}))
        (results / name / "config.json").write_text(json.dumps({"evaluate": {"max_new_tokens": 128}}))
    s = build_report(study, runs, tmp_path, "t", "study.yaml")
    (pair,) = s["broad_paired"]
    assert (pair["a"], pair["b"]) == ("grpo", "base") and set(pair["cells"]) == {"ifeval/0", "ifeval/1"}
    # r0: s0 [0, +1, 0], s1 [−1, 0, +1] → 1/6; r1: s0 [0, 0, 0], s1 [0, −1, +1] → 0
    r0, r1 = pair["cells"]["ifeval/0"], pair["cells"]["ifeval/1"]
    assert r0["estimate"] == pytest.approx(1 / 6) and (r0["seeds"], r0["prompts"]) == (2, 3)
    assert r1["estimate"] == pytest.approx(0.0) and r1["lo"] < 0 < r1["hi"]
    text = render_markdown(s)
    assert "| comparison | ifeval round 0 | ifeval round 1 |" in text
    assert f"| grpo − base | +16.7 [{100 * r0['lo']:+.1f}, {100 * r0['hi']:+.1f}] | +0.0 [" in text
    assert "seeds × scored prompts: ifeval 2 × 3" in text
    assert "(at most 128 tokens per answer)" in text and "ifeval (4 prompts, 3 scored):" in text
    assert "| base | 1 | 50.0 (n = 1) | 50.0 (n = 1) | – | – | – | – |\n" in text  # write_base: round 1 at 0.5
    assert "short answers" not in text  # these outcomes carry no answer lengths


def test_short_answers_by_hand(tmp_path):
    """Share of kept answers under 8 tokens, and of the met prompts the share met by such an answer."""
    verdicts_and_lengths = [(True, 3), (True, 40), (False, 7), (None, 128)]
    rows = [{"prompt_strict": ok, "response_tokens": n} for ok, n in verdicts_and_lengths]
    assert short_answers(rows) == {"short": 0.5, "met_by_short": 0.5}
    assert short_answers([{"prompt_strict": False, "response_tokens": 9}]) == {"short": 0.0, "met_by_short": None}
    assert short_answers([{"prompt_strict": True}]) is None  # written before outcomes kept the lengths
    study = StudyConfig(arms=["base", "grpo"], seeds=[0, 1], results_dir="results/s")
    runs = plan(study)
    results = tmp_path / "results/s"
    write_base(results, [0.25, 0.5])
    lines = [json.dumps({"id": f"p{i}", "round": 0, **r}) + "\n" for i, r in enumerate(rows)]
    (results / "base" / "evaluate" / "ifeval" / "outcomes.jsonl").write_text("".join(lines))
    text = render_markdown(build_report(study, runs, tmp_path, "t", "study.yaml"))
    assert "| base | 50.0 (n = 1) | 50.0 (n = 1) |" in text
