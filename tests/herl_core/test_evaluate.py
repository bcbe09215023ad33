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
# truncation, prompts, generation


def test_truncation_rate_hand_counted():
    # 3 answers: cut (5 tokens), finished (3 tokens), a bare string (unknown) → 1 cut of 2 known; mean length 4
    recs = [_record(f"r{i}", ["punctuation:no_comma"]) for i in range(3)]
    res = ev.score_responses(recs, [ev.Answer("a b", True, 5), ev.Answer("c", False, 3), "d"])
    assert (res.metrics["truncated_frac"], res.metrics["n_truncated"]) == (0.5, 1)
    assert res.metrics["response_tokens_mean"] == 4.0
    assert [(s["truncated"], s["response_tokens"]) for s in res.samples] == [(True, 5), (False, 3), (None, None)]
    # a cut answer is scored as it stands: all three pass no_comma
    assert res.metrics["inst_strict"] == 1.0


def test_truncation_unknown_for_bare_strings():
    m = ev.score_responses([_record("r", ["punctuation:no_comma"])], ["x"]).metrics
    assert m["truncated_frac"] is None and m["n_truncated"] == 0 and m["response_tokens_mean"] is None


def test_self_improvement_keeps_the_kept_answers_truncation():
    # a's first answer is cut and fails; its revision passes and finished: the kept answer's flag counts
    recs = [_record("a", ["punctuation:no_comma"], prompt="Say A."), _record("b", ["punctuation:no_comma"])]

    def generate(prompts):
        if prompts == ["Say A.", "Say something."]:
            return [ev.Answer("x, y", True, 8), ev.Answer("fine", False, 2)]
        return [ev.Answer("fixed", False, 3) for _ in prompts]

    res = ev.evaluate_policy(recs, generate, rounds=1)
    assert [r["truncated_frac"] for r in res.rounds] == [0.5, 0.0]
    assert [s["round"] for s in res.samples] == [1, 0]


class _Gen:
    def __init__(self, prompt, ids, finished):
        self.prompt_ids, self.completion_ids, self.finished = prompt, ids, finished


class _Engine:
    """A deterministic greedy "model" over whole sequences: the first token is the length at which it writes EOS (0);
    before that the next token is len(seq) % 50 + 1. Continuing from a prefix gives the same tokens (as greedy does)."""

    def __init__(self):
        self.calls = []

    def generate(self, prompts, n, sampling):
        self.calls.append(([list(p) for p in prompts], n, sampling))
        out = []
        for p in prompts:
            seq = list(p)
            while len(seq) - len(p) < sampling.max_new_tokens and (len(seq) == len(p) or seq[-1] != 0):
                seq.append(0 if len(seq) + 1 >= p[0] else len(seq) % 50 + 1)
            out.append(_Gen(list(p), seq[len(p) :], seq[-1] == 0))
        return out


class _Tok:
    """A tokenizer stand-in: one id per character; the template writes ``bos`` first when ``own_bos``."""

    bos_token = "<s>"

    def __init__(self, own_bos: bool):
        self.own_bos, self.seen = own_bos, []

    def apply_chat_template(self, messages, tokenize, add_generation_prompt):
        assert tokenize is False and add_generation_prompt is True
        body = "".join(f"[{m['role']}]{m['content']}" for m in messages) + "[assistant]"
        return ("<s>" if self.own_bos else "") + body

    def __call__(self, text, **kwargs):
        self.seen.append(kwargs)
        ids = [ord(c) for c in text]
        return {"input_ids": ([1] if kwargs.get("add_special_tokens", True) else []) + ids}

    def decode(self, ids, skip_special_tokens):
        assert skip_special_tokens
        return "".join(chr(i + 96) for i in ids if i != 0)


def test_encode_eval_prompt_follows_lm_evals_bos_rule():
    # the template writes BOS: no special tokens added; it does not: the tokenizer's defaults (here: BOS prepended)
    own, plain = _Tok(own_bos=True), _Tok(own_bos=False)
    a = ev.encode_eval_prompt(own, "hi")
    b = ev.encode_eval_prompt(plain, "hi")
    assert own.seen == [{"add_special_tokens": False}] and plain.seen == [{}]
    assert a == [ord(c) for c in "<s>[user]hi[assistant]"] and b == [1] + [ord(c) for c in "[user]hi[assistant]"]
    assert ev.encode_eval_prompt(plain, "hi", system_prompt="S") == [1] + [
        ord(c) for c in "[system]S[user]hi[assistant]"
    ]
    assert ev.encode_eval_prompt(plain, "raw", chat=False) == [ord(c) for c in "raw"]


def test_eval_prompts_equal_the_training_format_for_smollm2():
    # SmolLM2's template starts with <|im_start|>, its BOS: lm-eval's rule adds nothing, so every IFEval/IFBench
    # prompt encodes exactly as herl_core.models.encode_prompt (training) encodes it
    from herl_core.config import ModelConfig
    from herl_core.models import encode_prompt, load_tokenizer
    from herl_core.prepare import load_ifbench, load_ifeval

    tok = load_tokenizer(ModelConfig(name_or_path="tiny"))  # the SmolLM2 tokenizer
    texts = [r.prompt for r in load_ifeval() + load_ifbench()]
    assert len(texts) == 841
    assert all(ev.encode_eval_prompt(tok, t) == encode_prompt(tok, t) for t in texts)
    assert ev.encode_eval_prompt(tok, texts[0])[0] == tok.bos_token_id == 1


def test_pass_limits():
    assert ev.pass_limits(1280, 256) == [256, 512, 1024, 1280]
    assert ev.pass_limits(1280, 640) == [640, 1280]
    assert ev.pass_limits(128, 256) == ev.pass_limits(128, 128) == ev.pass_limits(128, 0) == [128]


def test_generate_answers_marks_cut_answers():
    from herl_core.rollout.base import SamplingParams

    # prompt texts are raw (chat=False): the first character's code is where the fake model writes EOS.
    # "\x05a" (2 ids): EOS at length 5 → 3 tokens [3, 4, 0]; "\x0aab" (3 ids): 7 tokens; "\x30" (1 id): cut at 7
    engine, tok = _Engine(), _Tok(own_bos=True)
    got = ev.generate_answers(engine, tok, ["\x05a", "\x0aab", "\x30"], max_new_tokens=7, seed=3, chat=False)
    assert [(a.n_tokens, a.truncated) for a in got] == [(3, False), (7, False), (7, True)]
    assert got[0].text == "cd" and got[2].text == "bcdefgh"  # ids 2..8 → b..h; EOS not decoded
    ((prompts, n, sampling),) = engine.calls
    assert n == 1 and sampling == SamplingParams(temperature=0.0, max_new_tokens=7, seed=3)
    assert prompts[0] == [5, ord("a")]
    assert ev.generate_answers(engine, tok, [], max_new_tokens=7) == [] and len(engine.calls) == 1


def test_passes_give_the_one_pass_answers_and_stop_finished_ones():
    # targets: EOS after 3, 6, 13, 30 new tokens (first id = total length; prompts of 2 ids); one never ends by 40
    texts = ["\x05a", "\x08a", "\x0fa", "\x20a", "\x60a"]
    one, passes = _Engine(), _Engine()
    ref = ev.generate_answers(one, _Tok(True), texts, max_new_tokens=40, chat=False)
    got = ev.generate_answers(passes, _Tok(True), texts, max_new_tokens=40, chat=False, first_pass_tokens=5)
    assert got == ref
    assert [(a.n_tokens, a.truncated) for a in got] == [(3, False), (6, False), (13, False), (30, False), (40, True)]
    # passes to 5, 10, 20, 40 tokens: each continues only the answers without EOS, from prompt + answer so far
    assert [len(p) for p, _, _ in passes.calls] == [5, 4, 3, 2]
    assert [s.max_new_tokens for _, _, s in passes.calls] == [5, 5, 10, 20]
    assert passes.calls[1][0][0] == [8, ord("a"), 3, 4, 5, 6, 7]  # prompt + the first 5 tokens
    # sampled answers take one pass (a second would reuse the random stream)
    sampled = _Engine()
    ev.generate_answers(sampled, _Tok(True), texts, max_new_tokens=40, chat=False, temperature=1.0, first_pass_tokens=5)
    assert len(sampled.calls) == 1


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
