"""Shared reward arithmetic (spec §4.1-4.2): weighted score, repetition detector, RewardResult assembly."""

from __future__ import annotations

import pytest

from herl_core.records import Verdict
from herl_core.rewards.base import is_repetitive, result_from_verdicts, weighted_score

# A 160-character unit with no internal period, so its occurrences in U*k are exactly k (no overlaps).
UNIT = "".join(f"{i:03d}" for i in range(60))[:160]


def v(passed: bool | None, weight: float = 1.0, rid: str = "r") -> Verdict:
    return Verdict(rubric_id=rid, description="d", passed=passed, weight=weight)


def test_unit_has_the_length_the_tests_assume():
    assert len(UNIT) == 160 and UNIT.count(UNIT[:20]) == 1


@pytest.mark.parametrize(
    ("verdicts", "expected"),
    [
        ([v(True), v(False), v(True), v(True)], 0.75),  # 3 of 4 met, all weight 1 → 3/4
        ([v(True, 1), v(False, 1), v(True, 2)], 0.75),  # (1 + 2) / (1 + 1 + 2) = 3/4
        ([v(True, 3), v(False, 1)], 0.75),  # 3 / (3 + 1)
        ([v(True, -1), v(False, 1), v(True, 1)], 0.5),  # negative → 0: (0 + 1) / (0 + 1 + 1)
        ([v(False, -5), v(True, 2)], 1.0),  # a violated negative-weight rubric costs nothing: 2 / 2
        ([v(None, 5), v(True, 1), v(False, 1)], 0.5),  # unscorable left out of both sums: 1 / 2
        ([v(True, -1), v(True, 0)], 0.0),  # total positive weight 0 → 0.0 (reference L252-258)
        ([v(False), v(False)], 0.0),
    ],
)
def test_weighted_score_hand_computed(verdicts, expected):
    assert weighted_score(verdicts) == pytest.approx(expected)


@pytest.mark.parametrize("verdicts", [[], [v(None)], [v(None, 2), v(None, 3)]])
def test_weighted_score_is_none_when_nothing_is_scorable(verdicts):
    assert weighted_score(verdicts) is None


@pytest.mark.parametrize(
    ("response", "expected"),
    [
        (UNIT * 3, True),  # split gives 4 parts > 3
        (UNIT * 2, False),  # 3 parts, not > 3
        (UNIT, False),  # exactly 160 characters: occurs once
        ("intro " + UNIT + "x" + UNIT + "y" + UNIT, True),  # non-adjacent repeats count too
        (UNIT * 3 + "z", False),  # the tail (UNIT[1:] + "z") occurs once
        ("a" * 480, True),  # 480 / 160 = 3 copies of the tail
        ("a" * 479, False),  # only 2 whole copies fit: "a"*479 splits into 3 parts
        ("short " * 10, False),  # shorter than 160 characters
        (" " * 1000, False),  # a blank tail never fires
        ("", False),
    ],
)
def test_is_repetitive_edge_cases(response, expected):
    assert is_repetitive(response) is expected


def test_is_repetitive_thresholds_are_parameters():
    assert is_repetitive(UNIT * 2, min_repeats=2)  # 3 parts > 2
    assert is_repetitive("ab" * 6, tail_chars=4)  # tail "abab" splits "ab"*6 into 4 parts
    assert not is_repetitive("ab" * 5, tail_chars=4)  # "ab"*5 = "abab"+"abab"+"ab" → 3 parts


def test_result_from_verdicts_repetition_zeroes_dense_only():
    verdicts = [v(True, rid="a"), v(False, rid="b")]
    out = result_from_verdicts(verdicts, UNIT * 3)
    assert (out.score, out.dense, out.repetition, out.failed) == (0.5, 0.0, True, False)
    assert out.n_satisfied == 1
    off = result_from_verdicts(verdicts, UNIT * 3, repetition_check=False)
    assert (off.score, off.dense, off.repetition) == (0.5, 0.5, False)
    plain = result_from_verdicts(verdicts, "a normal answer")
    assert (plain.score, plain.dense, plain.repetition) == (0.5, 0.5, False)


def test_result_from_verdicts_fails_when_nothing_is_scorable():
    out = result_from_verdicts([v(None, rid="a")], "answer")
    assert out.failed and out.score is None and out.dense is None and out.error == "no scorable rubric"
    assert out.verdicts[0].passed is None
