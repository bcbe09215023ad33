"""A real ``herl train`` process killed with SIGKILL mid-step resumes to the same result.

The killed run is stopped after step 2's rollouts were logged and before its metrics were (the middle of a step:
hindsight and the update are still running). ``herl train`` again (resume is the default) must then reproduce the
uninterrupted run exactly: the same per-step metrics (timings aside), the same rollouts, experiences and merges, no
step logged twice, bit-identical final weights, and one MLflow run (the killed one, re-attached) holding each step
once. A second process is killed while writing a checkpoint: the
previous checkpoint stays the latest and the half-written folder is never counted.
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
import torch
from safetensors.torch import load_file

from herl_core.checkpoint import latest_checkpoint, list_checkpoints

pytestmark = pytest.mark.integration

REPORTS = ("steps", "rollouts", "experiences", "merges", "val_outcomes")


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _steps_of(path: Path) -> list[int]:
    """``step`` of every complete line (a line cut by the kill is not counted)."""
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line)["step"])
        except (json.JSONDecodeError, KeyError):
            pass
    return out


def _without_timings(row: dict) -> dict:
    return {k: v for k, v in row.items() if not k.startswith("perf/")}


def _kill_mid_step(proc: subprocess.Popen, ws: Path, step: int, timeout: float = 150) -> None:
    """SIGKILL ``proc`` as soon as step ``step``'s rollouts are logged (its metrics are not yet)."""
    reports = ws / "reports" / "train"
    deadline = time.monotonic() + timeout
    while step not in _steps_of(reports / "rollouts.jsonl"):
        if proc.poll() is not None:
            pytest.fail(f"herl train exited ({proc.returncode}) before step {step}: {ws}/herl-*.log")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"step {step} not reached in {timeout} s")
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


VAL_PROMPTS = [
    {"id": "v0", "prompt": "Write about snow.", "rubrics": [{"id": "change_case:english_lowercase"}]},
    {"id": "v1", "prompt": "Name a bird.", "rubrics": [{"id": "punctuation:no_comma"}]},
]
VALIDATION = "  eval_every: 2\n  eval_set: data/val.jsonl\n  eval_samples: 2\n"
"""Validation on: steps 0 and 2 (every 2 steps; 2 is also the last) score the policy on ``VAL_PROMPTS``."""


def _workspace_with_validation(herl, root: Path) -> Path:
    ws = herl.make_workspace(root, params=herl.params.replace("  save_every: 1\n", "  save_every: 1\n" + VALIDATION))
    herl.write_prompts(ws / "data" / "val.jsonl", VAL_PROMPTS)
    return ws


def test_sigkill_mid_step_then_resume_equals_an_uninterrupted_run(tmp_path, herl):
    """With validation on: step 2 validates before its rollouts, so the kill also drops a validation point, which
    the resumed run computes again, once."""
    full = _workspace_with_validation(herl, tmp_path / "full")
    crash = _workspace_with_validation(herl, tmp_path / "crash")
    full_proc = herl.start(full, "train", "--params", "params.yaml")  # both run at once (one torch thread each)
    crash_proc = herl.start(crash, "train", "--params", "params.yaml")
    _kill_mid_step(crash_proc, crash, step=2)
    assert crash_proc.returncode == -signal.SIGKILL

    # the state the kill left: checkpoints after steps 1 and 2 (keep=1 → only step-000002), step 2 half done
    # (steps are 0-based in the logs; checkpoint step-00000k holds the state after k steps)
    reports = crash / "reports" / "train"
    assert latest_checkpoint(crash / "runs/train/checkpoints").name == "step-000002"
    assert _steps_of(reports / "steps.jsonl") == [0, 1], "the kill was meant to land before step 2's metrics"
    assert 2 in _steps_of(reports / "rollouts.jsonl")  # half a step of records that the resume must drop
    assert not (crash / "models").exists()  # the final policy is written only at the end
    before = _rows(reports / "steps.jsonl")

    resumed = herl.run(crash, "train", "--params", "params.yaml")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert full_proc.wait(timeout=180) == 0, (full / "herl-0.log").read_text()[-3000:]

    # per-step metrics: 3 steps, none twice, equal line by line (timings aside)
    a, b = _rows(full / "reports/train/steps.jsonl"), _rows(reports / "steps.jsonl")
    assert [r["step"] for r in b] == [0, 1, 2]
    # it really resumed: steps 0-1 were kept from the killed run (their wall-clock timings are the killed run's),
    # not recomputed by a fresh start (run_train starts fresh when herl_core's code or the settings changed)
    assert b[:2] == before, "the second run started from scratch instead of resuming"
    assert [_without_timings(r) for r in b] == [_without_timings(r) for r in a]
    assert [r["step"] for r in b if "val/reward_mean" in r] == [0, 2]  # each validation point once
    assert a[2]["actor/updates"] == 2  # step 2 really trained (2 prompts, 1 per mini-batch): not a vacuous match
    # the records of every step (samples, rewards, hindsight rewrites, merges) are the same, each once
    for name in REPORTS[1:]:
        assert _rows(reports / f"{name}.jsonl") == _rows(full / f"reports/train/{name}.jsonl"), name
    # final weights are bit-identical
    wa = load_file(str(full / "models/policy/model.safetensors"))
    wb = load_file(str(crash / "models/policy/model.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    summary = json.loads((reports / "summary.json").read_text())
    assert summary["steps"] == 3.0
    assert latest_checkpoint(crash / "runs/train/checkpoints").name == "step-000003"
    assert _temps(crash) == []  # no temp file or folder of the killed process is left
    _assert_one_mlflow_run_with_each_step_once(crash, full)


def _assert_one_mlflow_run_with_each_step_once(crash: Path, full: Path) -> None:
    """The resume re-attached to the killed run: one train run, FINISHED, every step's metrics and every validation
    point logged once."""
    from mlflow import MlflowClient

    def runs(ws: Path):
        client = MlflowClient(tracking_uri=f"sqlite:///{ws / 'mlruns.db'}")
        exps = [e.experiment_id for e in client.search_experiments()]
        return client, client.search_runs(exps, "attributes.run_name = 'train'")

    client, (run,) = runs(crash)
    assert run.info.status == "FINISHED" and run.data.tags.get("herl.resumed_at_step") == "2"
    full_client, (full_run,) = runs(full)
    # validation points 0 and 2, and the trained policy's final validation at step 3 (train.steps)
    for key, steps in (
        ("reward/mean", [0, 1, 2]),
        ("val/reward_mean", [0, 2, 3]),
        ("val/greedy/reward_mean", [0, 2, 3]),
    ):
        history = client.get_metric_history(run.info.run_id, key)
        want = full_client.get_metric_history(full_run.info.run_id, key)
        assert sorted((m.step, m.value) for m in history) == sorted((m.step, m.value) for m in want), key
        assert sorted(m.step for m in history) == steps, key


TINY_NET = textwrap.dedent(
    """
    import types
    import torch
    from safetensors.torch import save_file

    class TinyNet(torch.nn.Linear):  # what save_checkpoint needs of a model and a tokenizer, without transformers
        config = types.SimpleNamespace(tie_word_embeddings=False)

        def save_pretrained(self, folder):
            save_file(self.state_dict(), f"{folder}/model.safetensors")

    class Tok:
        def save_pretrained(self, folder):
            open(f"{folder}/tokenizer.json", "w").write("{}")

    def trained(seed):
        torch.manual_seed(seed)
        net = TinyNet(4, 3)
        opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
        net(torch.ones(2, 4)).sum().backward()
        opt.step()
        return net, opt
    """
)

KILL_DURING_SAVE = TINY_NET + textwrap.dedent(
    """
    import os, signal, sys
    import herl_core.checkpoint as ck

    root, where = sys.argv[1], sys.argv[2]
    net, opt = trained(0)
    ck.save_checkpoint(root, net, Tok(), opt, ck.TrainerState(step=1))

    def die_midway(folder_or_tensors, filename=None, *a, **k):  # half a file on disk, then kill -9
        path = filename if filename is not None else f"{folder_or_tensors}/model.safetensors"
        with open(path, "wb") as fh:
            fh.write(b"half")
        os.kill(os.getpid(), signal.SIGKILL)

    if where == "optimizer":  # the weights are on disk, the optimizer half written
        ck.save_file = die_midway
    else:  # the weights half written, inside the nested temp folder of save_checkpoint_weights
        TinyNet.save_pretrained = lambda self, folder: die_midway(folder)
    opt.step()
    ck.save_checkpoint(root, net, Tok(), opt, ck.TrainerState(step=2))
    """
)


@pytest.mark.parametrize("where", ["optimizer", "weights"])
def test_sigkill_during_checkpoint_save_keeps_the_previous_checkpoint(tmp_path, where):
    from herl_core.checkpoint import TrainerState, load_checkpoint, save_checkpoint

    root = tmp_path / "ckpt"
    proc = subprocess.run([sys.executable, "-c", KILL_DURING_SAVE, str(root), where], capture_output=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    # the half-written step 2 is in dot-folders the checkpoint listing ignores; step 1 is still the latest, whole
    leftovers = sorted(p.name for p in root.iterdir() if p.name != "step-000001")
    outer = [n for n in leftovers if n.startswith(".step-000002.") and n.endswith(".tmp")]
    assert len(outer) == 1, leftovers
    if where == "optimizer":
        assert leftovers == outer
        assert (root / outer[0] / "optimizer.safetensors").read_bytes() == b"half"  # it really died mid-save
    else:  # the weight write has its own temp folder beside the checkpoint's: ..step-000002.<pid>.<r>.tmp.<pid>.<r>.tmp
        (nested,) = (n for n in leftovers if n.startswith("." + outer[0] + "."))
        assert leftovers == sorted([outer[0], nested]) and nested.endswith(".tmp")
        assert (root / nested / "model.safetensors").read_bytes() == b"half"
    assert [p.name for p in list_checkpoints(root)] == ["step-000001"]
    assert json.loads((root / "step-000001/trainer_state.json").read_text())["trainer"]["step"] == 1

    # resuming loads step 1 whole: the same weights and AdamW moments as the killed process had after one step
    tiny: dict = {}
    exec(TINY_NET, tiny)  # noqa: S102 (the test's own model code, shared with the child process)
    want, want_opt = tiny["trained"](0)
    net, opt = tiny["trained"](1)  # different weights, to be overwritten
    state = load_checkpoint(latest_checkpoint(root), net, opt)
    assert state.step == 1
    assert torch.equal(net.weight, want.weight) and torch.equal(net.bias, want.bias)
    assert torch.equal(opt.state[net.weight]["exp_avg"], want_opt.state[want.weight]["exp_avg"])
    # the next successful save removes the dead process's leftovers, though they were for another step
    save_checkpoint(root, net, tiny["Tok"](), opt, TrainerState(step=3))
    assert sorted(p.name for p in root.iterdir()) == ["step-000003"]


def test_resume_sweeps_what_a_killed_save_left(tmp_path):
    """``sweep_leftovers`` (run by ``Trainer.resume``) removes a dead writer's temp folders of any step, nested ones
    included, and keeps complete checkpoints and the temp folder of a save still running."""
    from herl_core.checkpoint import sweep_leftovers

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    root = tmp_path / "ckpt"
    (root / "step-000001").mkdir(parents=True)
    (root / "step-000001" / "trainer_state.json").write_text("{}")
    outer = root / f".step-000002.{pid}.abcd1234.tmp"
    nested = root / f".{outer.name}.{pid}.efgh5678.tmp"
    old = root / f".step-000001.old-{pid}"
    for folder in (outer, nested, old):
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"half")
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        running = root / f".step-000002.{live.pid}.ijkl9012.tmp"  # another process is writing this one right now
        running.mkdir()
        assert sorted(sweep_leftovers(root)) == sorted([outer, nested, old])
        assert sorted(p.name for p in root.iterdir()) == sorted(["step-000001", running.name])
    finally:
        live.kill()
        live.wait()
    assert sweep_leftovers(root) == [running]  # its writer is gone now


KILL_IN_WEIGHT_WRITE = textwrap.dedent(
    """
    import os, signal, sys
    from transformers import PreTrainedModel

    real = PreTrainedModel.save_pretrained

    def save_pretrained(self, folder, *args, **kwargs):  # checkpoint 2's weights: half a file, then kill -9
        if ".step-000002." in str(folder):
            with open(os.path.join(folder, "model.safetensors"), "wb") as fh:
                fh.write(b"half")
            os.kill(os.getpid(), signal.SIGKILL)
        return real(self, folder, *args, **kwargs)

    PreTrainedModel.save_pretrained = save_pretrained
    from flows.cli import app

    app()
    """
)


def _temps(ws: Path) -> list[str]:
    from herl_core.io import TEMP_NAME

    return sorted(str(p.relative_to(ws)) for p in ws.rglob(".*") if TEMP_NAME.fullmatch(p.name))


def test_sigkill_during_a_checkpoint_save_then_resume_leaves_no_temp_folder(tmp_path, herl):
    ws = herl.make_workspace(tmp_path / "ws")
    killed = subprocess.run(
        [sys.executable, "-c", KILL_IN_WEIGHT_WRITE, "train", "--params", "params.yaml"],
        cwd=ws, env=herl.env(ws), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    root = ws / "runs/train/checkpoints"
    left = _temps(ws)
    assert len(left) == 2 and all(name.startswith("runs/train/checkpoints/.") for name in left), left
    assert any(name.startswith("runs/train/checkpoints/..step-000002.") for name in left)  # the nested weight temp
    assert latest_checkpoint(root).name == "step-000001"

    resumed = herl.run(ws, "train", "--params", "params.yaml")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert [r["step"] for r in _rows(ws / "reports/train/steps.jsonl")] == [0, 1, 2]
    assert latest_checkpoint(root).name == "step-000003"
    assert _temps(ws) == []  # nothing of the killed save is left anywhere in the workspace
    # step 1's metrics were computed before the kill, but its checkpoint (step-000002) was never written: the resume
    # recomputed step 1, and MLflow holds it once, with the values the resumed run computed (those of steps.jsonl)
    _assert_each_step_once_in_mlflow(ws, resumed_at=1)


def _assert_each_step_once_in_mlflow(ws: Path, resumed_at: int) -> None:
    """One train run (the killed one, re-attached at ``resumed_at``); every metric's history holds steps 0, 1, 2 once,
    with the values of reports/train/steps.jsonl (what the resumed run computed)."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{ws / 'mlruns.db'}")
    exps = [e.experiment_id for e in client.search_experiments()]
    (run,) = client.search_runs(exps, "attributes.run_name = 'train'")
    assert run.info.status == "FINISHED" and run.data.tags["herl.resumed_at_step"] == str(resumed_at)
    rows = _rows(ws / "reports/train/steps.jsonl")
    for key in ("reward/mean", "actor/loss", "perf/step_s", "herl/rewrites"):
        history = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))
        assert history == [(r["step"], r[key]) for r in rows], key


def test_repeated_nonfinite_updates_stop_the_stage_without_a_corrupted_checkpoint(tmp_path, herl, monkeypatch):
    """Non-finite updates at the stage level: NaN losses are skipped, counted and logged; the run then stops with a
    clear message, and nothing written holds a non-finite weight (no policy folder at all)."""
    import herl_core.train as train_mod
    from herl_core.config import load_params
    from herl_core.stages import run_train
    from herl_core.update import NonFiniteError

    real = train_mod.get_policy_loss

    def nan_loss(name):
        loss = real(name)
        return lambda *a, **k: (lambda out: (out[0] * float("nan"), out[1]))(loss(*a, **k))

    monkeypatch.setattr(train_mod, "get_policy_loss", nan_loss)
    ws = herl.make_workspace(tmp_path / "ws")
    monkeypatch.chdir(ws)
    cfg = load_params("params.yaml", overrides=["train.max_nonfinite_steps=3"])
    with pytest.raises(NonFiniteError, match="3 consecutive updates had a non-finite loss or gradient"):
        run_train(cfg)
    # 2 updates a step (2 prompts, 1 per mini-batch): step 0 skips both (counted, logged, checkpointed with the
    # untouched weights); the first update of step 1 is the 3rd in a row and stops the run
    (logged,) = _rows(ws / "reports/train/steps.jsonl")
    assert logged["step"] == 0 and logged["actor/nonfinite_skipped"] == 2.0 and logged["actor/updates"] == 0.0
    assert [p.name for p in list_checkpoints(ws / "runs/train/checkpoints")] == ["step-000001"]
    saved = load_file(str(ws / "runs/train/checkpoints/step-000001/model.safetensors"))
    from herl_core.models import build_tiny

    initial = build_tiny(cfg.model)[0].state_dict()
    assert all(torch.equal(saved[k], initial[k]) for k in saved)  # finite, and no NaN update slipped through
    assert not (ws / "models").exists()  # no policy from a run that stopped
