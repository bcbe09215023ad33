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

Truncation (``truncated_frac``): the share of answers that reached ``evaluate.max_new_tokens`` without an EOS token.
A cut answer is scored as it stands, as every harness does, so a cap that truncates often lowers the scores for a
reason that is not instruction following (e.g. "at least 300 words", a closing "P.S."). lm-eval's and lighteval's
IFEval tasks allow 1280 new tokens; herl's default is the same, and the rate is reported beside every score.

Prompts (``encode_eval_prompt``) are built the way lm-eval's HF backend builds them with ``--apply_chat_template``:
the chat template rendered to text with a generation prompt (a system message only when one is configured, else the
template's own default), then tokenised with ``add_special_tokens=False`` when the text already starts with the BOS
token and with the tokenizer's defaults otherwise. Greedy decoding stops at the EOS token(s); lm-eval's ``ifeval``
task has ``until: []``, i.e. it stops at EOS only. docs/evaluation.md §5 records the comparison with lm-eval.

Test-time experience-guided self-improvement (the abstract's claim; no code or protocol in the authors' repo, §7.3,
so this is herl's reading): round 0 is plain generation. In round r = 1..R every prompt whose best answer fails an
instruction (strict) gets a hindsight prompt (§3.5) built from the strict checker verdicts of that answer; the
policy writes a revision; the answer with more strict passes is kept (ties keep the earlier one). Feedback visible
at test time: the strict checker verdicts (``feedback`` in the result). Strict metrics never decrease over rounds
(per-prompt pass counts only grow); loose metrics may.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from herl_core.io import write_json_atomic, write_jsonl_atomic
from herl_core.records import PromptRecord, Verdict

FEEDBACK = "strict checker verdicts"


@dataclass(frozen=True)
class Answer:
    """One generated answer: its text, whether it was cut at the token cap without EOS, and its length in tokens.
    ``None`` = unknown (an answer given as a bare string)."""

    text: str
    truncated: bool | None = None
    n_tokens: int | None = None


def as_answer(answer: str | Answer) -> Answer:
    """A bare string is an ``Answer`` whose truncation and length are unknown."""
    return answer if isinstance(answer, Answer) else Answer(text=answer)


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


def sample_row(record: PromptRecord, response: str | Answer, instructions: list[dict[str, Any]]) -> dict[str, Any]:
    """One samples.jsonl row; prompt verdicts are ``None`` when any instruction is unscorable."""
    answer = as_answer(response)
    scored = all(i["strict"] is not None for i in instructions)
    return {
        "id": record.id,
        "source": record.source,
        "prompt": record.prompt,
        "response": answer.text,
        "truncated": answer.truncated,
        "response_tokens": answer.n_tokens,
        "instructions": instructions,
        "prompt_strict": all(i["strict"] for i in instructions) if scored else None,
        "prompt_loose": all(i["loose"] for i in instructions) if scored else None,
    }


def aggregate(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Official metrics over sample rows (module doc): prompt/inst × strict/loose, with counts, and the truncation
    rate ``truncated_frac`` = #{answers cut at the cap without EOS} / #{answers whose truncation is known}."""
    insts = [i for s in samples for i in s["instructions"]]
    scored = [i for i in insts if i["strict"] is not None]
    prompts = [s for s in samples if s["prompt_strict"] is not None]
    known = [s for s in samples if s.get("truncated") is not None]
    lengths = [s["response_tokens"] for s in samples if s.get("response_tokens") is not None]
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
        "truncated_frac": _ratio(sum(s["truncated"] for s in known), len(known)),
        "n_truncated": sum(s["truncated"] for s in known),
        "response_tokens_mean": _ratio(sum(lengths), len(lengths)),
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


def score_responses(records: Sequence[PromptRecord], responses: Sequence[str | Answer]) -> EvalResult:
    """Score ``responses[i]`` against ``records[i].rubrics`` with the official strict and loose checks."""
    if len(records) != len(responses):
        raise ValueError(f"{len(records)} records but {len(responses)} responses")
    from herl_core.nltk_setup import ensure_punkt

    ensure_punkt()
    answers = [as_answer(r) for r in responses]
    samples = [
        sample_row(rec, ans, _instruction_verdicts(rec, ans.text)) for rec, ans in zip(records, answers, strict=True)
    ]
    return EvalResult(metrics=aggregate(samples), per_type=per_type(samples), samples=samples)


# --------------------------------------------------------------------------------------------------------------------
# prompts and generation (the stage's policy)


def encode_eval_prompt(tokenizer: Any, text: str, system_prompt: str | None = None, chat: bool = True) -> list[int]:
    """Prompt ids as lm-eval's HF backend builds them under ``--apply_chat_template`` (module doc).

    chat=True: ``apply_chat_template(messages, tokenize=False, add_generation_prompt=True)`` with a system message
    only when ``system_prompt`` is given, then ``tokenizer(text, add_special_tokens=False)`` when the text starts with
    the BOS token, else ``tokenizer(text)`` (lm-eval's ``tok_batch_encode``). For a template that writes its own BOS
    (SmolLM2's starts with ``<|im_start|>``, its BOS) this equals ``herl_core.models.encode_prompt``, the training
    format. chat=False: the raw text without special tokens (the hindsight prompt), as ``encode_prompt``. A tokenizer
    in the plain prompt format (``model.prompt_format``: a model without a chat template) gets ``encode_prompt``'s
    plain prompt, the format it was trained in; lm-eval has no equivalent there.
    """
    from herl_core.models import PROMPT_FORMAT_ATTR, encode_prompt

    if not chat or getattr(tokenizer, PROMPT_FORMAT_ATTR, "chat") == "plain":
        return encode_prompt(tokenizer, text, system_prompt, chat=chat)
    messages = [{"role": "system", "content": system_prompt}] if system_prompt is not None else []
    messages.append({"role": "user", "content": text})
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    bos = getattr(tokenizer, "bos_token", None)
    special = {"add_special_tokens": False} if bos and rendered.startswith(bos) else {}
    return list(tokenizer(rendered, **special)["input_ids"])


def pass_limits(max_new_tokens: int, first_pass_tokens: int) -> list[int]:
    """Cumulative token limits of the generation passes: ``first_pass_tokens``, doubling, then ``max_new_tokens``
    (e.g. 256 → [256, 512, 1024, 1280]); one pass when ``first_pass_tokens`` is 0 or reaches the cap."""
    if first_pass_tokens <= 0 or first_pass_tokens >= max_new_tokens:
        return [max_new_tokens]
    limits, limit = [], first_pass_tokens
    while limit < max_new_tokens:
        limits.append(limit)
        limit *= 2
    return [*limits, max_new_tokens]


def generate_answers(
    engine: Any,
    tokenizer: Any,
    texts: Sequence[str],
    max_new_tokens: int,
    temperature: float = 0.0,
    seed: int | None = None,
    system_prompt: str | None = None,
    chat: bool = True,
    first_pass_tokens: int = 0,
    batch_size: int | None = None,
    on_batch: Callable[[str, int, int, int], None] | None = None,
    what: str = "answers",
) -> list[Answer]:
    """One answer per text from a rollout engine: ``truncated`` = cut at ``max_new_tokens`` without EOS.

    Greedy answers are generated in passes (``pass_limits``): after each pass only the answers without EOS go on,
    re-batched, from their prompt plus what they have so far, so a batch no longer decodes finished answers until
    its longest one ends (at a 1280-token cap on a CPU most of the work otherwise). Greedy decoding from a prefix is
    the same computation as decoding through it, up to float rounding of the prefill: tokens can differ only at a
    near-tie, as between any two batchings. Text = ``tokenizer.decode(all completion ids, skip_special_tokens=True)``
    (the HF engine's own decoding). Sampled answers (temperature > 0) take one pass: a second would reuse the random
    stream of the first.

    ``batch_size``: each pass is asked of the engine in batches of this many prompts, shortest first, each prompt
    keeping its random key of one call (its position in the pass), which is how the engine splits one call itself:
    the answers are those of one call. ``on_batch(what, batch, batches, prompts)`` is called after each batch
    (``what``: ``what`` in the first pass, ``"<what> to <limit> tokens"`` in later ones) for progress output.
    """
    from dataclasses import replace

    from herl_core.rollout.base import SamplingParams

    prompts = [encode_eval_prompt(tokenizer, t, system_prompt, chat=chat) for t in texts]
    limits = pass_limits(max_new_tokens, first_pass_tokens) if temperature == 0 else [max_new_tokens]
    completions: list[list[int]] = [[] for _ in prompts]
    finished = [False] * len(prompts)
    pending, done = list(range(len(prompts))), 0
    for limit in limits:
        if not pending:
            break
        sampling = SamplingParams(temperature=temperature, max_new_tokens=limit - done, seed=seed)
        inputs = [prompts[i] + completions[i] for i in pending]
        if batch_size and batch_size < len(inputs):  # the engine's own split of one call, asked batch by batch
            order = sorted(range(len(inputs)), key=lambda k: len(inputs[k]))  # as the engine orders a call (stable)
            chunks = [order[s : s + batch_size] for s in range(0, len(order), batch_size)]
        else:
            chunks = [list(range(len(inputs)))]
        label = what if done == 0 else f"{what} to {limit} tokens"
        for batch, chunk in enumerate(chunks, start=1):
            keyed = sampling if len(chunks) == 1 else replace(sampling, keys=tuple(chunk))
            gens = engine.generate([inputs[k] for k in chunk], 1, keyed)
            for k, g in zip(chunk, gens, strict=True):
                completions[pending[k]] += list(g.completion_ids)
                finished[pending[k]] = g.finished
            if on_batch is not None:
                on_batch(label, batch, len(chunks), len(inputs))
        pending, done = [i for i in pending if not finished[i]], limit
    return [
        Answer(text=tokenizer.decode(ids, skip_special_tokens=True), truncated=not fin, n_tokens=len(ids))
        for ids, fin in zip(completions, finished, strict=True)
    ]


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


Generate = Callable[[list[str]], Sequence[str | Answer]]


def _revise(
    records: Sequence[PromptRecord], best: list[dict[str, Any]], revise: Generate
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
    generate: Generate,
    rounds: int = 0,
    revise: Generate | None = None,
) -> EvalResult:
    """Generate, score, then ``rounds`` rounds of hindsight self-improvement (module doc).

    ``generate`` maps user instructions to answers (the stage plugs in ``generate_answers``: the policy, greedy,
    chat template); ``revise`` maps hindsight prompts to revisions (default: ``generate``). Answers are ``Answer``s
    or bare strings (truncation unknown). The result's samples are the kept
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
