"""The console summary of ``herl evaluate``: the four metrics with the truncation rate beside them, and a warning when
the token cap cut more than 5 % of the answers.

Run: .venv/bin/pytest tests/flows/test_eval_summary.py -q
"""

from __future__ import annotations

from flows.cli import eval_summary

METRICS = {
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


def test_each_score_line_carries_the_truncation_rate():
    lines = eval_summary(METRICS, ["ifeval", "ifbench"])
    assert lines[0] == (
        "ifeval   prompt_strict 25.0  inst_strict 50.0  prompt_loose 37.5  inst_loose 62.5  "
        "truncated 75.0% (3/4 at 128 tokens)"
    )
    assert "75.0% of ifeval answers hit evaluate.max_new_tokens=128 without EOS" in lines[1]
    # ifbench: nothing cut (no warning), unscorable instruction metrics shown as n/a
    assert lines[2] == (
        "ifbench  prompt_strict 0.0  inst_strict n/a  prompt_loose 0.0  inst_loose n/a  "
        "truncated 0.0% (0/2 at 128 tokens)"
    )
    assert len(lines) == 3


def test_no_warning_at_or_below_five_percent_and_unknown_benchmarks_skipped():
    quiet = {**METRICS, "ifeval/truncated_frac": 0.05, "ifeval/n_truncated": 1}
    assert len(eval_summary(quiet, ["ifeval", "other"])) == 1
