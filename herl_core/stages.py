"""Stage entry points: read inputs, validate, call one herl_core module, write outputs atomically. No math here.

Stage names are the same everywhere: ``prepare``, ``rollout``, ``hindsight``, ``train``, ``evaluate`` (the CLI
subcommands, flows/, dvc.yaml and the MLflow child runs). Each function returns a small summary dict (the stage's
DVC metric) and never leaves a half-written output.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from herl_core.config import Config
from herl_core.io import DataError, atomic_dir, read_jsonl, write_json_atomic
from herl_core.models import save_checkpoint_weights
from herl_core.records import PromptRecord
from herl_core.sink import JsonlSink, MetricsSink, MultiSink

STAGES = ("prepare", "rollout", "hindsight", "train", "evaluate")


def load_prompts(path: str | Path, validate_constraints: bool = True) -> list[PromptRecord]:
    """Read a prompts JSONL (PromptRecord per line); constraint ids and kwargs are checked against the registries."""
    rows = read_jsonl(path, PromptRecord)
    if validate_constraints:
        from herl_core.rewards.constraints import validate_rubric

        for lineno, row in enumerate(rows, start=1):
            for k, rubric in enumerate(row.rubrics):
                if rubric.kind != "constraint":
                    continue
                try:
                    validate_rubric(rubric, row.prompt)
                except ValueError as exc:
                    raise DataError(f"{path}:{lineno}: field 'rubrics.{k}': {exc}") from exc
    return rows


def summarise(history: list[dict]) -> dict[str, float]:
    """Final/mean values of the headline metrics for the train stage's DVC metric file."""
    if not history:
        return {}
    keys = ["reward/mean", "reward/frac_zero_std", "herl/rewrite_success_rate", "herl/bonus_mean", "actor/loss"]
    out: dict[str, float] = {"steps": float(len(history))}
    for k in keys:
        vals = [h[k] for h in history if k in h]
        if vals:
            out[f"{k}_first"], out[f"{k}_last"] = vals[0], vals[-1]
            out[f"{k}_mean"] = sum(vals) / len(vals)
    out["perf/step_s_mean"] = sum(h["perf/step_s"] for h in history) / len(history)
    return out


def run_train(
    cfg: Config,
    *,
    resume: bool = True,
    sink: MetricsSink | None = None,
    on_step: Callable[[int, dict], None] | None = None,
    trainer_kwargs: dict | None = None,
) -> dict:
    """The ``train`` stage: the online HeRL loop; writes the policy folder, per-step logs and a summary.

    Outputs: ``train.out_dir`` (HF safetensors policy), ``train.report_dir``/{steps,experiences,merges,
    rollouts}.jsonl and summary.json. Resume checkpoints live in ``train.checkpoint_dir``.
    """
    from herl_core.train import Trainer

    prompts = load_prompts(cfg.train.data)
    report = JsonlSink(cfg.train.report_dir)
    trainer = Trainer(cfg, prompts, sink=MultiSink(report, sink) if sink else report, **(trainer_kwargs or {}))
    if resume and trainer.resume(cfg.train.checkpoint_dir):
        report.truncate_after(trainer.state.step - 1)
    else:
        report.reset()
    history = _read_history(Path(cfg.train.report_dir) / "steps.jsonl")
    history += trainer.train(on_step=on_step)
    trainer.save(cfg.train.checkpoint_dir, keep=cfg.train.keep_checkpoints)
    with atomic_dir(cfg.train.out_dir) as tmp:
        save_checkpoint_weights(trainer.model, trainer.tokenizer, tmp)
    summary = {**summarise(history), "config_hash": cfg.hash()}
    write_json_atomic(Path(cfg.train.report_dir) / "summary.json", summary)
    return summary


def _read_history(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
