"""Property-based (hypothesis): the loaders and the hindsight prompt builder on arbitrary input.

* ``read_jsonl`` round-trips any valid list of PromptRecords, and on arbitrary bytes either returns records or
  raises ``DataError``, never another exception;
* ``build_hindsight_prompt`` keeps the instruction and the draft verbatim, lists exactly the unmet rubrics on the
  Unmet line and exactly the satisfied ones on the Satisfied line, each numbered by its position;
* ``load_params`` on any YAML document raises only ``ConfigError``.
"""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from herl_core.config import Config, ConfigError, load_params
from herl_core.hindsight.prompt import HINDSIGHT_TEMPLATE, build_hindsight_prompt
from herl_core.io import DataError, read_jsonl, write_jsonl_atomic
from herl_core.records import PromptRecord, Rubric, Verdict

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# JSON text: any unicode except lone surrogates (not encodable as UTF-8, and refused by the records themselves)
text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=40)
nonblank = text.filter(lambda s: len(s) > 0)
json_scalar = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | text
json_value = st.recursive(
    json_scalar, lambda kids: st.lists(kids, max_size=3) | st.dictionaries(text, kids, max_size=3), max_leaves=8
)


@st.composite
def rubrics(draw) -> list[Rubric]:
    ids = draw(st.lists(nonblank, min_size=1, max_size=4, unique=True))
    out = []
    for rid in ids:
        kind = draw(st.sampled_from(["constraint", "judge"]))
        description = draw(nonblank.filter(str.strip)) if kind == "judge" else draw(st.none() | text)
        out.append(
            Rubric(
                id=rid, kind=kind, description=description,
                kwargs=draw(st.dictionaries(text, json_value, max_size=3)),
                weight=draw(st.floats(allow_nan=False, allow_infinity=False)),
            )
        )  # fmt: skip
    return out


@st.composite
def prompt_lists(draw) -> list[PromptRecord]:
    ids = draw(st.lists(nonblank, min_size=1, max_size=5, unique=True))
    return [PromptRecord(id=i, prompt=draw(nonblank), rubrics=draw(rubrics()), source=draw(text)) for i in ids]


@FAST
@given(prompt_lists())
def test_read_jsonl_round_trips_any_valid_prompt_list(rows):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "p.jsonl"
        assert write_jsonl_atomic(path, rows) == len(rows)
        assert read_jsonl(path, PromptRecord) == rows


def _lines_of(draw_from) -> st.SearchStrategy[bytes]:
    return st.lists(draw_from, max_size=4).map(lambda parts: b"\n".join(parts))


# bytes that get past the early checks now and then: valid records, JSON values, mutated records, raw bytes
record_json = prompt_lists().map(lambda rows: rows[0].model_dump_json().encode())
any_bytes = st.one_of(
    st.binary(max_size=200),
    _lines_of(st.one_of(record_json, json_value.map(lambda v: json.dumps(v).encode()), st.binary(max_size=30))),
    record_json.flatmap(lambda b: st.integers(0, len(b)).map(lambda k: b[:k])),  # truncated
)


@FAST
@given(any_bytes)
@example(b'{"id": ' + b"1" * 5000 + b"}")  # json.loads: ValueError (int string too long), not JSONDecodeError
@example(b'{"id": ' + b"[" * 100_000 + b"]" * 100_000 + b"}")  # json.loads: RecursionError
@example(b'{"id": "a", "prompt": "x", "rubrics": [{"id": "r", "weight": NaN}]}')  # NaN is not a weight
def test_read_jsonl_on_arbitrary_bytes_returns_records_or_raises_data_error(data):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "any.jsonl"
        path.write_bytes(data)
        try:
            rows = read_jsonl(path, PromptRecord)
        except DataError as exc:
            assert str(exc).startswith(str(path))  # every message names the file
        else:
            assert rows and all(isinstance(r, PromptRecord) for r in rows)
            assert all(math.isfinite(rb.weight) for r in rows for rb in r.rubrics)


# --------------------------------------------------------------------------------------------------------------------
# the hindsight prompt

HEAD, TAIL = HINDSIGHT_TEMPLATE.split("{instruction}")
MIDDLE, CLOSING = TAIL.split("{draft}")
plain = st.text("abcdefghij XYZ", max_size=12)  # descriptions without "," "." or newlines: the lists parse back


def _parse_list(line: str) -> list[tuple[int, str]]:
    if line == "none":
        return []
    items = []
    for item in line.split(", "):
        k, desc = item.split(". ", 1)
        items.append((int(k), desc))
    return items


@FAST
@given(text, text, st.lists(st.tuples(plain, st.sampled_from([True, False, None])), max_size=6))
def test_hindsight_prompt_keeps_texts_verbatim_and_lists_each_verdict_once(instruction, draft, marks):
    verdicts = [Verdict(rubric_id=f"r{k}", description=d, passed=p) for k, (d, p) in enumerate(marks)]
    out = build_hindsight_prompt(instruction, verdicts, draft)
    # the instruction follows the fixed head, the draft precedes the fixed closing: both verbatim
    assert out.startswith(HEAD + instruction) and out.endswith(draft + CLOSING)
    middle = out[len(HEAD + instruction) : len(out) - len(draft + CLOSING)]
    lines = middle.split("\n")  # "", "", "[Candidate]", "Satisfied: ...", "Unmet: ...", "Draft:", ""
    assert lines[:3] == ["", "", "[Candidate]"] and lines[5:] == ["Draft:", ""]
    satisfied, unmet = lines[3], lines[4]
    assert satisfied.startswith("Satisfied: ") and unmet.startswith("Unmet: ")

    def expected(passed):  # (k, shown text) for the verdicts with this mark; k = 1-based position
        return [(k, d if d.strip() else f"Constraint #{k}") for k, (d, p) in enumerate(marks, start=1) if p is passed]

    assert _parse_list(unmet.removeprefix("Unmet: ")) == expected(False)
    assert _parse_list(satisfied.removeprefix("Satisfied: ")) == expected(True)


# --------------------------------------------------------------------------------------------------------------------
# params.yaml

SECTIONS = list(Config.model_fields)
FIELDS = sorted({f for s in SECTIONS for f in getattr(Config.model_fields[s].annotation, "model_fields", {})})
key = st.sampled_from(SECTIONS + FIELDS + ["profiles", "tiny", "steps"]) | st.text(max_size=8)
yaml_value = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
    lambda kids: st.lists(kids, max_size=3) | st.dictionaries(key, kids, max_size=4),
    max_leaves=12,
)


def _str_profile(tree: object) -> bool:
    return not isinstance(tree, dict) or isinstance(tree.get("profile"), str | None)


@FAST
@given((st.dictionaries(key, yaml_value, max_size=5) | yaml_value).filter(_str_profile))
@example({"profile": "tiny", "profiles": {"tiny": {"train": {"steps": "many"}}}})
@example({"train": {"steps": 2, "stpes": 3}})
def test_load_params_raises_only_config_error(tree):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "params.yaml"
        path.write_text(yaml.safe_dump(tree, allow_unicode=True), encoding="utf-8")
        try:
            cfg = load_params(path)
        except ConfigError as exc:
            assert str(path) in str(exc) or "invalid config" in str(exc)
        else:
            assert isinstance(cfg, Config)


@FAST
@given(st.text(max_size=80))
def test_load_params_on_any_text_raises_only_config_error(raw):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "params.yaml"
        path.write_text(raw, encoding="utf-8", errors="surrogatepass")
        try:
            load_params(path)
        except ConfigError:
            pass


def test_a_list_as_profile_is_a_config_error(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("profile: [a, list]\nprofiles:\n  tiny: {}\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="profile"):
        load_params(path)
