"""Every artifact appears whole or not at all, even when the writer is killed with SIGKILL.

A child process starts writing through one of herl_core.io's writers, signals that it is midway (a marker file)
and is killed. The target must then hold its previous content (or not exist), the partial data must sit only in a
``.<name>.<pid>.*.tmp`` dot-file that no ``*.jsonl`` / ``*.json`` glob takes for an output, and the next
successful write of the same target removes that leftover (but never a live writer's temp file).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from herl_core.io import read_jsonl, remove_stale_temps, write_json_atomic, write_jsonl_atomic
from herl_core.records import PromptRecord

pytestmark = pytest.mark.integration

ROW = {"id": "p{i}", "prompt": "Say hi {i} times.", "rubrics": [{"id": "punctuation:no_comma"}]}

CHILD = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from herl_core import io

    kind, target, marker = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])

    def midway():
        marker.write_text("midway")
        time.sleep(60)

    def rows():  # 20,000 rows (about 1.6 MB), then stall until killed
        for i in range(20_000):
            yield {"id": f"new{i}", "prompt": "x" * 40, "rubrics": [{"id": "punctuation:no_comma"}]}
        midway()

    if kind == "jsonl":
        io.write_jsonl_atomic(target, rows())
    elif kind == "json":
        with io.atomic_open(target) as fh:
            fh.write('{"half": ')
            fh.flush()
            midway()
    elif kind == "dir":
        with io.atomic_dir(target) as tmp:
            (tmp / "model.safetensors").write_bytes(b"half")
            midway()
    """
)


def _start_and_kill(kind: str, target: Path, tmp_path: Path) -> subprocess.Popen:
    """Run the child writer, SIGKILL it once it reports being midway; returns the dead process."""
    marker = tmp_path / f"{kind}.midway"
    proc = subprocess.Popen([sys.executable, "-c", CHILD, kind, str(target), str(marker)], stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while not marker.exists():
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.monotonic() < deadline, "the writer never got midway"
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    return proc


def _old_rows(n: int = 3) -> list[PromptRecord]:
    return [PromptRecord.model_validate(json.loads(json.dumps(ROW).replace("{i}", str(i)))) for i in range(n)]


def test_killed_jsonl_writer_leaves_the_old_file_and_a_dot_tmp(tmp_path):
    out = tmp_path / "data"
    target = out / "train.jsonl"
    old = _old_rows()
    write_jsonl_atomic(target, old)
    proc = _start_and_kill("jsonl", target, tmp_path)

    assert read_jsonl(target, PromptRecord) == old  # the previous file, whole
    leftovers = [p for p in out.iterdir() if p != target]
    assert [p.name for p in leftovers] == [p.name for p in out.glob(f".train.jsonl.{proc.pid}.*.tmp")]
    assert len(leftovers) == 1 and leftovers[0].stat().st_size > 100_000  # the partial data is only in the temp
    assert list(out.glob("*.jsonl")) == [target]  # a reader or DVC globbing *.jsonl never sees it

    new = _old_rows(5)
    write_jsonl_atomic(target, new)  # the next successful write cleans the dead writer's temp
    assert sorted(os.listdir(out)) == ["train.jsonl"]
    assert read_jsonl(target, PromptRecord) == new


def test_killed_first_write_leaves_no_target(tmp_path):
    target = tmp_path / "reports" / "summary.json"
    _start_and_kill("json", target, tmp_path)
    assert not target.exists()
    (leftover,) = (tmp_path / "reports").iterdir()
    assert leftover.name.startswith(".summary.json.") and leftover.name.endswith(".tmp")
    assert leftover.read_text() == '{"half": '
    assert list((tmp_path / "reports").glob("*.json")) == []
    write_json_atomic(target, {"steps": 2})
    assert os.listdir(tmp_path / "reports") == ["summary.json"]
    assert json.loads(target.read_text()) == {"steps": 2}


def test_killed_folder_writer_keeps_the_old_folder(tmp_path):
    from herl_core.io import atomic_dir

    target = tmp_path / "models" / "policy"
    with atomic_dir(target) as tmp:
        (tmp / "model.safetensors").write_bytes(b"whole")
    _start_and_kill("dir", target, tmp_path)
    assert os.listdir(target) == ["model.safetensors"] and (target / "model.safetensors").read_bytes() == b"whole"
    names = sorted(os.listdir(tmp_path / "models"))
    assert len(names) == 2 and names[0].startswith(".policy.") and names[0].endswith(".tmp") and names[1] == "policy"
    with atomic_dir(target) as tmp:
        (tmp / "model.safetensors").write_bytes(b"new")
    assert os.listdir(tmp_path / "models") == ["policy"]


def test_a_live_writers_temp_is_never_removed(tmp_path):
    target = tmp_path / "out.jsonl"
    marker = tmp_path / "jsonl.midway"
    proc = subprocess.Popen([sys.executable, "-c", CHILD, "jsonl", str(target), str(marker)])
    try:
        while not marker.exists():
            assert proc.poll() is None
            time.sleep(0.02)
        write_jsonl_atomic(target, _old_rows(1))  # a concurrent successful write: the live temp must survive
        assert len(list(tmp_path.glob(f".out.jsonl.{proc.pid}.*.tmp"))) == 1
        assert remove_stale_temps(target) == []
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    (stale,) = tmp_path.glob(f".out.jsonl.{proc.pid}.*.tmp")
    assert remove_stale_temps(target) == [stale] and not stale.exists()
