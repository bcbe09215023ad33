"""Data-parallel training (issue 7, herl_core/distributed.py): the share arithmetic by hand, and the real thing —
``herl train`` under ``accelerate launch --config_file configs/accelerate/ddp.yaml`` (2 processes; on CPU with
ACCELERATE_USE_CPU=true accelerate picks gloo) against one process on the same global batch: same per-step metrics,
same final weights.

Run: .venv/bin/pytest tests/herl_core/test_distributed.py
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from herl_core.config import load_params
from herl_core.distributed import DataParallel, interleave, share_indices
from herl_core.records import PromptRecord, Rubric
from herl_core.stages import run_train

ROOT = Path(__file__).resolve().parents[2]

PROMPTS = [
    PromptRecord(id=f"p{i}", prompt=p, rubrics=[Rubric(id=c)])
    for i, (p, c) in enumerate(
        [
            ("Write a note about cats.", "change_case:english_lowercase"),
            ("Describe the sea.", "punctuation:no_comma"),
            ("Tell me about trees.", "change_case:english_capital"),
            ("Explain rain.", "punctuation:no_comma"),
        ]
    )
]
# 4 prompts per step in 2 mini-batches of 2 (so π_old comes from a no-grad pass and each step makes 2 updates);
# micro-batches of 3 sequences: ranks hold 4-5 sequences per mini-batch, so they run unequal micro-batch splits
OVERRIDES = [
    "train.steps=2", "train.prompts_per_step=4", "train.mini_batch_prompts=2", "train.micro_batch_size=3",
    "train.lr=1e-3", "rollout.n=4", "rollout.max_new_tokens=8", "herl.rewrite_max_new_tokens=8",
    "tracking.log_model=false",
]  # fmt: skip


def test_share_indices_and_interleave_by_hand():
    # 8 prompts, mini-batches of 4, 2 ranks: rank 0 owns [0,1] of mb 0 and [4,5] of mb 1; rank 1 owns [2,3], [6,7]
    assert share_indices(8, 4, 0, 2) == [0, 1, 4, 5]
    assert share_indices(8, 4, 1, 2) == [2, 3, 6, 7]
    assert share_indices(4, 4, 3, 4) == [3]
    assert interleave([["a0", "a1", "a4", "a5"], ["a2", "a3", "a6", "a7"]], 4) == [f"a{i}" for i in range(8)]
    with pytest.raises(ValueError, match=r"mini_batch_prompts \(3\) divisible by 2"):
        share_indices(6, 3, 0, 2)
    with pytest.raises(ValueError, match=r"prompts_per_step \(6\) divisible"):
        share_indices(6, 4, 0, 2)


def test_single_process_is_the_identity():
    dp = DataParallel.single()
    model = torch.nn.Linear(2, 2)
    assert (dp.rank, dp.world, dp.is_main) == (0, 1, True) and dp.wrap(model) is model
    assert dp.gather([1, 2]) == [[1, 2]] and dp.sum({"a": 1.5}) == {"a": 1.5}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def steps_of(report_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (report_dir / "steps.jsonl").read_text().splitlines()]


def policy_weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(next(folder.glob("*.safetensors"))))


@pytest.mark.slow
def test_two_ranks_match_one_process(tmp_path):
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    (tmp_path / "train.jsonl").write_text("".join(p.model_dump_json() + "\n" for p in PROMPTS))

    def run_dir(name: str) -> list[str]:
        return [
            f"train.data={tmp_path / 'train.jsonl'}", f"train.out_dir={tmp_path / name / 'policy'}",
            f"train.checkpoint_dir={tmp_path / name / 'ckpt'}", f"train.report_dir={tmp_path / name / 'reports'}",
        ]  # fmt: skip

    # one process, in this interpreter
    cfg = load_params(tmp_path / "params.yaml", profile="tiny", overrides=OVERRIDES + run_dir("one"))
    run_train(cfg, trainer_kwargs={"dp": DataParallel.single()})

    # two processes: the unchanged train command under accelerate launch with the shipped config (gloo on CPU)
    sets = [arg for kv in OVERRIDES + run_dir("two") for arg in ("--set", kv)]
    env = {
        **os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT),
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}", "PREFECT_HOME": str(tmp_path / "prefect"),
    }  # fmt: skip
    cmd = [
        str(Path(sys.executable).parent / "accelerate"), "launch", "--config_file",
        str(ROOT / "configs" / "accelerate" / "ddp.yaml"), "--num_processes", "2", "--main_process_port",
        str(free_port()), "-m", "flows.cli", "train", "--params", "params.yaml", "--profile", "tiny", *sets,
    ]  # fmt: skip
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    one, two = steps_of(tmp_path / "one" / "reports"), steps_of(tmp_path / "two" / "reports")
    assert [s["step"] for s in two] == [0, 1]  # rank 0 alone wrote the report: no duplicated lines
    keys = [
        "reward/mean", "reward/frac_zero_std", "herl/drafts", "herl/rewrites", "herl/rewrite_success_rate",
        "herl/guided_merged", "actor/loss", "actor/pg_loss", "actor/grad_norm", "actor/clipfrac", "actor/updates",
    ]  # fmt: skip
    for a, b in zip(one, two, strict=True):
        for k in keys:
            assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-6), k
    assert one[0]["actor/updates"] == 2.0 and one[1]["herl/drafts"] >= 1  # the run exercised what it claims to
    # the global batch was logged once, group-major, as in one process
    rows_one = (tmp_path / "one" / "reports" / "rollouts.jsonl").read_text().splitlines()
    rows_two = (tmp_path / "two" / "reports" / "rollouts.jsonl").read_text().splitlines()
    assert [json.loads(r)["response"] for r in rows_two] == [json.loads(r)["response"] for r in rows_one]
    w1, w2 = policy_weights(tmp_path / "one" / "policy"), policy_weights(tmp_path / "two" / "policy")
    assert w1.keys() == w2.keys()
    for name in w1:
        torch.testing.assert_close(w2[name], w1[name], atol=2e-5, rtol=1e-4, msg=name)
    # only rank 0 tracked: one MLflow train run
    import mlflow

    runs = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").search_runs(
        [e.experiment_id for e in mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").search_experiments()]
    )
    assert [r.data.tags.get("herl.stage", r.info.run_name) for r in runs].count("train") == 1
