"""``herl`` command line: one subcommand per stage (same names as dvc.yaml, flows/ and MLflow), plus helpers.

Every command takes ``--params`` (default params.yaml), ``--profile`` (tiny | cpu | gpu | any profile in the file)
and ``--set section.key=value`` overrides, and validates the whole config before doing anything.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

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
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from exc


def format_step(step: int, metrics: dict) -> str:
    parts = [f"step {step:>4}"]
    for key, label in HEADLINE:
        if key in metrics:
            v = metrics[key]
            parts.append(f"{label}={v:.4g}" if isinstance(v, float) else f"{label}={v}")
    return "  ".join(parts)


@app.command()
def train(
    params: ParamsOpt = Path("params.yaml"),
    profile: ProfileOpt = None,
    set_: SetOpt = None,
    resume: Annotated[bool, typer.Option(help="Continue from the newest checkpoint in train.checkpoint_dir.")] = True,
) -> None:
    """Train the policy with HeRL (or GRPO with --set herl.enabled=false): rollout → hindsight → update per step."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from herl_core.io import DataError
    from herl_core.stages import run_train
    from herl_core.train import NonFiniteError

    cfg = load_config(params, profile, set_)
    console.print(f"[bold]herl train[/bold] profile={cfg.profile} model={cfg.model.name_or_path} "
                  f"herl.enabled={cfg.herl.enabled} steps={cfg.train.steps} config={cfg.hash()}")  # fmt: skip
    with Progress(TextColumn("train"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console) as bar:
        task = bar.add_task("train", total=cfg.train.steps)

        def on_step(step: int, metrics: dict) -> None:
            bar.update(task, completed=step)
            bar.console.print(format_step(step, metrics))

        try:
            summary = run_train(cfg, resume=resume, on_step=on_step)
        except (DataError, NonFiniteError, ValueError) as exc:
            console.print(f"[red]error:[/red] {exc}")
            raise typer.Exit(1) from exc
    console.print(f"policy saved to {cfg.train.out_dir}")
    json.dump(summary, sys.stdout, indent=2)
    sys.stdout.write("\n")


@app.command("config")
def show_config(params: ParamsOpt = Path("params.yaml"), profile: ProfileOpt = None, set_: SetOpt = None) -> None:
    """Print the resolved, validated config as JSON."""
    cfg = load_config(params, profile, set_)
    json.dump(cfg.model_dump(mode="json"), sys.stdout, indent=2)
    sys.stdout.write("\n")


if __name__ == "__main__":
    app()
