"""dvc.yaml for real in a temp git repo: ``dvc repro`` twice, probe and inactive-profile edits that must rerun no
training, and ``dvc exp run -S hindsight.bonus_alpha=0.1``.

Run: .venv/bin/pytest tests/integration/test_dvc.py -m integration
The repo holds the project's dvc.yaml, params.yaml (with ``profile: tiny``) and a copy of herl_core (the stages'
code deps; the commands themselves run the installed ``herl``). MLflow writes to a temp sqlite file. A few minutes
on 2 busy cores: five stage processes per run, about 10-40 s each.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
STAGES = ["prepare", "rollout", "hindsight", "train", "evaluate"]

pytestmark = pytest.mark.integration


def sh(repo: Path, *args: str) -> str:
    done = subprocess.run(args, cwd=repo, capture_output=True, text=True, env=os.environ.copy())
    assert done.returncode == 0, f"{' '.join(args)} → {done.returncode}\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    return done.stdout + done.stderr


def ran(log: str) -> list[str]:
    return re.findall(r"Running stage '(\w+)'", log)


def skipped(log: str) -> list[str]:
    return re.findall(r"Stage '(\w+)' didn't change, skipping", log)


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    repo = tmp_path_factory.mktemp("dvcrepo")
    shutil.copy(ROOT / "dvc.yaml", repo / "dvc.yaml")
    params = (ROOT / "params.yaml").read_text()
    params, n = re.subn(r"(?m)^profile: \w+$", "profile: tiny", params)
    assert n == 1, "params.yaml must have one top-level `profile:` line"
    (repo / "params.yaml").write_text(params)
    shutil.copytree(ROOT / "herl_core", repo / "herl_core", ignore=shutil.ignore_patterns("__pycache__"))
    (repo / ".gitignore").write_text("/runs/\n/.herl/\n/mlartifacts/\n")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PATH", f"{ROOT / '.venv' / 'bin'}{os.pathsep}{os.environ['PATH']}")
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}")
        mp.setenv("DVC_NO_ANALYTICS", "1")
        sh(repo, "git", "init", "-q")
        sh(repo, "git", "config", "user.email", "test@example.com")
        sh(repo, "git", "config", "user.name", "test")
        sh(repo, "dvc", "init", "-q")
        sh(repo, "dvc", "config", "core.site_cache_dir", str(tmp_path_factory.mktemp("dvc-site")))
        sh(repo, "git", "add", "-A")
        sh(repo, "git", "commit", "-q", "-m", "pipeline")
        yield repo


def edit(repo: Path, old: str, new: str) -> None:
    """Replace the one line ``old`` of params.yaml (comments and layout kept, as a user's edit would)."""
    path = repo / "params.yaml"
    text = path.read_text()
    assert text.count(old + "\n") == 1, old
    path.write_text(text.replace(old + "\n", new + "\n"))


def test_repro_skips_what_did_not_change_and_probe_knobs_never_rerun_train(repo):
    first = sh(repo, "dvc", "repro")
    assert ran(first) == STAGES
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    assert sorted(lock["stages"]) == sorted(STAGES)
    train_params = lock["stages"]["train"]["params"]["params.yaml"]
    assert train_params["hindsight"]["bonus_alpha"] == 0.05
    assert train_params["profiles.tiny.train"]["steps"] == 2  # the active profile's section, resolved
    assert "probe" not in train_params and "profiles.tiny.probe" not in train_params
    assert (repo / "models/policy/model.safetensors").is_file()
    assert (repo / "reports/evaluate/metrics.json").is_file()

    second = sh(repo, "dvc", "repro")
    assert ran(second) == [] and skipped(second) == STAGES
    assert "Data and pipelines are up to date." in second

    # a profile that is not active: nothing reads it
    edit(repo, "      steps: 50", "      steps: 60")  # profiles.gpu.train.steps
    inactive = sh(repo, "dvc", "repro")
    assert ran(inactive) == [] and skipped(inactive) == STAGES

    # a probe-only knob, in the base section and in the active profile: train stays a no-op...
    edit(repo, "  prompts: 16", "  prompts: 3")  # probe.prompts
    edit(repo, "      prompts: 4", "      prompts: 3")  # profiles.tiny.probe.prompts
    train = sh(repo, "dvc", "repro", "train")
    assert ran(train) == [] and skipped(train) == ["prepare", "train"]
    # ...and the probe stages, which read it, rerun (nothing downstream of them does)
    probe = sh(repo, "dvc", "repro")
    assert ran(probe) == ["rollout", "hindsight"] and skipped(probe) == ["prepare", "train", "evaluate"]
    assert len((repo / "data/rollout/rollouts.jsonl").read_text().splitlines()) == 3 * 4  # 3 prompts × G = 4

    sh(repo, "git", "add", "-A")
    sh(repo, "git", "commit", "-q", "-m", "first run")
    exp = sh(repo, "dvc", "exp", "run", "-S", "hindsight.bonus_alpha=0.1")
    # hindsight and train read the `hindsight` section, evaluate reads it and the new policy; prepare and rollout do not
    assert ran(exp) == ["hindsight", "train", "evaluate"]
    assert skipped(exp) == ["prepare", "rollout"]
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    assert lock["stages"]["train"]["params"]["params.yaml"]["hindsight"]["bonus_alpha"] == 0.1
    # train started over (new settings), it did not resume the finished run: its step log begins at step 0 again
    assert "step    1" in exp
