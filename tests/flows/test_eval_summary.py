"""The console output of ``herl evaluate``: the summary line carries each benchmark's truncation rate beside its
scores, and a warning follows when the token cap cut more than 5 % of a benchmark's answers.

Run: .venv/bin/pytest tests/flows/test_eval_summary.py -q
"""

from __future__ import annotations

from flows.cli import truncation_warnings
from flows.console import stage_summary
from herl_core.stages import headline

METRICS = {
    "policy": "models/policy",
    "policy_fallback": False,
    "max_new_tokens": 128,
    "ifeval/prompt_strict": 0.25,
    "ifeval/inst_strict": 0.5,
    "ifeval/prompt_loose": 0.375,
    "ifeval/inst_loose": 0.625,
    "ifeval/truncated_frac": 0.75,
    "ifeval/n_truncated": 3,
    "ifeval/n_prompts": 4,
    "ifbench/prompt_strict": 0.0,
    "ifbench/inst_strict": None,
    "ifbench/prompt_loose": 0.0,
    "ifbench/inst_loose": None,
    "ifbench/truncated_frac": 0.0,
    "ifbench/n_truncated": 0,
    "ifbench/n_prompts": 2,
}


def test_the_summary_line_shows_each_benchmark_s_truncation_beside_its_scores():
    h = headline("evaluate", METRICS)
    assert h["ifeval/truncated_frac"] == 0.75 and h["ifbench/truncated_frac"] == 0.0
    assert "max_new_tokens" not in h and "ifeval/n_truncated" not in h  # details stay in <benchmark>/metrics.json
    assert stage_summary("evaluate", h) == (
        "IFEval prompt-strict 0.250 inst-strict 0.500 (truncated 0.750); "
        "IFBench prompt-strict 0.000 inst-strict n/a (truncated 0.000)"
    )
    fallback = stage_summary("evaluate", headline("evaluate", {**METRICS, "policy_fallback": True}))
    assert fallback.endswith("; UNTRAINED model (no trained policy found)")


def test_a_warning_names_the_cut_share_the_cap_and_lm_eval_s_budget():
    lines = truncation_warnings(METRICS, ["ifeval", "ifbench"])
    assert len(lines) == 1  # ifbench: nothing cut, no warning
    assert "75.0% of ifeval answers (3 of 4) hit evaluate.max_new_tokens=128 without EOS" in lines[0]
    assert "1280" in lines[0]


def test_no_warning_at_or_below_five_percent_and_unknown_benchmarks_skipped():
    quiet = {**METRICS, "ifeval/truncated_frac": 0.05, "ifeval/n_truncated": 1}
    assert truncation_warnings(quiet, ["ifeval", "ifbench", "other"]) == []
