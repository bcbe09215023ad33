"""benchmarks/study_mde.py: the measured MDE of a contrast, by hand from two seeds of two arms."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from herl_core.stats import min_detectable_difference

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("study_mde", ROOT / "benchmarks" / "study_mde.py")
study_mde_module = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(study_mde_module)
study_mde = study_mde_module.study_mde


def write_run(results: Path, arm: str, seed: int, all_met: list[int]) -> None:
    """A finished run's results as flows/study.py writes them: validation at step 0 (none met) and 2, k = 4."""
    folder = results / f"{arm}-s{seed}"
    (folder / "train").mkdir(parents=True)
    rows = [
        {"step": step, "part": "val/", "prompt_id": f"p{i}", "scored": 4, "all_met": m if step else 0}
        for step in (0, 2)
        for i, m in enumerate(all_met)
    ]
    (folder / "train" / "val_outcomes.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "study_run.json").write_text(json.dumps({"name": folder.name, "arm": arm, "seed": seed, "phases": {}}))


def test_measured_variances_and_mde_by_hand(tmp_path):
    final = {("grpo", 0): [1, 0, 2, 0], ("grpo", 1): [0, 1, 1, 0], ("herl", 0): [2, 0, 2, 1], ("herl", 1): [1, 1, 2, 0]}
    for (arm, seed), all_met in final.items():
        write_run(tmp_path, arm, seed, all_met)
    out = study_mde(tmp_path, "herl", "grpo")
    # herl − grpo per prompt (shares of 4): seed 0 [.25, 0, 0, .25] → mean .125, var 1/48; seed 1 [.25, 0, .25, 0]
    # → mean .125, var 1/48. Seed variance 0, prompt variance 1/48 = 0.0208333
    assert out["seeds"] == [0, 1] and out["per_seed_difference"] == [pytest.approx(0.125)] * 2
    assert out["seed_sd"] == pytest.approx(0.0) and out["prompt_var"] == pytest.approx(1 / 48)
    # MDE at 3 seeds × 4 prompts: 2.80158 · √(1/48 / 4) = 2.80158 · 0.0721688 = 0.202188
    assert out["mde"]["3"] == pytest.approx(0.202188, abs=1e-5)
    assert out["mde"]["3"] == pytest.approx(min_detectable_difference(1 / 48, 4, 0.0, 3)["mde"])


def test_one_seed_is_refused(tmp_path):
    write_run(tmp_path, "grpo", 0, [1, 0, 2, 0])
    write_run(tmp_path, "herl", 0, [2, 0, 2, 1])
    with pytest.raises(SystemExit, match="at least two seeds"):
        study_mde(tmp_path, "herl", "grpo")
