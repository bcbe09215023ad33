"""The ``evaluate`` stage: official IFEval / IFBench metrics and test-time self-improvement (spec §3.14, §6, §7.3).

Metrics (Zhou et al. 2023, IFEval; the same definitions for IFBench, with the IFBench checkers):

    prompt_strict = #{prompts whose instructions all pass (strict)} / #{scored prompts}
    inst_strict   = #{instructions that pass (strict)} / #{scored instructions}
    prompt_loose, inst_loose: the same with the loose check (8 response variants, lm_eval's
                                ``test_instruction_following_loose``)

Unscorable instructions (the checker returns ``None`` offline: IFBench ``ratio:stop_words``, ``words:start_verb``)
are counted as ``n_unscorable`` and left out of the instruction-level denominators, never counted as failures. A
prompt with any unscorable instruction is left out of the prompt-level metrics (its verdict "all followed" is
unknown) and counted in ``n_prompts_unscorable``. With no unscorable instruction the numbers equal lm_eval's.

Test-time experience-guided self-improvement (the abstract's claim; no code or protocol in the authors' repo, §7.3,
so this is herl's reading): round 0 is plain generation. In round r = 1..R every prompt whose best answer fails an
instruction (strict) gets a hindsight prompt (§3.5) built from the strict checker verdicts of that answer; the
policy writes a revision; the answer with more strict passes is kept (ties keep the earlier one). Feedback visible
at test time: the strict checker verdicts (``feedback`` in the result). Strict metrics never decrease over rounds
(per-prompt pass counts only grow); loose metrics may.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from herl_core.io import write_json_atomic, write_jsonl_atomic
from herl_core.records import PromptRecord, Verdict

FEEDBACK = "strict checker verdicts"


class EvalResult(BaseModel):
    """Metrics, per-instruction-type accuracies, per-sample verdicts and (self-improvement) per-round metrics."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    metrics: dict[str, Any]
    per_type: dict[str, dict[str, Any]]
    samples: list[dict[str, Any]]
    rounds: list[dict[str, Any]] = Field(default_factory=list)
    feedback: str | None = None


def _ratio(num: int, den: int) -> float | None:
    return num / den if den else None


def _instruction_verdicts(record: PromptRecord, response: str) -> list[dict[str, Any]]:
    """[{id, strict, loose}] per rubric; ``None`` = unscorable offline (either mode)."""
    from herl_core.rewards.constraints import check

    rows = []
    for rubric in record.rubrics:
        strict = check(rubric, response, prompt=record.prompt, loose=False)
        loose = check(rubric, response, prompt=record.prompt, loose=True)
        if strict is None or loose is None:
            strict = loose = None
        rows.append({"id": rubric.id, "strict": strict, "loose": loose})
    return rows


def sample_row(record: PromptRecord, response: str, instructions: list[dict[str, Any]]) -> dict[str, Any]:
    """One samples.jsonl row; prompt verdicts are ``None`` when any instruction is unscorable."""
    scored = all(i["strict"] is not None for i in instructions)
    return {
        "id": record.id,
        "source": record.source,
        "prompt": record.prompt,
        "response": response,
        "instructions": instructions,
        "prompt_strict": all(i["strict"] for i in instructions) if scored else None,
        "prompt_loose": all(i["loose"] for i in instructions) if scored else None,
    }


def aggregate(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Official metrics over sample rows (module doc): prompt/inst × strict/loose, with counts."""
    insts = [i for s in samples for i in s["instructions"]]
    scored = [i for i in insts if i["strict"] is not None]
    prompts = [s for s in samples if s["prompt_strict"] is not None]
    return {
        "prompt_strict": _ratio(sum(s["prompt_strict"] for s in prompts), len(prompts)),
        "inst_strict": _ratio(sum(i["strict"] for i in scored), len(scored)),
        "prompt_loose": _ratio(sum(s["prompt_loose"] for s in prompts), len(prompts)),
        "inst_loose": _ratio(sum(i["loose"] for i in scored), len(scored)),
        "n_prompts": len(samples),
        "n_prompts_scored": len(prompts),
        "n_prompts_unscorable": len(samples) - len(prompts),
        "n_instructions": len(insts),
        "n_instructions_scored": len(scored),
        "n_unscorable": len(insts) - len(scored),
    }


def instruction_type(rubric_id: str) -> str:
    """The bare instruction id: ``"ifeval/<id>"`` / ``"ifbench/<id>"`` (a repeated id, see prepare) → ``<id>``."""
    source, sep, bare = rubric_id.partition("/")
    return bare if sep and source in ("ifeval", "ifbench") else rubric_id


def per_type(samples: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Accuracy per instruction id: {id: {n, strict, loose, n_unscorable}} (n = scored instructions)."""
    out: dict[str, dict[str, Any]] = {}
    for inst in (i for s in samples for i in s["instructions"]):
        row = out.setdefault(instruction_type(inst["id"]), {"n": 0, "n_strict": 0, "n_loose": 0, "n_unscorable": 0})
        if inst["strict"] is None:
            row["n_unscorable"] += 1
            continue
        row["n"] += 1
        row["n_strict"] += inst["strict"]
        row["n_loose"] += inst["loose"]
    for row in out.values():
        row["strict"], row["loose"] = _ratio(row["n_strict"], row["n"]), _ratio(row["n_loose"], row["n"])
    return dict(sorted(out.items()))


def score_responses(records: Sequence[PromptRecord], responses: Sequence[str]) -> EvalResult:
    """Score ``responses[i]`` against ``records[i].rubrics`` with the official strict and loose checks."""
    if len(records) != len(responses):
        raise ValueError(f"{len(records)} records but {len(responses)} responses")
    from herl_core.nltk_setup import ensure_punkt

    ensure_punkt()
    samples = [
        sample_row(rec, resp, _instruction_verdicts(rec, resp)) for rec, resp in zip(records, responses, strict=True)
    ]
    return EvalResult(metrics=aggregate(samples), per_type=per_type(samples), samples=samples)


# --------------------------------------------------------------------------------------------------------------------
# test-time self-improvement


def _strict_passes(sample: dict[str, Any]) -> int:
    return sum(1 for i in sample["instructions"] if i["strict"])


def _fails(sample: dict[str, Any]) -> bool:
    return any(i["strict"] is False for i in sample["instructions"])


def _verdicts(record: PromptRecord, sample: dict[str, Any]) -> list[Verdict]:
    """The strict verdicts of a sample as ``Verdict``s with the checkers' descriptions (hindsight input, §3.5)."""
    from herl_core.rewards.constraints import describe

    return [
        Verdict(
            rubric_id=r.id,
            description=r.description or describe(r, prompt=record.prompt),
            passed=inst["strict"],
            weight=r.weight,
        )
        for r, inst in zip(record.rubrics, sample["instructions"], strict=True)
    ]


def _revise(
    records: Sequence[PromptRecord], best: list[dict[str, Any]], revise: Callable[[list[str]], list[str]]
) -> tuple[list[int], list[dict[str, Any]]]:
    """Indices of failing prompts and the scored revisions of their current best answers."""
    from herl_core.hindsight.prompt import build_hindsight_prompt

    todo = [i for i, s in enumerate(best) if _fails(s)]
    prompts = [
        build_hindsight_prompt(records[i].prompt, _verdicts(records[i], best[i]), best[i]["response"]) for i in todo
    ]
    revisions = revise(prompts) if prompts else []
    if len(revisions) != len(todo):
        raise ValueError(f"revise returned {len(revisions)} answers for {len(todo)} hindsight prompts")
    scored = score_responses([records[i] for i in todo], revisions).samples
    return todo, scored


def evaluate_policy(
    records: Sequence[PromptRecord],
    generate: Callable[[list[str]], list[str]],
    rounds: int = 0,
    revise: Callable[[list[str]], list[str]] | None = None,
) -> EvalResult:
    """Generate, score, then ``rounds`` rounds of hindsight self-improvement (module doc).

    ``generate`` maps user instructions to answers (the stage plugs in the policy, greedy, chat template);
    ``revise`` maps hindsight prompts to revisions (default: ``generate``). The result's samples are the kept
    answers (``round`` = the round that produced each); ``rounds[r]`` holds the metrics after round r.
    """
    if rounds < 0:
        raise ValueError(f"rounds must be >= 0, got {rounds}")
    responses = generate([r.prompt for r in records])
    if len(responses) != len(records):
        raise ValueError(f"generate returned {len(responses)} answers for {len(records)} prompts")
    best = [{**s, "round": 0} for s in score_responses(records, responses).samples]
    history = [aggregate(best)]
    for r in range(1, rounds + 1):
        todo, revised = _revise(records, best, revise or generate)
        improved = [i for i, s in zip(todo, revised, strict=True) if _strict_passes(s) > _strict_passes(best[i])]
        for i, sample in zip(todo, revised, strict=True):
            if i in improved:
                best[i] = {**sample, "round": r}
        history.append({**aggregate(best), "n_revised": len(todo), "n_improved": len(improved)})
    return EvalResult(
        metrics=history[-1],
        per_type=per_type(best),
        samples=best,
        rounds=history,
        feedback=FEEDBACK if rounds else None,
    )


def write_eval(result: EvalResult, out_dir: str | Path) -> None:
    """Write ``metrics.json`` (with per-round metrics and the feedback choice), ``per_type.json``, ``samples.jsonl``."""
    out = Path(out_dir)
    metrics = {**result.metrics, "rounds": result.rounds, "feedback": result.feedback}
    write_json_atomic(out / "metrics.json", metrics)
    write_json_atomic(out / "per_type.json", result.per_type)
    write_jsonl_atomic(out / "samples.jsonl", result.samples)
