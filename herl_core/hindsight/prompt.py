"""The hindsight ("rewrite") prompt h(x, y) built from the instruction, the draft and its verdicts (spec §3.5, §9-A8).

The reference's "constraint" template is used in both released runs (§9-A1), and here for both reward types. Its
parts, in order: a role sentence (a revise assistant that keeps the satisfied constraints, fixes the unmet ones and
avoids adding new facts); ``[Instruction]`` and the instruction text; ``[Candidate]`` with ``Satisfied:``,
``Unmet:`` and ``Draft:``; a closing line asking for only the revised answer. Constraints are listed as
``k. <description>`` joined by ", " (k = 1-based position in the sample's rubric list), or ``none``.

The result is plain text with no chat template and no system message; the caller decides whether to wrap it
(``hindsight.hindsight_chat_template``; the reference feeds it raw, §3.5). The caller also decides what ``instruction``
is: the reference passes the decoded chat-templated prompt, role words included (§9-A8).

Departures from the authors' code:

1. The role and closing sentences are worded after the spec's description (§3.5), not copied; section labels,
   order and list format are the reference's.
2. Rubric weights are not shown (as in the reference's constraint template, §3.5).
3. A verdict with ``passed=None`` (unscorable rubric) is listed in neither list; it keeps its number k, so the other
   rubrics keep their positions. The reference has no such state (a failure there empties both lists, §9-A12).
4. An empty description is shown as ``Constraint #k``, the reference's fallback name.
"""

from __future__ import annotations

from collections.abc import Sequence

from herl_core.records import Verdict

HINDSIGHT_TEMPLATE = (
    "You are a revise assistant. Keep every constraint the draft already satisfies and fix the unmet ones. "
    "Avoid adding new facts.\n"
    "\n"
    "[Instruction]\n"
    "{instruction}\n"
    "\n"
    "[Candidate]\n"
    "Satisfied: {satisfied}\n"
    "Unmet: {unmet}\n"
    "Draft:\n"
    "{draft}\n"
    "\n"
    "Return only the revised answer, fixing the unmet constraints while keeping the satisfied ones."
)
"""The constraint template (spec §3.5). Fields: instruction, satisfied, unmet, draft."""


def constraint_list(verdicts: Sequence[Verdict], passed: bool) -> str:
    """``"k. desc, k. desc"`` for the verdicts with ``passed`` (k 1-based over all verdicts), or ``"none"``."""
    items = [
        f"{k}. {v.description if v.description.strip() else f'Constraint #{k}'}"
        for k, v in enumerate(verdicts, start=1)
        if v.passed is passed
    ]
    return ", ".join(items) if items else "none"


def build_hindsight_prompt(instruction: str, verdicts: Sequence[Verdict], draft: str) -> str:
    """h(x, y) = HINDSIGHT_TEMPLATE filled with the instruction, the satisfied/unmet lists and the draft (§3.5)."""
    return HINDSIGHT_TEMPLATE.format(
        instruction=instruction,
        satisfied=constraint_list(verdicts, passed=True),
        unmet=constraint_list(verdicts, passed=False),
        draft=draft,
    )
