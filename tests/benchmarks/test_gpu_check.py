"""The first-GPU check (benchmarks/gpu_check.py) run end to end on the CPU, as the GPU machine would run it with
``--device cpu``: every check prints PASS, and a missing dependency is one FAIL line naming what to do."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CHECKS = ["deps", "device", "trainer", "placement", "autocast", "update", "steps", "resume", "policy", "evaluate",
          "tokens/s"]  # fmt: skip


def test_gpu_check_on_cpu_passes_every_check():
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(["bash", "scripts/gpu_check.sh", "--device", "cpu", "--threads", "1"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    lines = done.stdout.splitlines()
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    assert [line.split(":")[0] for line in lines] == [f"PASS {c}" for c in CHECKS] + ["PASS gpu_check"], lines
    assert "20/20 tensors" in next(line for line in lines if line.startswith("PASS update"))
    assert "torch.bfloat16" in next(line for line in lines if line.startswith("PASS autocast"))


def test_bootstrap_names_what_is_missing_and_how_to_bring_it(tmp_path, monkeypatch):
    import importlib.util

    from benchmarks import gpu_check

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "pydantic" else real(name, *a))
    ok, detail = gpu_check.bootstrap(tmp_path)  # an empty bundle: nothing to unpack
    assert not ok and detail.startswith("missing pydantic") and "scripts/gpu_check.sh --prepare" in detail


def test_wheel_choice_follows_this_interpreter():
    import sys

    from benchmarks.gpu_check import _wheel_fits

    tag = f"cp{sys.version_info.major}{sys.version_info.minor}"
    assert _wheel_fits("pydantic-2.14.3-py3-none-any.whl")
    assert _wheel_fits(f"pydantic_core-2.50.4-{tag}-{tag}-manylinux_2_17_x86_64.manylinux2014_x86_64.whl")
    assert not _wheel_fits("pydantic_core-2.50.4-cp39-cp39-manylinux_2_17_x86_64.manylinux2014_x86_64.whl")
