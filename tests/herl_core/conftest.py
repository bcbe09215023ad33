"""Fixtures shared by the herl_core tests."""

from __future__ import annotations

import pytest

from herl_core.records import PromptRecord, Rubric


@pytest.fixture(scope="session")
def four_prompts() -> list[PromptRecord]:
    """Four short training prompts with one IFEval rubric each (two share punctuation:no_comma)."""
    return [
        PromptRecord(id=f"p{i}", prompt=p, rubrics=[Rubric(id=c)])
        for i, (p, c) in enumerate(
            [
                ("Write a note about cats.", "change_case:english_lowercase"),
                ("Describe the sea.", "punctuation:no_comma"),
                ("Tell me about trees.", "change_case:english_capital"),
                ("Explain rain.", "punctuation:no_comma"),
            ]
        )
    ]
