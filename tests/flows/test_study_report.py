"""flows/study_report.py: per-run values, aggregation over seeds (hand-computed CIs), the Markdown report, plots."""

from __future__ import annotations

import pytest

from flows.study_plan import StudyError
from flows.study_report import (
    aggregate,
    curve,
    eval_values,
    fmt_ci,
    plot_curves,
    plot_eval,
    render_markdown,
    round_values,
    train_values,
)


def test_fmt_ci():
    assert fmt_ci({"mean": 0.4, "half": 0.49683}) == "40.0 ± 49.7"
    assert fmt_ci({"mean": 0.4123, "half": None}) == "41.2 (CI n/a)"
    assert fmt_ci(None) == "–"
    assert fmt_ci({"mean": 1234.4, "half": 10.26}, 1.0, 0) == "1234 ± 10"


# ---------------------------------------------------------------------------------------------------- aggregation


def _history(rewards, zero_std, tokens, success=None):
    rows = []
    for step, (r, z, t) in enumerate(zip(rewards, zero_std, tokens, strict=True)):
        row = {"step": step, "reward/mean": r, "reward/frac_zero_std": z, "perf/gen_tokens": t, "perf/step_s": 2.0}
        if success is not None:
            row |= {"herl/rewrite_success_rate": success[step], "herl/bonus_mean": 0.01}
        rows.append(row)
    return rows


def _eval(ps, inst):
    return {"policy": "x", "ifeval/prompt_strict": ps, "ifeval/inst_strict": inst, "ifeval/n_prompts": 4}


RESULTS = [
    {"arm": "base", "seed": None, "eval": _eval(0.25, 0.5), "rounds": {}, "history": []},
    {"arm": "grpo", "seed": 0, "eval": _eval(0.30, 0.5), "history": _history([0.1, 0.3], [0.5, 0.25], [100, 100])},
    {"arm": "grpo", "seed": 1, "eval": _eval(0.40, 0.6), "history": _history([0.2, 0.4], [0.5, 0.75], [100, 100])},
    {
        "arm": "herl",
        "seed": 0,
        "eval": _eval(0.50, 0.7),
        "history": _history([0.2, 0.6], [0.25, 0.25], [150, 250], success=[0.5, 1.0]),
    },
]


def test_eval_and_train_values_per_run():
    assert eval_values(_eval(0.3, 0.5)) == {"ifeval/prompt_strict": 0.3, "ifeval/inst_strict": 0.5}
    with pytest.raises(StudyError, match="no '<benchmark>/<metric>'"):
        eval_values({"policy": "x"})
    got = train_values(RESULTS[3]["history"])
    # final reward 0.6, mean (0.2+0.6)/2 = 0.4, zero_std mean 0.25, success mean 0.75, tokens 150+250 = 400
    assert got["reward_final"] == 0.6
    assert got["reward_mean"] == pytest.approx(0.4)
    assert got["frac_zero_std_mean"] == pytest.approx(0.25)
    assert got["rewrite_success_rate_mean"] == pytest.approx(0.75)
    assert got["gen_tokens"] == 400
    assert train_values(RESULTS[1]["history"])["rewrite_success_rate_mean"] is None  # GRPO logs no herl/*


def test_aggregate_over_seeds_by_hand():
    summary = aggregate(RESULTS)
    grpo = summary["eval"]["grpo"]["ifeval/prompt_strict"]
    # [0.30, 0.40]: mean 0.35, s = 0.0707107, h = 12.7062 · 0.0707107 / √2 = 0.635310
    assert grpo["mean"] == pytest.approx(0.35)
    assert grpo["half"] == pytest.approx(0.635310, abs=1e-5)
    assert summary["eval"]["base"]["ifeval/prompt_strict"]["half"] is None  # n = 1
    assert summary["seeds"] == {"base": [None], "grpo": [0, 1], "herl": [0]}
    assert "base" not in summary["train"]
    # grpo final rewards [0.3, 0.4] → 0.35; frac_zero_std means [0.375, 0.625] → 0.5
    assert summary["train"]["grpo"]["reward_final"]["mean"] == pytest.approx(0.35)
    assert summary["train"]["grpo"]["frac_zero_std_mean"]["mean"] == pytest.approx(0.5)
    # herl 400 tokens vs grpo 200 per run → 2.0× the generation
    assert summary["gen_tokens_vs_grpo"] == {"grpo": pytest.approx(1.0), "herl": pytest.approx(2.0)}


def test_curve_mean_and_band_per_step():
    c = curve([RESULTS[1]["history"], RESULTS[2]["history"]], "reward/mean")
    # step 0: [0.1, 0.2] → 0.15 ± 12.7062 · 0.0707107 / √2 = 0.635310; step 1: [0.3, 0.4] → 0.35
    assert c["step"] == [0, 1]
    assert c["mean"] == [pytest.approx(0.15), pytest.approx(0.35)]
    assert c["high"][0] - c["mean"][0] == pytest.approx(0.635310, abs=1e-5)
    single = curve([RESULTS[3]["history"]], "herl/rewrite_success_rate")
    assert single["low"] == single["mean"] == single["high"] == [0.5, 1.0]


def test_round_values_per_round_and_benchmark():
    rounds = {"ifeval": [{"prompt_strict": 0.2}, {"prompt_strict": 0.3}], "ifbench": [{"prompt_strict": 0.1}]}
    got = round_values(rounds)
    assert len(got) == 2
    assert got[1]["ifeval/prompt_strict"] == 0.3
    assert got[1]["ifbench/prompt_strict"] is None  # ifbench ran one round only
    assert round_values({}) == []


# ---------------------------------------------------------------------------------------------------- report


def _meta():
    return {
        "study_profile": "tiny",
        "date": "2025-01-01T00:00:00+00:00",
        "command": "herl study --profile tiny",
        "params": "params.yaml",
        "params_profile": "tiny",
        "seeds": [0, 1],
        "budget": {"rollout.n": 4},
        "plots": {"eval_bars": "study/eval_bars.png"},
        "runs": [{"name": "grpo-s0", "commands": ["herl train --set train.seed=0"], "reused": True}],
    }


def test_render_markdown_rows():
    with_rounds = [dict(r) for r in RESULTS]
    with_rounds[0]["rounds"] = {"ifeval": [{"prompt_strict": 0.25}, {"prompt_strict": 0.5}]}
    text = render_markdown({"meta": _meta(), **aggregate(with_rounds)})
    assert "| arm | n | ifeval/prompt_strict | ifeval/inst_strict |" in text
    assert "| base | 1 | 25.0 (CI n/a) | 50.0 (CI n/a) |" in text
    # grpo prompt_strict 35.0 ± 63.5; inst_strict [0.5, 0.6] → 55.0 ± 63.5
    assert "| grpo | 2 | 35.0 ± 63.5 | 55.0 ± 63.5 |" in text
    assert "| base | 1 | 50.0 (CI n/a) |" in text  # round 1 of the self-improvement table
    assert "| herl | 0.600 (CI n/a) | 0.400 (CI n/a) | 0.250 (CI n/a) | 0.750 (CI n/a) |" in text
    assert "| 2.00 |" in text  # herl's generation vs grpo
    assert "`herl study --profile tiny`" in text and "2025-01-01" in text
    assert "![eval_bars](study/eval_bars.png)" in text
    assert "- `grpo-s0` (reused)" in text


def test_headline_is_round_zero_not_the_revised_answers():
    """metrics.json holds the final round's numbers; the headline table must show the policy alone (round 0)."""
    run = dict(RESULTS[0])
    run["eval"] = _eval(0.5, 0.75)  # after 1 revision round (what metrics.json holds)
    run["rounds"] = {
        "ifeval": [{"prompt_strict": 0.25, "inst_strict": 0.5}, {"prompt_strict": 0.5, "inst_strict": 0.75}]
    }
    table = aggregate([run])["eval"]["base"]
    assert table["ifeval/prompt_strict"]["mean"] == 0.25 and table["ifeval/inst_strict"]["mean"] == 0.5
    assert aggregate([run])["rounds"]["base"][1]["ifeval/prompt_strict"]["mean"] == 0.5  # round 1 kept beside it


def test_render_markdown_without_rounds_says_so():
    text = render_markdown({"meta": _meta(), **aggregate(RESULTS)})
    assert "Not run (evaluate.self_improve_rounds = 0)." in text


def test_plots_are_png(tmp_path):
    summary = aggregate(RESULTS)
    for made in (plot_curves(summary, tmp_path / "c.png"), plot_eval(summary, tmp_path / "e.png")):
        assert made is not None and made.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert plot_curves(aggregate(RESULTS[:1]), tmp_path / "none.png") is None  # base only: no curves
