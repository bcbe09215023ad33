"""herl_core.hindsight.prompt: the constraint-template hindsight prompt (spec §3.5). Run: .venv/bin/pytest <file>"""

from __future__ import annotations

from herl_core.hindsight.prompt import HINDSIGHT_TEMPLATE, build_hindsight_prompt
from herl_core.records import Verdict

INSTRUCTION = "Write a short poem about the sea. Use no commas."

VERDICTS = [
    Verdict(
        rubric_id="punctuation:no_comma",
        description="In your entire response, refrain from the use of any commas.",
        passed=False,
    ),
    Verdict(rubric_id="length_constraints:number_words", description="Answer with less than 40 words.", passed=True),
    Verdict(
        rubric_id="detectable_format:title",
        description="Your answer must contain a title, wrapped in double angular brackets, such as <<poem of joy>>.",
        passed=False,
    ),
    Verdict(
        rubric_id="change_case:english_lowercase",
        description="Your entire response should be in English, and in all lowercase letters.",
        passed=None,
    ),
    Verdict(rubric_id="keywords:existence", description="", passed=True),
]

DRAFT = "Waves rise, waves fall,\nthe gulls cry over it all."


def test_prompt_pinned():
    expected = (
        "You are a revise assistant. Keep every constraint the draft already satisfies and fix the unmet ones. "
        "Avoid adding new facts.\n"
        "\n"
        "[Instruction]\n"
        "Write a short poem about the sea. Use no commas.\n"
        "\n"
        "[Candidate]\n"
        "Satisfied: 2. Answer with less than 40 words., 5. Constraint #5\n"
        "Unmet: 1. In your entire response, refrain from the use of any commas., 3. Your answer must contain a "
        "title, wrapped in double angular brackets, such as <<poem of joy>>.\n"
        "Draft:\n"
        "Waves rise, waves fall,\n"
        "the gulls cry over it all.\n"
        "\n"
        "Return only the revised answer, fixing the unmet constraints while keeping the satisfied ones."
    )
    assert build_hindsight_prompt(INSTRUCTION, VERDICTS, DRAFT) == expected


def test_unscorable_verdict_is_listed_nowhere_but_keeps_numbering():
    prompt = build_hindsight_prompt(INSTRUCTION, VERDICTS, DRAFT)
    assert "lowercase" not in prompt and "4." not in prompt  # verdict 4 (passed=None) is absent
    assert "5. Constraint #5" in prompt  # later verdicts keep their 1-based position


def test_no_verdicts_reads_none_none():
    # §9-A12: a failed reward has no flags → both lists read "none"
    prompt = build_hindsight_prompt("Say hi.", [], "hello")
    assert "Satisfied: none\nUnmet: none\nDraft:\nhello\n" in prompt


def test_braces_and_role_words_pass_through_verbatim():
    # the instruction may be a decoded chat prompt (§9-A8) and may hold format braces
    instruction = "system\nYou are helpful.\nuser\nPrint {x} and {{y}} literally.\nassistant\n"
    prompt = build_hindsight_prompt(instruction, [], "{x}")
    assert "[Instruction]\n" + instruction + "\n\n[Candidate]" in prompt
    assert "Draft:\n{x}\n" in prompt


def test_template_fields():
    assert HINDSIGHT_TEMPLATE.count("{") == 4
    assert all(f"{{{f}}}" in HINDSIGHT_TEMPLATE for f in ("instruction", "satisfied", "unmet", "draft"))
