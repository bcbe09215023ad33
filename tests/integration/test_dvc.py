"""dvc.yaml for real in a temp git repo: ``dvc repro`` twice, probe and inactive-profile edits that must rerun no
training, ``dvc exp run -S hindsight.bonus_alpha=0.1``, ``dvc plots show`` and ``dvc metrics show``.

Run: .venv/bin/pytest tests/integration/test_dvc.py -m integration
The repo holds the project's dvc.yaml, params.yaml (with ``profile: tiny``), scripts/herl and a copy of herl_core
(the stages' code deps), and ``.venv`` as a link to this interpreter's environment, as a clone set up by
scripts/setup.sh has it. ``dvc`` runs as ``.venv/bin/dvc`` with no ``herl`` on PATH: the README's commands as written,
without an activated environment (the stage commands find ``.venv/bin/herl`` through scripts/herl). MLflow writes to
a temp sqlite file. A few minutes on 2 busy cores: five stage processes per run, about 10-40 s each.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
STAGES = ["prepare", "rollout", "hindsight", "train", "evaluate"]

pytestmark = pytest.mark.integration


VENV = Path(sys.prefix)
DVC = str(VENV / "bin" / "dvc")


def path_without_herl() -> str:
    """This PATH without the folders that hold a ``herl`` command (an activated environment)."""
    return os.pathsep.join(d for d in os.environ["PATH"].split(os.pathsep) if d and not (Path(d) / "herl").exists())


def sh(repo: Path, *args: str) -> str:
    if args[0] == "dvc":
        args = (DVC, *args[1:])
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
    (repo / "scripts").mkdir()
    shutil.copy2(ROOT / "scripts" / "herl", repo / "scripts" / "herl")
    (repo / ".venv").symlink_to(VENV, target_is_directory=True)
    (repo / ".gitignore").write_text("/runs/\n/.herl/\n/mlartifacts/\n/.venv\n/dvc_plots/\n")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PATH", path_without_herl())
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


def plot_specs(html: str) -> dict[str, dict]:
    """The Vega-Lite spec of every plot in DVC's ``index.html``, by plot id (``<div id = "rewards">``)."""
    found = re.findall(r'<div id = "([^"]+)">\s*<script[^>]*>\s*var spec = (\{.*?\});\s*vegaEmbed', html, re.S)
    return {plot_id: json.loads(spec) for plot_id, spec in found}


def check_plots(repo: Path, out: Path, steps: int) -> None:
    """``dvc plots show`` renders every plot of dvc.yaml with a line per y field and a point per step."""
    log = sh(repo, "dvc", "plots", "show", "-o", str(out))
    assert "supported" not in log and "ERROR" not in log and "WARNING" not in log, log
    specs = plot_specs((out / "index.html").read_text())
    wanted = {next(iter(p)): p[next(iter(p))] for p in yaml.safe_load((repo / "dvc.yaml").read_text())["plots"]}
    assert sorted(specs) == sorted(wanted) == ["loss", "rewards"]
    for plot_id, spec in specs.items():
        (fields,) = wanted[plot_id]["y"].values()
        values = spec["data"]["values"]
        for field in fields:
            points = [v for v in values if v.get("field", field) == field]
            assert sorted(int(v["step"]) for v in points) == list(range(steps)), (plot_id, field)
            assert all(float(v[field]) == float(v[field]) for v in points)  # numbers, not NaN, not empty


def test_repro_skips_what_did_not_change_and_probe_knobs_never_rerun_train(repo, tmp_path):
    first = sh(repo, "dvc", "repro")
    assert ran(first) == STAGES
    check_plots(repo, tmp_path / "plots", steps=2)
    # one small headline file per stage, as dvc.yaml lists them: a dozen numbers each at most
    shown = subprocess.run([DVC, "metrics", "show", "--json"], cwd=repo, capture_output=True, text=True, check=True)
    metrics = json.loads(shown.stdout)
    files = {path: data for rev in metrics.values() for path, data in (rev.get("data") or {}).items()}
    assert sorted(files) == sorted(
        ["data/prepared/metrics.json", "data/rollout/metrics.json", "data/hindsight/metrics.json",
         "reports/train/metrics.json", "reports/evaluate/metrics.json"]
    )  # fmt: skip
    assert all(0 < len(f["data"]) <= 12 for f in files.values()), {p: len(f["data"]) for p, f in files.items()}
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
    # train started over (new settings), it did not resume the finished run: its first step is step 0 again
    assert "[1/2] step 0  reward" in exp
