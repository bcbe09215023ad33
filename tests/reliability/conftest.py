"""Shared helpers of the reliability tests: a tiny-model workspace and the ``herl`` command as a process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

PROMPTS = [
    {"id": "p0", "prompt": "Write a note about cats.", "rubrics": [{"id": "change_case:english_lowercase"}]},
    {"id": "p1", "prompt": "Describe the sea.", "rubrics": [{"id": "punctuation:no_comma"}]},
    {
        "id": "p2",
        "prompt": "Tell me about trees.",
        "rubrics": [{"id": "keywords:existence", "kwargs": {"keywords": ["blue"]}}],
    },
    {"id": "p3", "prompt": "Explain rain.", "rubrics": [{"id": "change_case:english_capital"}]},
]

PARAMS = """\
profile: tiny
model:
  name_or_path: tiny
rollout:
  n: 4
  max_new_tokens: 8
  engine:
    generation_batch_size: 16
hindsight:
  rewrite_max_new_tokens: 8
train:
  steps: 3
  prompts_per_step: 2
  mini_batch_prompts: 1
  micro_batch_size: 4
  lr: 1.0e-3
  save_every: 1
  threads: 1
  data: data/prompts.jsonl
  out_dir: models/policy
  checkpoint_dir: runs/train/checkpoints
  report_dir: reports/train
profiles:
  tiny: {}
"""
"""A tiny run: 3 steps of 2 prompts × G=4, 8-token answers, a checkpoint after every step (about 1 s a step)."""


def write_prompts(path: Path, rows: list[dict] = PROMPTS) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def make_workspace(root: Path, params: str = PARAMS, prompts: list[dict] = PROMPTS) -> Path:
    """``root/params.yaml`` and ``root/data/prompts.jsonl``; every path in the params is relative to ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "params.yaml").write_text(params, encoding="utf-8")
    write_prompts(root / "data" / "prompts.jsonl", prompts)
    return root


def herl_command(*args: str) -> list[str]:
    """The installed ``herl`` script of this interpreter's environment, else ``python -c`` on flows.cli."""
    script = Path(sys.executable).with_name("herl")
    if script.is_file():
        return [str(script), *args]
    return [sys.executable, "-c", "from flows.cli import app; app()", *args]


def herl_env(ws: Path) -> dict[str, str]:
    """The test environment (offline, see tests/conftest.py) with MLflow pointed into the workspace."""
    return {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{ws / 'mlruns.db'}", "PYTHONUNBUFFERED": "1"}


def start_herl(ws: Path, *args: str) -> subprocess.Popen:
    log = open(ws / f"herl-{len(list(ws.glob('herl-*.log')))}.log", "wb")  # noqa: SIM115 (closed with the process)
    return subprocess.Popen(herl_command(*args), cwd=ws, env=herl_env(ws), stdout=log, stderr=subprocess.STDOUT)


def run_herl(ws: Path, *args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run(
        herl_command(*args), cwd=ws, env=herl_env(ws), capture_output=True, text=True, timeout=timeout
    )


class Herl:
    """What the tests use (a fixture, since tests are imported with --import-mode=importlib)."""

    prompts = PROMPTS
    params = PARAMS
    make_workspace = staticmethod(make_workspace)
    write_prompts = staticmethod(write_prompts)
    start = staticmethod(start_herl)
    run = staticmethod(run_herl)
    env = staticmethod(herl_env)


@pytest.fixture
def herl() -> type[Herl]:
    return Herl


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    return make_workspace(tmp_path / "ws")
