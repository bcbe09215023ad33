"""``herl`` command line: one subcommand per stage (same names as dvc.yaml, flows/ and MLflow), plus helpers.

Every command takes ``--params`` (default params.yaml), ``--profile`` (tiny | cpu | gpu | any profile in the file)
and ``--set section.key=value`` overrides, and validates the whole config before doing anything.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from flows.console import error

app = typer.Typer(
    help="HeRL: hindsight-experience guided RL for LLMs (prepare → rollout → hindsight → train → evaluate).",
    no_args_is_help=True,
    add_completion=False,
)
console = Console(stderr=True)

ParamsOpt = Annotated[Path, typer.Option("--params", "-p", help="params.yaml to load.")]
ProfileOpt = Annotated[str | None, typer.Option("--profile", help="Profile of params.yaml to apply (tiny, cpu, gpu).")]
SetOpt = Annotated[list[str] | None, typer.Option("--set", "-s", help="Override: section.key=value (repeatable).")]

HEADLINE = [
    ("reward/mean", "reward"),
    ("reward/frac_zero_std", "zero_std"),
    ("herl/failed_groups", "failed"),
    ("herl/rewrites", "rewrites"),
    ("herl/rewrite_success_rate", "rw_succ"),
    ("herl/over_prev_best_rate", "over_best"),
    ("herl/bonus_mean", "bonus"),
    ("actor/loss", "loss"),
    ("actor/kl", "kl"),
    ("actor/clipfrac", "clipfrac"),
    ("perf/tokens_per_s", "tok/s"),
    ("perf/step_s", "step_s"),
]


def load_config(params: Path, profile: str | None, overrides: list[str] | None):
    """Load and validate, exiting with the validation message (file, line, field) on error."""
    from herl_core.config import ConfigError, load_params

    try:
        return load_params(params, profile=profile, overrides=overrides)
    except ConfigError as exc:
        error(exc)
        raise typer.Exit(2) from exc


def format_step(step: int, metrics: dict) -> str:
    parts = [f"step {step:>4}"]
    for key, label in HEADLINE:
        if key in metrics:
            v = metrics[key]
            parts.append(f"{label}={v:.4g}" if isinstance(v, float) else f"{label}={v}")
    return "  ".join(parts)


def quiet_transformers() -> None:
    """No "Loading weights" / "Writing model shards" progress bars from transformers in the stage output."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def stage_errors() -> tuple[type[Exception], ...]:
    """Errors a user can fix (bad data, config, model source, diverged training): a message, exit code 1."""
    from herl_core.models import ModelSourceError
    from herl_core.train import NonFiniteError

    return ValueError, FileNotFoundError, ModelSourceError, NonFiniteError


def inputs_check(cfg, stage: str) -> Callable[[], None]:
    """The check of ``stage``'s inputs (model source, prompts and their lengths, files it reads) to run before any
    MLflow run is opened, so that bad input writes nothing, not even a FAILED run (herl_core.stages.check_inputs)."""
    from herl_core.stages import check_inputs

    return lambda: check_inputs(cfg, [stage])


def run_tracked(
    stage: str,
    params: Path,
    cfg,
    runner: Callable,
    outputs: list[str],
    resume: bool = True,
    precheck: Callable[[], None] | None = None,
) -> dict:
    """``runner(tracker)`` inside the stage's MLflow run (flows.tracking.stage_run); user errors → exit code 1.

    ``precheck`` validates the stage's inputs first: on bad input the command exits before MLflow is touched."""
    from flows.tracking import stage_run

    quiet_transformers()
    try:
        if precheck is not None:
            precheck()
        with stage_run(cfg, stage, params_path=params, resume=resume) as tracker:
            summary = runner(tracker)
            tracker.finish(summary, outputs=outputs)
    except stage_errors() as exc:
        error(exc)
        raise typer.Exit(1) from exc
    json.dump(summary, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return summary


def banner(stage: str, cfg) -> None:
    console.print(f"[bold]herl {stage}[/bold] profile={cfg.profile} model={cfg.model.name_or_path} config={cfg.hash()}")


@app.command()
def prepare(params: ParamsOpt = Path("params.yaml"), profile: ProfileOpt = None, set_: SetOpt = None) -> None:
    """Write the training prompts (seeded constraints) and the held-out IFEval/IFBench sets to prepare.out_dir."""
    from herl_core.stages import run_prepare

    cfg = load_config(params, profile, set_)
    banner("prepare", cfg)
    run_tracked("prepare", params, cfg, lambda t: run_prepare(cfg, sink=t.sink), [cfg.prepare.out_dir])


@app.command()
def rollout(params: ParamsOpt = Path("params.yaml"), profile: ProfileOpt = None, set_: SetOpt = None) -> None:
    """Sample G responses per prompt from the policy and score them (readiness probe, part 1) → probe.rollout_dir."""
    from herl_core.stages import run_rollout

    cfg = load_config(params, profile, set_)
    banner("rollout", cfg)
    run_tracked(
        "rollout", params, cfg, lambda t: run_rollout(cfg, sink=t.sink), [cfg.probe.rollout_dir],
        precheck=inputs_check(cfg, "rollout"),
    )  # fmt: skip


@app.command()
def hindsight(params: ParamsOpt = Path("params.yaml"), profile: ProfileOpt = None, set_: SetOpt = None) -> None:
    """Hindsight prompts, rewrites, re-scores and bonus on the rollouts (readiness probe, part 2) →
    probe.hindsight_dir."""
    from herl_core.stages import run_hindsight

    cfg = load_config(params, profile, set_)
    banner("hindsight", cfg)
    run_tracked(
        "hindsight", params, cfg, lambda t: run_hindsight(cfg, sink=t.sink), [cfg.probe.hindsight_dir],
        precheck=inputs_check(cfg, "hindsight"),
    )  # fmt: skip


@app.command()
def train(
    params: ParamsOpt = Path("params.yaml"),
    profile: ProfileOpt = None,
    set_: SetOpt = None,
    resume: Annotated[bool, typer.Option(help="Continue from the newest checkpoint in train.checkpoint_dir.")] = True,
) -> None:
    """Train the policy with HeRL (GRPO with --set hindsight.enabled=false): rollout → hindsight → update per step."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from herl_core.resume import RUN_ID_KEY
    from herl_core.stages import run_train

    cfg = load_config(params, profile, set_)
    from herl_core.distributed import is_main_process

    if not is_main_process():  # a data-parallel rank > 0 (docs/scaling.md): trains its share, rank 0 tracks
        quiet_transformers()
        run_train(cfg, resume=resume)
        return
    console.print(f"[bold]herl train[/bold] profile={cfg.profile} model={cfg.model.name_or_path} "
                  f"hindsight.enabled={cfg.hindsight.enabled} steps={cfg.train.steps} config={cfg.hash()}")  # fmt: skip
    with Progress(TextColumn("train"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console) as bar:
        task = bar.add_task("train", total=cfg.train.steps)

        def on_step(step: int, metrics: dict) -> None:
            bar.update(task, completed=step)
            bar.console.print(format_step(step, metrics))

        def runner(tracker) -> dict:
            extras = {RUN_ID_KEY: tracker.run_id}  # a resume re-attaches to this run (herl_core.resume)

            def step_done(step: int, metrics: dict) -> None:  # after the step's checkpoint: its metrics go to MLflow
                tracker.sink.flush_durable()
                on_step(step, metrics)

            return run_train(cfg, resume=resume, sink=tracker.sink, on_step=step_done, checkpoint_extras=extras)

        run_tracked(
            "train", params, cfg, runner, [cfg.train.report_dir], resume=resume, precheck=inputs_check(cfg, "train")
        )
    console.print(f"policy saved to {cfg.train.out_dir}")


@app.command()
def evaluate(params: ParamsOpt = Path("params.yaml"), profile: ProfileOpt = None, set_: SetOpt = None) -> None:
    """Score the trained policy on evaluate.benchmarks (IFEval/IFBench official metrics) → evaluate.out_dir."""
    from herl_core.stages import run_evaluate

    cfg = load_config(params, profile, set_)
    banner("evaluate", cfg)
    run_tracked(
        "evaluate", params, cfg, lambda t: run_evaluate(cfg, sink=t.sink), [cfg.evaluate.out_dir],
        precheck=inputs_check(cfg, "evaluate"),
    )  # fmt: skip


@app.command("config")
def show_config(params: ParamsOpt = Path("params.yaml"), profile: ProfileOpt = None, set_: SetOpt = None) -> None:
    """Print the resolved, validated config as JSON."""
    cfg = load_config(params, profile, set_)
    json.dump(cfg.model_dump(mode="json"), sys.stdout, indent=2)
    sys.stdout.write("\n")


def _register_orchestration() -> None:
    """`herl pipeline | deploy | ui` (flows/pipeline_cli.py) and `herl study` (flows/study.py)."""
    from flows import pipeline_cli, study

    pipeline_cli.register(app)
    study.register(app)


_register_orchestration()

if __name__ == "__main__":
    app()
