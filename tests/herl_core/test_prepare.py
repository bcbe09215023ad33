"""The prepare stage: benchmark loaders, the seeded training set, disjointness, the report and the written files.

Run: .venv/bin/pytest tests/herl_core/test_prepare.py -q
"""

from __future__ import annotations

import json
from collections import Counter

import pytest

from herl_core import prepare as prep
from herl_core.config import PrepareConfig
from herl_core.io import DataError, read_jsonl
from herl_core.records import PromptRecord, Rubric


@pytest.fixture(scope="module")
def heldout() -> dict[str, list[PromptRecord]]:
    return {"ifeval": prep.load_ifeval(), "ifbench": prep.load_ifbench()}


@pytest.fixture(scope="module")
def train() -> list[PromptRecord]:
    return prep.build_train_set(prep.synthetic_instructions(), seed=3, min_constraints=1, max_constraints=3)


# --------------------------------------------------------------------------------------------------------------------
# loaders


def test_benchmark_loaders(heldout):
    ifeval, ifbench = heldout["ifeval"], heldout["ifbench"]
    assert (len(ifeval), len(ifbench), len(prep.load_alpaca_instructions())) == (541, 300, 805)
    # instruction counts of the two files (offline_models_and_data §1.1 / combined_stack §4c: 834 and 344)
    assert sum(len(r.rubrics) for r in ifeval) == 834 and sum(len(r.rubrics) for r in ifbench) == 344
    ids = [r.id for r in ifeval + ifbench]
    assert len(set(ids)) == len(ids) and ids[0] == "ifeval-1000" and ifbench[0].id == "ifbench-0"
    assert {r.source for r in ifeval} == {"ifeval"} and {r.source for r in ifbench} == {"ifbench"}
    # IFBench key 22: all other kwargs are null in the file and are dropped
    key22 = next(r for r in ifbench if r.id == "ifbench-22")
    assert [(r.id, r.kwargs) for r in key22.rubrics] == [
        ("count:numbers", {"N": 15.0}),
        ("count:conjunctions", {"small_n": 5.0}),
    ]


def test_repeated_instruction_id_is_qualified(heldout):
    from herl_core.rewards.constraints import check, describe

    rec = next(r for r in heldout["ifeval"] if r.id == "ifeval-1418")
    assert [r.id for r in rec.rubrics] == [
        "punctuation:no_comma",
        "length_constraints:number_sentences",
        "ifeval/length_constraints:number_sentences",
    ]
    # kwargs "less than 31" and "at least 30": the qualified id is the same checker with its own kwargs
    assert "at least 30 sentences" in describe(rec.rubrics[2])
    one = "One sentence."
    assert check(rec.rubrics[1], one) is True and check(rec.rubrics[2], one) is False


def test_local_instruction_files(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps([{"instruction": "Say hi."}, {"instruction": "Say bye."}]))
    (tmp_path / "b.json").write_text(json.dumps(["One.", "Two."]))
    (tmp_path / "c.jsonl").write_text('{"text": "Alpha."}\n\n{"text": "Beta."}\n')
    assert prep.load_instructions_from(str(tmp_path / "a.json")) == ["Say hi.", "Say bye."]
    assert prep.load_instructions_from(str(tmp_path / "b.json")) == ["One.", "Two."]
    assert prep.load_instructions_from(str(tmp_path / "c.jsonl"), field="text") == ["Alpha.", "Beta."]
    import pandas as pd

    pd.DataFrame({"instruction": ["P1.", "P2."]}).to_parquet(tmp_path / "d.parquet")
    assert prep.load_instructions_from(str(tmp_path / "d.parquet")) == ["P1.", "P2."]


def test_bad_instruction_files(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"instruction": "ok"}\n{"prompt": "no instruction field"}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2: field 'instruction'"):
        prep.load_instructions_from(str(tmp_path / "bad.jsonl"))
    (tmp_path / "trunc.jsonl").write_text('{"instruction": "ok"}\n{"instruction": "cut\n')
    with pytest.raises(DataError, match=r"trunc\.jsonl:2: invalid JSON"):
        prep.load_instructions_from(str(tmp_path / "trunc.jsonl"))
    (tmp_path / "x.csv").write_text("instruction\nhi\n")
    with pytest.raises(DataError, match="unsupported file type '.csv'"):
        prep.load_instructions_from(str(tmp_path / "x.csv"))
    with pytest.raises(DataError, match="missing.json: file not found"):
        prep.load_instructions_from(str(tmp_path / "missing.json"))


def test_hub_id_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError, match="'tatsu-lab/alpaca' is not a local file and HF_HUB_OFFLINE is set"):
        prep.load_instructions_from("tatsu-lab/alpaca")


def test_synthetic_instructions():
    texts = prep.synthetic_instructions()
    assert len(texts) == 40 and len(set(texts)) == 40  # 4 templates x 10 topics


# --------------------------------------------------------------------------------------------------------------------
# training set


def test_train_set_is_valid(train):
    from herl_core.rewards.constraints import SAMPLEABLE_IFEVAL_IDS, validate_rubric

    conflicts = prep._conflict_table()
    assert len(train) == 40 and len({r.id for r in train}) == 40
    for rec in train:
        ids = [r.id for r in rec.rubrics]
        assert 1 <= len(ids) <= 3 and len(set(ids)) == len(ids) and set(ids) <= set(SAMPLEABLE_IFEVAL_IDS)
        assert not any(b in conflicts.get(a, set()) for a in ids for b in ids if a != b), ids
        base = prep.base_text(rec)
        assert base in prep.synthetic_instructions() and rec.source == "train" and rec.id.startswith("train-")
        for rubric in rec.rubrics:
            validate_rubric(rubric, prompt=base)
            assert rubric.description and rubric.description in rec.prompt
    assert set(Counter(len(r.rubrics) for r in train)) == {1, 2, 3}  # 40 draws of U{1,2,3} hit every k


def test_train_set_deterministic_per_seed(train):
    texts = prep.synthetic_instructions()
    again = prep.build_train_set(texts, seed=3, min_constraints=1, max_constraints=3)
    other = prep.build_train_set(texts, seed=4, min_constraints=1, max_constraints=3)
    # built after other draws warmed the checker cache: the set must still depend on the seed only
    assert again == train, "same seed, different training set: sample_constraint is not a function of rng alone"
    assert [r.prompt for r in other] != [r.prompt for r in train]
    assert [prep.base_text(r) for r in other] == [prep.base_text(r) for r in train]  # same bases, other constraints


def test_train_set_bounds_and_cap():
    recs = prep.build_train_set(prep.synthetic_instructions() * 2, seed=0, min_constraints=2, max_constraints=2, n=5)
    assert len(recs) == 5 and all(len(r.rubrics) == 2 for r in recs)  # duplicates removed, then capped at 5
    with pytest.raises(ValueError, match="min_constraints"):
        prep.build_train_set(["x"], seed=0, min_constraints=3, max_constraints=2)


# --------------------------------------------------------------------------------------------------------------------
# disjointness and report


def test_disjoint_and_planted_overlap(train, heldout):
    held = heldout["ifeval"] + heldout["ifbench"]
    prep.assert_disjoint(train, held)
    planted = prep.build_train_set([heldout["ifeval"][7].prompt], seed=0, min_constraints=1, max_constraints=1)
    with pytest.raises(ValueError, match=r"1 texts \[\('train-[0-9a-f]{12}', 'ifeval-"):
        prep.assert_disjoint(train + planted, held)
    # AlpacaEval's "What is the meaning of life?" sits inside IFBench key 22: a base contained in a held-out prompt
    inside = prep.build_train_set(["What is the  meaning of LIFE?"], seed=0, min_constraints=1, max_constraints=1)
    assert prep.find_overlaps(inside, held) == [(inside[0].id, "ifbench-22")]
    kept, dropped = prep.drop_overlapping(["What is the meaning of life?", "Say hi to a cat."], held)
    assert (kept, dropped) == (["Say hi to a cat."], ["What is the meaning of life?"])


def test_data_report_counts(train, heldout):
    report = prep.data_report(train, heldout)
    assert report["disjoint"] is True and report["disjoint_checked_against"] == ["ifbench", "ifeval"]
    for name, expected in (("train", 40), ("ifeval", 541), ("ifbench", 300)):
        split = report["splits"][name]
        hist = split["constraints_per_prompt"]
        assert split["prompts"] == expected == sum(hist.values())
        assert split["constraints"] == sum(split["per_type"].values()) == sum(int(k) * n for k, n in hist.items())
    assert report["splits"]["ifeval"]["constraints"] == 834
    planted = [PromptRecord(id="x", prompt=heldout["ifeval"][0].prompt, rubrics=[Rubric(id="punctuation:no_comma")])]
    assert prep.data_report(planted, heldout)["disjoint"] is False


def test_run_prepare_writes_readable_files(tmp_path):
    out = tmp_path / "prepared"
    cfg = PrepareConfig(seed=1, train_source="synthetic", n_train=12, out_dir=str(out))
    report = prep.run_prepare(cfg)
    names = ["ifbench.jsonl", "ifeval.jsonl", "report.json", "train.jsonl", "val.jsonl"]
    assert sorted(p.name for p in out.iterdir()) == names
    train, val = read_jsonl(out / "train.jsonl", PromptRecord), read_jsonl(out / "val.jsonl", PromptRecord)
    assert len(train) == 12 and len(read_jsonl(out / "ifeval.jsonl", PromptRecord)) == 541
    assert len(read_jsonl(out / "ifbench.jsonl", PromptRecord)) == 300
    assert json.loads((out / "report.json").read_text()) == report
    assert report["disjoint"] is True and report["splits"]["train"]["prompts"] == 12 and report["seed"] == 1
    assert report["disjoint_checked_against"] == ["ifbench", "ifeval", "val"]
    assert report["dropped_overlapping_instructions"] == 0
    # val: 64 asked, at most a fifth of the 40 instructions = 8 held out
    assert report["splits"]["val"]["prompts"] == len(val) == 8
    assert all(r.id.startswith("val-") and r.source == "val" for r in val)
    # no instruction is shared: the val prompts' base instructions never occur in training, and no text overlaps
    assert not {prep.base_text(r) for r in val} & {prep.base_text(r) for r in train}
    assert prep.find_overlaps(train, val) == [] and prep.find_overlaps(val, train) == []
    kept, held = prep.split_validation(prep.synthetic_instructions(), 64, 1)
    assert train == prep.build_train_set(kept, 1, 1, 3, n=12)  # same seed → same set
    assert val == prep.build_val_set(held, 1, 1, 3)


def test_validation_split_is_seeded_disjoint_and_keeps_the_order():
    texts = [f"Instruction number {i}." for i in range(50)]
    train, val = prep.split_validation(texts, 7, seed=0)
    assert len(val) == 7 and len(train) == 43 and not set(train) & set(val) and set(train) | set(val) == set(texts)
    assert train == [t for t in texts if t in set(train)] and val == [t for t in texts if t in set(val)]  # order
    assert prep.split_validation(texts, 7, seed=0) == (train, val)
    assert prep.split_validation(texts, 7, seed=1)[1] != val  # the seed picks the instructions
    assert prep.split_validation(texts, 64, seed=0)[1] == prep.split_validation(texts, 10, seed=0)[1]  # 50 // 5
    assert prep.split_validation(texts, 0, seed=0) == (texts, [])


def test_the_default_val_split_shares_no_alpaca_instruction_with_training():
    """The default data (AlpacaEval, val_prompts 64): 64 instructions held out, none of them (normalised) equal to,
    inside or containing a training instruction."""
    kept, dropped = prep.drop_overlapping(prep._unique(prep.load_alpaca_instructions()), [])
    train, val = prep.split_validation(kept, PrepareConfig().val_prompts, PrepareConfig().seed)
    assert len(val) == 64 and len(train) == len(kept) - 64
    norm_train = [prep.normalise(t) for t in train]
    for text in map(prep.normalise, val):
        assert not any(text == t or text in t or t in text for t in norm_train), text
