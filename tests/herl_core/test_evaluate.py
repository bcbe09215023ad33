"""Official IFEval metrics, unscorable handling, equality with lm_eval, test-time self-improvement.

Run: .venv/bin/pytest tests/herl_core/test_evaluate.py -q
"""

from __future__ import annotations

import json
import re

import pytest

from herl_core import evaluate as ev
from herl_core.prepare import ALPACA_FILE, IFEVAL_FILE, _benchmark_record, _eval_framework_file
from herl_core.records import PromptRecord, Rubric

T, F, N = True, False, None


def _record(rid: str, ids: list[str], kwargs: list[dict] | None = None, prompt: str = "Say something.") -> PromptRecord:
    kwargs = kwargs or [{} for _ in ids]
    return PromptRecord(
        id=rid, prompt=prompt, rubrics=[Rubric(id=i, kwargs=k) for i, k in zip(ids, kwargs, strict=True)]
    )


def _samples(strict: list[list[bool | None]], loose: list[list[bool | None]]) -> list[dict]:
    """Sample rows with given verdicts; rubric ids are t0, t1, ... by position."""
    rows = []
    for n, (s_row, l_row) in enumerate(zip(strict, loose, strict=True)):
        rec = _record(f"p{n}", [f"t{k}" for k in range(len(s_row))])
        insts = [{"id": f"t{k}", "strict": s, "loose": lo} for k, (s, lo) in enumerate(zip(s_row, l_row, strict=True))]
        rows.append(ev.sample_row(rec, "answer", insts))
    return rows


# --------------------------------------------------------------------------------------------------------------------
# metric arithmetic


def test_metrics_hand_counted():
    # strict [[T,T],[T,F],[F]]: prompts all-pass = 1 of 3; instructions pass = 3 of 5
    # loose  [[T,T],[T,T],[F]]: prompts all-pass = 2 of 3; instructions pass = 4 of 5
    m = ev.aggregate(_samples([[T, T], [T, F], [F]], [[T, T], [T, T], [F]]))
    assert m["prompt_strict"] == pytest.approx(1 / 3)
    assert m["inst_strict"] == pytest.approx(3 / 5)
    assert m["prompt_loose"] == pytest.approx(2 / 3)
    assert m["inst_loose"] == pytest.approx(4 / 5)
    assert (m["n_prompts"], m["n_prompts_scored"], m["n_instructions"], m["n_unscorable"]) == (3, 3, 5, 0)


def test_unscorable_is_excluded_not_failed():
    # strict [[T,N],[T,F],[T]]: the N is left out → instructions 3 pass of 4 scored;
    # prompt 0 has an unscorable instruction → prompt level over prompts 1, 2: 1 of 2 all-pass.
    m = ev.aggregate(_samples([[T, N], [T, F], [T]], [[T, N], [T, T], [T]]))
    assert m["inst_strict"] == pytest.approx(3 / 4)
    assert m["prompt_strict"] == pytest.approx(1 / 2)
    assert m["inst_loose"] == pytest.approx(4 / 4)
    assert m["prompt_loose"] == pytest.approx(2 / 2)
    assert (m["n_unscorable"], m["n_prompts_unscorable"], m["n_instructions_scored"]) == (1, 1, 4)


def test_all_unscorable_gives_none_not_zero():
    m = ev.aggregate(_samples([[N]], [[N]]))
    assert m["prompt_strict"] is None and m["inst_strict"] is None and m["n_unscorable"] == 1


def test_per_type_counts():
    # t0: strict T,T,F (2/3), loose T,T,T (3/3); t1: strict T,F (1/2) + one unscorable, loose T,T (2/2)
    rows = ev.per_type(_samples([[T, T], [T, F], [F, N]], [[T, T], [T, T], [T, N]]))
    assert rows["t0"] == {"n": 3, "n_strict": 2, "n_loose": 3, "n_unscorable": 0, "strict": 2 / 3, "loose": 1.0}
    assert rows["t1"] == {"n": 2, "n_strict": 1, "n_loose": 2, "n_unscorable": 1, "strict": 0.5, "loose": 1.0}


# --------------------------------------------------------------------------------------------------------------------
# with the real checkers


def test_loose_passes_where_strict_fails():
    # the quotation check wants the answer to start and end with '"'; bold markers break it, loose strips '*'
    rec = _record("q", ["startend:quotation", "punctuation:no_comma"])
    res = ev.score_responses([rec], ['**"Paris is the capital of France."**'])
    inst = res.samples[0]["instructions"]
    assert [(i["strict"], i["loose"]) for i in inst] == [(False, True), (True, True)]
    assert (res.metrics["prompt_strict"], res.metrics["prompt_loose"]) == (0.0, 1.0)
    assert (res.metrics["inst_strict"], res.metrics["inst_loose"]) == (0.5, 1.0)


def test_unscorable_checker_is_reported(monkeypatch):
    import herl_core.rewards.constraints as constraints

    real = constraints.check

    def fake(rubric, response, prompt=None, loose=False):
        return None if rubric.id == "punctuation:no_comma" else real(rubric, response, prompt=prompt, loose=loose)

    monkeypatch.setattr(constraints, "check", fake)
    rec = _record("u", ["startend:quotation", "punctuation:no_comma"])
    res = ev.score_responses([rec, _record("v", ["startend:quotation"])], ['"a"', '"b"'])
    # 3 instructions, 1 unscorable: inst = 2/2 pass; prompt level only over "v": 1/1
    assert res.metrics["n_unscorable"] == 1 and res.metrics["n_prompts_unscorable"] == 1
    assert res.metrics["inst_strict"] == 1.0 and res.metrics["prompt_strict"] == 1.0
    assert res.per_type["punctuation:no_comma"]["n_unscorable"] == 1 and res.per_type["punctuation:no_comma"]["n"] == 0
    assert res.samples[0]["prompt_strict"] is None


SYNTHETIC = [
    "",
    '"hello world. this is a short answer without commas."',
    "*Title*\n<<A Title>>\nFirst paragraph.\n\n***\n\nSecond paragraph.\nP.S. thanks",
    "SECTION 1\nALL CAPS ANSWER WITH NO LOWERCASE\nSECTION 2\nMORE TEXT",
    '{"answer": "json only"}',
]


def _ifeval_sample(n: int = 20) -> list[dict]:
    """Every 27th IFEval line (20 lines across the file, so many instruction types)."""
    lines = _eval_framework_file(IFEVAL_FILE).read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines[::27][:n]]


def test_equal_to_lm_eval_ifeval_scoring():
    from herl_core.nltk_setup import ensure_punkt

    ensure_punkt()
    from lm_eval.tasks.ifeval.utils import agg_inst_level_acc, process_results

    docs = _ifeval_sample()
    alpaca = json.loads(_eval_framework_file(ALPACA_FILE).read_text(encoding="utf-8"))
    records = [_benchmark_record(d, "ifeval", f"line {n}") for n, d in enumerate(docs)]
    responses = [alpaca[n]["output"] for n in range(len(docs))] + [SYNTHETIC[n % 5] for n in range(len(docs))]
    ours = ev.score_responses(records + records, responses)
    theirs = [process_results(doc, [resp]) for doc, resp in zip(docs + docs, responses, strict=True)]
    for sample, ref in zip(ours.samples, theirs, strict=True):
        assert [i["strict"] for i in sample["instructions"]] == ref["inst_level_strict_acc"], sample["id"]
        assert [i["loose"] for i in sample["instructions"]] == ref["inst_level_loose_acc"], sample["id"]
        assert sample["prompt_strict"] == ref["prompt_level_strict_acc"]
        assert sample["prompt_loose"] == ref["prompt_level_loose_acc"]
    strict_flags = [f for r in theirs for f in r["inst_level_strict_acc"]]
    assert 0 < sum(strict_flags) < len(strict_flags)  # the sample has both passes and failures
    m = ours.metrics
    assert m["prompt_strict"] == sum(r["prompt_level_strict_acc"] for r in theirs) / len(theirs)
    assert m["prompt_loose"] == sum(r["prompt_level_loose_acc"] for r in theirs) / len(theirs)
    assert m["inst_strict"] == agg_inst_level_acc([r["inst_level_strict_acc"] for r in theirs])
    assert m["inst_loose"] == agg_inst_level_acc([r["inst_level_loose_acc"] for r in theirs])


# --------------------------------------------------------------------------------------------------------------------
# test-time self-improvement

GAMMA = {"keywords": ["gamma"]}
# a: 3 instructions, each revision fixes one more: s0 passes 0, s1 1 (no comma), s2 2 (+quotes), s3 3 (+gamma)
CHAIN = {"s0": "s1 alpha beta", "s1": '"s2 alpha beta"', "s2": '"s3 alpha gamma beta"', "c0": "c1 x, y", "d0": "d1 x y"}


def _records() -> list[PromptRecord]:
    return [
        _record("a", ["punctuation:no_comma", "startend:quotation", "keywords:existence"], [{}, {}, GAMMA], "Say A."),
        _record("b", ["punctuation:no_comma"], prompt="Say B."),
        _record("c", ["punctuation:no_comma", "keywords:existence"], [{}, GAMMA], "Say C."),
        _record("d", ["punctuation:no_comma", "keywords:existence"], [{}, GAMMA], "Say D."),
    ]


def _fake_policy():
    first = {"Say A.": "s0 alpha, beta", "Say B.": "b0 fine", "Say C.": "c0 gamma, x", "Say D.": "d0 gamma, x"}
    calls: list[list[str]] = []

    def generate(prompts: list[str]) -> list[str]:
        calls.append(list(prompts))
        if all(p in first for p in prompts):
            return [first[p] for p in prompts]
        # a hindsight prompt carries the draft; its marker (s0, c0, ...) says which revision comes next
        return [CHAIN.get(re.search(r"\b([scd]\d) ", p).group(1), "stuck, stuck") for p in prompts]

    return generate, calls


def test_self_improvement_rounds():
    generate, calls = _fake_policy()
    res = ev.evaluate_policy(_records(), generate, rounds=3)
    # 8 instructions. round 0 passes: a 0, b 1, c 1 (gamma), d 1 (gamma) = 3/8; all-pass prompts: b = 1/4
    # rounds 1-3: a gains one pass per round (4/8, 5/8, 6/8), a is all-pass after round 3 (2/4);
    # c's revision passes 0 (worse) and d's passes 1 (a tie): both keep their round-0 answer.
    strict = [r["inst_strict"] for r in res.rounds]
    assert strict == [3 / 8, 4 / 8, 5 / 8, 6 / 8]
    assert [r["prompt_strict"] for r in res.rounds] == [1 / 4, 1 / 4, 1 / 4, 2 / 4]
    assert [r.get("n_revised") for r in res.rounds] == [None, 3, 3, 3]
    assert [r.get("n_improved") for r in res.rounds] == [None, 1, 1, 1]
    kept = {s["id"]: (s["response"], s["round"]) for s in res.samples}
    assert kept == {
        "a": ('"s3 alpha gamma beta"', 3),
        "b": ("b0 fine", 0),
        "c": ("c0 gamma, x", 0),
        "d": ("d0 gamma, x", 0),
    }
    assert res.metrics == res.rounds[-1] and res.feedback == "strict checker verdicts"
    assert len(calls) == 4 and len(calls[0]) == 4 and all(len(c) == 3 for c in calls[1:])  # b is never revised
    assert "s0 alpha, beta" in calls[1][0]  # the hindsight prompt carries the draft


def test_round_zero_is_plain_scoring():
    generate, _ = _fake_policy()
    res = ev.evaluate_policy(_records(), generate, rounds=0)
    plain = ev.score_responses(_records(), ["s0 alpha, beta", "b0 fine", "c0 gamma, x", "d0 gamma, x"])
    assert res.rounds == [plain.metrics] and res.metrics == plain.metrics and res.feedback is None


def test_write_eval_files(tmp_path):
    generate, _ = _fake_policy()
    res = ev.evaluate_policy(_records(), generate, rounds=1)
    ev.write_eval(res, tmp_path / "out")
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["inst_strict"] == 4 / 8 and len(metrics["rounds"]) == 2 and metrics["feedback"] == ev.FEEDBACK
    assert json.loads((tmp_path / "out" / "per_type.json").read_text())["startend:quotation"]["n"] == 1
    rows = [json.loads(line) for line in (tmp_path / "out" / "samples.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == ["a", "b", "c", "d"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["metrics.json", "per_type.json", "samples.jsonl"]


def test_length_mismatch_is_an_error():
    with pytest.raises(ValueError, match="2 records but 1 responses"):
        ev.score_responses(_records()[:2], ["x"])
    with pytest.raises(ValueError, match="generate returned 1 answers for 4 prompts"):
        ev.evaluate_policy(_records(), lambda prompts: ["x"])


# --------------------------------------------------------------------------------------------------------------------
# the evaluate stage answers batch by batch (for its progress display), with the answers of one engine call


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_run_evaluate_batch_by_batch_gives_the_answers_of_one_call(tmp_path, monkeypatch, temperature):
    import herl_core.rollout as rollout
    from herl_core.config import Config
    from herl_core.io import write_jsonl_atomic
    from herl_core.models import encode_prompt, load_policy
    from herl_core.rollout.base import SamplingParams
    from herl_core.stages import run_evaluate

    texts = ["Say hi.", "Write a long note about the sea and the sky.", "Name a fruit.", "Count to three, please.",
             "Describe rain in one short line."]  # fmt: skip
    records = [_record(f"p{i}", ["punctuation:no_comma"], prompt=t) for i, t in enumerate(texts)]
    write_jsonl_atomic(tmp_path / "prepared" / "ifeval.jsonl", records)
    cfg = Config.model_validate(
        {
            "model": {"name_or_path": "tiny"},
            "prepare": {"out_dir": str(tmp_path / "prepared")},
            "train": {"out_dir": str(tmp_path / "none")},
            "evaluate": {"benchmarks": ["ifeval"], "max_new_tokens": 6, "batch_size": 2, "temperature": temperature,
                         "out_dir": str(tmp_path / "eval")},
        }
    )  # fmt: skip
    calls: list[int] = []
    real = rollout.make_engine

    def counting(*args, **kwargs):
        engine = real(*args, **kwargs)
        generate = engine.generate
        engine.generate = lambda prompts, n, sampling: calls.append(len(prompts)) or generate(prompts, n, sampling)
        return engine

    monkeypatch.setattr(rollout, "make_engine", counting)
    progress: list[tuple] = []
    run_evaluate(cfg, on_batch=lambda *a: progress.append(a))
    assert calls == [2, 2, 1]  # 5 prompts, batch_size 2
    assert progress == [("ifeval", 1, 3, 5), ("ifeval", 2, 3, 5), ("ifeval", 3, 3, 5)]
    answers = [json.loads(x)["response"] for x in (tmp_path / "eval/ifeval/samples.jsonl").read_text().splitlines()]
    # the same prompts in ONE call of an engine with generation_batch_size 2 (it sorts and cuts them the same way)
    model, tok = load_policy(cfg.model)
    engine = real(cfg.rollout.engine.model_copy(update={"generation_batch_size": 2}), model, tok)
    ids = [encode_prompt(tok, t) for t in texts]
    sampling = SamplingParams(temperature=temperature, max_new_tokens=6, seed=cfg.train.seed)
    assert answers == [g.text for g in engine.generate(ids, 1, sampling)]
