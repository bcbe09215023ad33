"""flows/proc.py, the one lock, environment and subprocess runner of the pipeline and the study."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from flows.proc import child_env, exclusive_lock, stream
from flows.tracking import FLOW_RUN_ENV, PARENT_ENV, RUN_ENV


class Busy(RuntimeError):
    pass


def hold_in_another_process(path: Path) -> subprocess.Popen:
    """A child process that takes the lock, says so on stdout, and holds it until its stdin closes."""
    code = textwrap.dedent(
        f"""
        import sys
        from flows.proc import exclusive_lock
        with exclusive_lock({str(path)!r}, RuntimeError):
            print("held", flush=True)
            sys.stdin.read()
        """
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=os.environ.copy()
    )
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_lock_refuses_a_second_process_naming_the_holder_and_is_reentrant_within_one(tmp_path):
    path = tmp_path / "sub" / "x.lock"
    holder = hold_in_another_process(path)
    try:
        with pytest.raises(Busy, match=rf"^pid {holder.pid}, started \d{{4}}-\d\d-\d\dT"):
            with exclusive_lock(path, Busy):
                pass
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    with exclusive_lock(path, Busy):
        assert path.read_text().startswith(f"pid {os.getpid()},")
        with exclusive_lock(path, Busy):  # the CLI locks, then the flow it runs locks again
            pass
        assert path.read_text().startswith(f"pid {os.getpid()},")  # the inner exit did not release it
    assert path.read_text() == ""  # released: the holder line is cleared


def test_the_study_and_the_pipeline_use_that_lock(tmp_path):
    from flows.pipeline import LOCK_FILE, WorkspaceBusy, workspace_lock
    from flows.study import StudyError, study_lock

    holder = hold_in_another_process(tmp_path / LOCK_FILE)
    other = hold_in_another_process(tmp_path / "runs" / ".study.lock")
    try:
        with pytest.raises(WorkspaceBusy, match=rf"\(pid {holder.pid}, started .*\); wait for it"):
            with workspace_lock(tmp_path):
                pass
        with pytest.raises(StudyError, match=rf"another study is running in .*runs \(pid {other.pid}, started"):
            with study_lock(tmp_path / "runs"):
                pass
    finally:
        for proc in (holder, other):
            proc.stdin.close()
            proc.wait(timeout=30)


def test_child_env(monkeypatch):
    monkeypatch.setenv(RUN_ENV, "mine")
    monkeypatch.setenv(PARENT_ENV, "inherited")
    env = child_env("parent", "sqlite:////tmp/x.db", flow_run_id="flow")
    assert RUN_ENV not in env  # a child opens its own run
    assert (env[PARENT_ENV], env[FLOW_RUN_ENV], env["MLFLOW_TRACKING_URI"]) == ("parent", "flow", "sqlite:////tmp/x.db")
    assert env["PATH"].split(os.pathsep)[0] == str(Path(sys.executable).parent)
    kept = child_env()
    assert kept[PARENT_ENV] == "inherited" and FLOW_RUN_ENV not in kept and RUN_ENV not in kept


def test_stream_hands_over_every_line_and_returns_the_code_and_the_tail(tmp_path):
    seen: list[str] = []
    code, tail = stream(
        ["sh", "-c", "for i in 1 2 3 4 5; do echo line $i; done; echo oops >&2; exit 3"],
        tmp_path,
        {"PATH": "/usr/bin:/bin"},
        seen.append,
        tail=2,
    )
    assert code == 3
    assert seen == [f"line {i}\n" for i in range(1, 6)] + ["oops\n"]  # stderr merged into the same stream
    assert tail == "line 5\noops\n"
