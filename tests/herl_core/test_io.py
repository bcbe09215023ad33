"""Atomic writes and the validated JSONL reader: bad lines are reported with file, line and field."""

from __future__ import annotations

import json
import os

import pytest

from herl_core.io import DataError, atomic_dir, atomic_open, read_jsonl, write_jsonl_atomic
from herl_core.records import PromptRecord

GOOD = {"id": "p1", "prompt": "Say hi.", "rubrics": [{"id": "change_case:english_lowercase"}]}


def test_roundtrip(tmp_path):
    p = tmp_path / "a.jsonl"
    rows = [PromptRecord.model_validate(GOOD), PromptRecord.model_validate({**GOOD, "id": "p2"})]
    assert write_jsonl_atomic(p, rows) == 2
    assert read_jsonl(p, PromptRecord) == rows


def test_failed_write_leaves_previous_file_and_no_temp(tmp_path):
    p = tmp_path / "out.txt"
    p.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_open(p) as fh:
            fh.write("half")
            raise RuntimeError("killed")
    assert p.read_text() == "old"
    assert os.listdir(tmp_path) == ["out.txt"]


def test_atomic_dir_replaces_whole_or_nothing(tmp_path):
    d = tmp_path / "model"
    with atomic_dir(d) as tmp:
        (tmp / "a").write_text("1")
    with pytest.raises(ValueError):
        with atomic_dir(d) as tmp:
            (tmp / "b").write_text("2")
            raise ValueError
    assert sorted(os.listdir(d)) == ["a"]
    assert sorted(os.listdir(tmp_path)) == ["model"]


@pytest.mark.parametrize(
    "content, message",
    [
        (json.dumps(GOOD) + "\n\n", ":2: empty line"),
        ('{"id": "p1", "prompt": "x"', ":1: invalid JSON"),
        (json.dumps({**GOOD, "rubrics": "nope"}), ":1: field 'rubrics'"),
        (json.dumps({**GOOD, "prompt": 3}), ":1: field 'prompt'"),
        (json.dumps({**GOOD, "extra": 1}), ":1: field 'extra': Extra inputs are not permitted"),
        (json.dumps(GOOD) + "\n" + json.dumps(GOOD), ":2: field 'id': duplicate value 'p1' (first on line 1)"),
        ("[1, 2]", ":1: expected a JSON object"),
        ("", "empty file"),
    ],
)
def test_bad_lines_name_file_line_field(tmp_path, content, message):
    p = tmp_path / "bad.jsonl"
    p.write_text(content, encoding="utf-8")
    with pytest.raises(DataError) as err:
        read_jsonl(p, PromptRecord)
    assert str(p) in str(err.value) and message in str(err.value)


def test_non_utf8_and_huge_line(tmp_path, monkeypatch):
    p = tmp_path / "bin.jsonl"
    p.write_bytes(json.dumps(GOOD).encode() + b"\n\xff\xfe\n")
    with pytest.raises(DataError, match=r"bin.jsonl:2: not UTF-8"):
        read_jsonl(p, PromptRecord)
    import herl_core.io as io_mod

    monkeypatch.setattr(io_mod, "MAX_LINE_BYTES", 1000)
    p.write_text(json.dumps({**GOOD, "prompt": "x" * 5000}))
    with pytest.raises(DataError, match="line longer than 1000 bytes"):
        read_jsonl(p, PromptRecord)


# --------------------------------------------------------------------------------------------------------------------
# JSON syntax errors in words: the column, what is wrong, what was found there


@pytest.mark.parametrize(
    "line, message",
    [
        # a raw NUL byte inside the prompt string: "x" is at column 25 (1-based), the NUL right after it
        ('{"id": "p1", "prompt": "x\x00y", "rubrics": []}', "invalid JSON at column 26: raw control character "
         "U+0000 (NUL) inside a string; write it escaped, as \\u0000"),
        ('{"id": "p1", "prompt": "a\tb", "rubrics": []}', "invalid JSON at column 26: raw control character "
         "U+0009 (tab) inside a string; write it escaped, as \\u0009"),
        # the string opened at column 24 is still open when the line ends (the line break is not inside it)
        ('{"id": "p1", "prompt": "x', "invalid JSON at column 24: a string starts here and is never closed"),
        ('{"id": "p1",}', "invalid JSON at column 13: expected a property name in double quotes, found '}'"),
        ('{"id" "p1"}', "invalid JSON at column 7: expected ':' after the property name, found '\"p1\"}'"),
        ('{"id": "p1" "prompt": "x"}', "invalid JSON at column 13: expected ',' or the closing bracket, found "
         "'\"prompt\": \"x\"}'"),
        ('{"id": "p1"', "invalid JSON at column 12: expected ',' or the closing bracket, found the end of the line"),
        ('{"id": tru}', "invalid JSON at column 8: expected a value (a string, number, object, array, true, false or "
         "null), found 'tru}'"),
        ('{"id": "p\\q"}', "invalid JSON at column 10: invalid escape in a string"),
        ('{"id": "p1"} {}', "invalid JSON at column 14: more text after the end of the JSON value, found '{}'"),
    ],
)  # fmt: skip
def test_json_syntax_errors_read_well(tmp_path, line, message):
    p = tmp_path / "bad.jsonl"
    p.write_text(json.dumps(GOOD) + "\n" + line + "\n", encoding="utf-8")
    with pytest.raises(DataError) as err:
        read_jsonl(p, PromptRecord)
    assert str(err.value) == f"{p}:2: {message}" or str(err.value).startswith(f"{p}:2: {message}"), str(err.value)
    assert " at at " not in str(err.value)


def test_json_error_message_of_a_whole_file_names_line_and_column():
    from herl_core.io import json_error_message

    with pytest.raises(json.JSONDecodeError) as err:
        json.loads('[\n  {"a": 1},\n  {"a": }\n]')
    assert json_error_message(err.value, with_line=True) == (
        "invalid JSON at line 3, column 9: expected a value (a string, number, object, array, true, false or null), "
        "found '}'"
    )


# --------------------------------------------------------------------------------------------------------------------
# stale temp leftovers: removed only when no live writer can own them


def _dead_pid() -> int:
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_is_stale_temp_by_writer(tmp_path):
    import subprocess
    import sys

    from herl_core.io import is_stale_temp

    dead = _dead_pid()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        me = os.getpid()
        assert is_stale_temp(tmp_path / f".model.{dead}.abc_12.tmp")  # its process is gone
        assert is_stale_temp(tmp_path / f".model.old-{dead}")
        assert not is_stale_temp(tmp_path / f".model.{live.pid}.abc_12.tmp")  # a live writer's
        assert not is_stale_temp(tmp_path / f".model.old-{live.pid}")
        # this process's pid, but this process is not writing it: a restarted container's leftover
        assert is_stale_temp(tmp_path / f".model.{me}.abc_12.tmp")
        # nested temp folders: the innermost writer (last pid) decides
        assert is_stale_temp(tmp_path / f"..step-000003.{dead}.ab.tmp.{dead}.cd.tmp")
        assert not is_stale_temp(tmp_path / f"..step-000003.{live.pid}.ab.tmp.{live.pid}.cd.tmp")
        # not temp names at all
        for name in (".model.lock", ".herl-complete", ".gitignore", f".m.tmp-{dead}", "model", f"model.{dead}.a.tmp"):
            assert not is_stale_temp(tmp_path / name), name
    finally:
        live.kill()
        live.wait()


def test_sweep_never_removes_this_process_s_writes_in_flight(tmp_path):
    from herl_core.io import sweep_stale_temps

    dead = _dead_pid()
    leftover = tmp_path / f"..step-000003.{dead}.ab.tmp.{dead}.cd.tmp"
    leftover.mkdir()
    (leftover / "model.safetensors").write_bytes(b"half")
    (tmp_path / ".keep.lock").write_text("")
    with atomic_dir(tmp_path / "step-000004") as tmp, atomic_open(tmp_path / "state.json") as fh:
        fh.write("{}")
        (ours,) = tmp_path.glob(f".state.json.{os.getpid()}.*.tmp")
        assert sweep_stale_temps(tmp_path) == [leftover]  # the dead writer's, not ours in flight
        assert tmp.is_dir() and ours.is_file()
        (tmp / "w").write_text("w")
    assert sorted(os.listdir(tmp_path)) == [".keep.lock", "state.json", "step-000004"]
    assert sweep_stale_temps(tmp_path) == []


def test_a_write_removes_the_leftover_of_a_dead_writer_with_this_process_s_pid(tmp_path):
    # a killed container restarts its process with the same pid: the old temp must not look like a live write
    p = tmp_path / "out.json"
    leftover = tmp_path / f".out.json.{os.getpid()}.abc123.tmp"
    leftover.write_text('{"half": ')
    with atomic_open(p) as fh:
        fh.write("{}")
    assert os.listdir(tmp_path) == ["out.json"]
