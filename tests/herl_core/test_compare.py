"""herl_core.compare: equal up to float rounding, and nothing more. Run: .venv/bin/pytest <this file>"""

from __future__ import annotations

from herl_core.compare import compare_generations
from herl_core.rollout.base import Generation


def gen(ids, lps, margins, finished=True, text=None):
    return Generation([1, 2], list(ids), list(lps), text if text is not None else str(ids), finished, list(margins))


def test_equal_rows_compare_fully():
    a = [gen([5, 6, 7], [-0.1, -0.2, -0.3], [0.5, 0.5, 0.5])]
    b = [gen([5, 6, 7], [-0.1, -0.2 + 5e-5, -0.3], [0.5, 0.5, 0.5])]
    r = compare_generations(a, b, margin=1e-3, logprob_atol=1e-4)
    assert r.ok and r.full_rows == 1 and r.compared_tokens == 3 and abs(r.max_logprob_diff - 5e-5) < 1e-9


def test_a_flip_at_a_near_tie_cuts_the_row_and_a_clear_flip_is_a_violation():
    a = [gen([5, 6, 7], [-0.1] * 3, [0.5, 1e-6, 0.5]), gen([5, 6, 7], [-0.1] * 3, [0.5, 0.2, 0.5])]
    b = [gen([5, 9, 8], [-0.1] * 3, [0.5, 2e-6, 0.5]), gen([5, 9, 7], [-0.1] * 3, [0.5, 0.2, 0.5])]
    r = compare_generations(a, b, margin=1e-3, logprob_atol=1e-4)
    assert r.cut_rows == [0] and r.full_rows == 1 and r.compared_tokens == 2  # row 0 token 0, row 1 token 0
    assert r.violations == ["row 1, token 1: 6 != 9 with margins 0.2 / 0.2 (> 0.001: rounding cannot explain it)"]


def test_logprob_tolerance_length_and_prompt_are_checked():
    base = gen([5, 6], [-0.1, -0.2], [0.5, 0.5])
    r = compare_generations([base], [gen([5, 6], [-0.1, -0.3], [0.5, 0.5])], margin=1e-3, logprob_atol=1e-4)
    assert len(r.violations) == 1 and "log-probs differ by 0.1" in r.violations[0]
    r = compare_generations([base], [gen([5, 6, 2], [-0.1, -0.2, -0.3], [0.5] * 3)], margin=1e-3, logprob_atol=1e-4)
    assert r.violations == ["row 0: lengths 2 / 3, finished True / True"]
    other_prompt = Generation([9], [5, 6], [-0.1, -0.2], "x", True, [0.5, 0.5])
    assert compare_generations([base], [other_prompt], margin=1e-3, logprob_atol=1e-4).violations == [
        "row 0: different prompts"
    ]
    assert not compare_generations([base], [], margin=1e-3, logprob_atol=1e-4).ok


def test_generations_without_margins_must_match_exactly():
    a = [Generation([1], [5, 6], [-0.1, -0.2], "x", True)]
    b = [Generation([1], [5, 7], [-0.1, -0.2], "y", True)]
    assert not compare_generations(a, b, margin=1.0, logprob_atol=1e-4).ok
