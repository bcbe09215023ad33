"""Every stage with ``rollout.engine.backend=vllm`` on SmolLM2 (small sizes), against the same stage with the HF engine.

Run (vLLM environment): .venv-vllm/bin/pytest -m vllm tests/vllm/test_stages.py

* ``herl train --set rollout.engine.backend=vllm``: the real command in a subprocess (vLLM spawns its processes from
  it), 3 HeRL steps; it must end with the HF backend's metrics schema (steps.jsonl keys, summary.json keys) and a policy
  folder that loads and differs from the starting weights. The HF reference is the same command with backend=hf on
  the tiny model (the schema does not depend on the model; SmolLM2 would add minutes of HF updates). One key is
  the HF engine's alone: ``rollout/min_draw_margin``, logged only by an engine that reports draw margins
  (``Generation.margins``), which vLLM's sampler does not expose.
* rollout, hindsight, evaluate: the stage functions in this process with the session's engine (one engine start for
  the folder; ``make_engine`` hands it the stage's policy through ``sync_weights``); their files must validate
  against the record models and carry the HF run's keys.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
SMALL = [
    "model.name_or_path=smollm2-135m-instruct",
    "train.steps=3",
    "train.prompts_per_step=2",
    "train.mini_batch_prompts=2",
    "rollout.n=2",
    "rollout.max_new_tokens=8",
    "hindsight.rewrite_max_new_tokens=8",
    "tracking.log_model=false",
]


def herl(root: Path, *args: str, env: dict) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "flows.cli", *args]
    done = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, f"{' '.join(args)}\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    return done


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """A workspace with the tiny profile's prepared prompts; (root, env, sets) for the commands."""
    root = tmp_path_factory.mktemp("ws")
    shutil.copy(ROOT / "params.yaml", root / "params.yaml")
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}", "PYTHONPATH": str(ROOT)}
    herl(root, "prepare", "--profile", "tiny", env=env)
    return root, env


def keys_of(path: Path) -> list[set[str]]:
    return [set(json.loads(line)) for line in path.read_text().splitlines()]


def test_herl_train_with_vllm_matches_the_hf_schema_and_saves_a_loadable_policy(ws):
    from herl_core.config import ModelConfig
    from herl_core.models import load_policy

    root, env = ws
    runs = {}
    for backend, model in (("vllm", "smollm2-135m-instruct"), ("hf", "tiny")):
        out = f"runs/{backend}"
        sets = [*SMALL, f"model.name_or_path={model}", f"rollout.engine.backend={backend}",
                f"train.out_dir={out}/policy", f"train.report_dir={out}/report",
                f"train.checkpoint_dir={out}/ckpt"]  # fmt: skip
        herl(root, "train", "--profile", "tiny", *[a for s in sets for a in ("--set", s)], env=env)
        runs[backend] = root / out
    steps = {b: keys_of(r / "report/steps.jsonl") for b, r in runs.items()}
    assert len(steps["vllm"]) == len(steps["hf"]) == 3
    hf_only = {"rollout/min_draw_margin"}
    assert all(hf_only <= keys for keys in steps["hf"])
    assert steps["vllm"] == [keys - hf_only for keys in steps["hf"]]  # the same metrics, step by step
    summary = {b: json.loads((r / "report/summary.json").read_text()) for b, r in runs.items()}
    assert set(summary["vllm"]) == set(summary["hf"]) and summary["vllm"]["steps"] == 3.0
    for name in ("rollouts.jsonl", "experiences.jsonl"):
        assert keys_of(runs["vllm"] / "report" / name)[0] == keys_of(runs["hf"] / "report" / name)[0], name
    trained, _ = load_policy(ModelConfig(name_or_path=str(runs["vllm"] / "policy"), device="cpu"))
    start, _ = load_policy(ModelConfig(name_or_path="smollm2-135m-instruct", device="cpu"))
    moved = [not torch.equal(a, b) for a, b in zip(trained.parameters(), start.parameters(), strict=True)]
    assert any(moved)  # the saved policy is the trained one, not the start


def test_rollout_hindsight_evaluate_write_the_hf_engine_records(ws, smollm2, engine, monkeypatch):
    import herl_core.rollout as rollout_pkg
    from herl_core.config import load_params
    from herl_core.io import read_jsonl
    from herl_core.records import HindsightRecord, MergeRecord, RolloutRecord
    from herl_core.stages import run_evaluate, run_hindsight, run_rollout

    root, _ = ws
    monkeypatch.chdir(root)
    base, _ = smollm2
    make_hf = rollout_pkg.make_engine
    outputs = {}
    for backend in ("vllm", "hf"):
        out = f"stages/{backend}"
        cfg = load_params(root / "params.yaml", profile="tiny", overrides=[
            *SMALL, f"rollout.engine.backend={backend}", f"probe.rollout_dir={out}/rollout",
            f"probe.hindsight_dir={out}/hindsight", f"evaluate.out_dir={out}/evaluate", "probe.prompts=2",
            "evaluate.limit=2", "evaluate.max_new_tokens=12", "evaluate.self_improve_rounds=1"])  # fmt: skip

        def shared_engine(rcfg, model, tok, seed=0):
            if rcfg.backend != "vllm":
                return make_hf(rcfg, model, tok, seed=seed)
            engine.model = model  # the stage's freshly loaded policy, loaded into the running engine in place
            engine.sync_weights()
            return engine

        monkeypatch.setattr(rollout_pkg, "make_engine", shared_engine)
        try:
            outputs[backend] = (run_rollout(cfg), run_hindsight(cfg), run_evaluate(cfg))
        finally:
            engine.model = base
            engine.sync_weights()
        folder = root / out
        rows = read_jsonl(folder / "rollout/rollouts.jsonl", RolloutRecord)
        assert len(rows) == 2 * 2 and all(1 <= r.n_tokens <= 8 and (r.finished or r.n_tokens == 8) for r in rows)
        read_jsonl(folder / "hindsight/experiences.jsonl", HindsightRecord)
        read_jsonl(folder / "hindsight/merges.jsonl", MergeRecord)
    for stage, (ours, ref) in enumerate(zip(outputs["vllm"], outputs["hf"], strict=True)):
        assert set(ours) == set(ref), stage
    for name in ("rollout/rollouts.jsonl", "hindsight/merges.jsonl", "evaluate/ifeval/samples.jsonl"):
        assert keys_of(root / "stages/vllm" / name)[0] == keys_of(root / "stages/hf" / name)[0], name
