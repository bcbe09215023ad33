"""``herl`` command line: one subcommand per stage (same names as dvc.yaml, flows/ and MLflow), plus helpers.

Every command takes ``--params`` (default params.yaml), ``--profile`` (tiny | cpu | gpu | any profile in the file)
and ``--set section.key=value`` overrides, and validates the whole config before doing anything. What a command
prints (flows/console.py): live progress (train: per step with ETA; evaluate: per batch), a one-line summary of the
stage's headline numbers and a closing block with where its files and its MLflow run are, all on stderr; ``--json``
also prints the stage's summary as JSON on stdout.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer

from flows.console import CONSOLE, EvalProgress, closing, duration, error, mlflow_hint, plural, say, stage_summary

app = typer.Typer(
    help="HeRL: hindsight-experience guided RL for LLMs (prepare → rollout → hindsight → train → evaluate).",
    no_args_is_help=True,
    add_completion=False,
)
console = CONSOLE
STARTED = time.monotonic()
"""When this command started (its "done in" counts the imports and the model load too)."""

ParamsOpt = Annotated[Path, typer.Option("--params", "-p", help="params.yaml to load.")]
ProfileOpt = Annotated[str | None, typer.Option("--profile", help="Profile of params.yaml to apply (tiny, cpu, gpu).")]
SetOpt = Annotated[list[str] | None, typer.Option("--set", "-s", help="Override: section.key=value (repeatable).")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Also print the stage's summary as JSON on stdout.")]


def load_config(params: Path, profile: str | None, overrides: list[str] | None):
    """Load and validate, exiting with the validation message (file, line, field) on error."""
    from herl_core.config import ConfigError, load_params

    try:
        return load_params(params, profile=profile, overrides=overrides)
    except ConfigError as exc:
        error(exc)
        raise typer.Exit(2) from exc


def quiet_transformers() -> None:
    """No "Loading weights" / "Writing model shards" progress bars from transformers in the stage output."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def stage_errors() -> tuple[type[Exception], ...]:
    """Errors a user can fix (bad data, config, model source, diverged training): a message, exit code 1."""
    from herl_core.models import ModelSourceError
    from herl_core.update import NonFiniteError

    return ValueError, FileNotFoundError, ModelSourceError, NonFiniteError


def inputs_check(cfg, stage: str) -> Callable[[], None]:
    """The check of ``stage``'s inputs (model source, prompts and their lengths, files it reads) to run before any
    MLflow run is opened, so that bad input writes nothing, not even a FAILED run (herl_core.stages.check_inputs)."""
    from herl_core.stages import check_inputs

    return lambda: check_inputs(cfg, [stage])


def stage_files(stage: str, cfg) -> list[tuple[str, str]]:
    """(what, path) of a stage's results, for the closing block."""
    from herl_core.stages import HEADLINE_FILE

    folder = {"prepare": cfg.prepare.out_dir, "rollout": cfg.probe.rollout_dir, "hindsight": cfg.probe.hindsight_dir,
              "train": cfg.train.report_dir, "evaluate": cfg.evaluate.out_dir}[stage]  # fmt: skip
    rows = [("numbers", f"{folder}/{HEADLINE_FILE}")]
    rows += {
        "prepare": [("details", f"{folder}/report.json"), ("data", f"{folder}/{{train,val,ifeval,ifbench}}.jsonl")],
        "rollout": [("details", f"{folder}/summary.json"), ("samples", f"{folder}/rollouts.jsonl")],
        "hindsight": [("details", f"{folder}/summary.json"), ("rewrites", f"{folder}/experiences.jsonl")],
        "train": [("per step", f"{folder}/steps.csv (dvc plots show)"), ("details", f"{folder}/summary.json"),
                  ("policy", cfg.train.out_dir)],
        "evaluate": [("details", f"{folder}/<benchmark>/ (samples.jsonl, per_type.json, metrics.json)")],
    }[stage]  # fmt: skip
    return rows


def report(stage: str, cfg, summary: dict, tracker, started: float) -> None:
    """The stage's summary line, then (run alone, not inside ``herl pipeline``) the closing block: files and run."""
    from flows.tracking import PARENT_ENV
    from herl_core.stages import headline

    say(f"{stage}: {stage_summary(stage, headline(stage, summary))}")
    if os.environ.get(PARENT_ENV):  # inside herl pipeline: its own closing block says where to look
        return
    experiment = tracker.client.get_run(tracker.run_id).info.experiment_id
    where = mlflow_hint(tracker.client.tracking_uri, experiment, tracker.run_id)
    rows = [*stage_files(stage, cfg), ("MLflow run", f"{stage} {tracker.run_id[:8]}: {where}")]
    closing(f"herl {stage} done in {duration(time.monotonic() - started)}", rows)


def run_tracked(
    stage: str,
    params: Path,
    cfg,
    runner: Callable,
    outputs: list[str],
    resume: bool = True,
    precheck: Callable[[], None] | None = None,
    as_json: bool = False,
) -> dict:
    """``runner(tracker)`` inside the stage's MLflow run (flows.tracking.stage_run); user errors → exit code 1.

    ``precheck`` validates the stage's inputs first: on bad input the command exits before MLflow is touched. The run
    gets the stage's headline numbers as metrics (``herl_core.stages.headline``)."""
    from flows.tracking import stage_run
    from herl_core.stages import headline

    quiet_transformers()
    try:
        if precheck is not None:
            precheck()
        with stage_run(cfg, stage, params_path=params, resume=resume) as tracker:
            summary = runner(tracker)
            tracker.finish(summary, outputs=outputs, metrics=headline(stage, summary))
    except stage_errors() as exc:
        error(exc)
        raise typer.Exit(1) from exc
    report(stage, cfg, summary, tracker, STARTED)
    if as_json:
        json.dump(summary, sys.stdout, indent=2)
        sys.stdout.write("\n")
    return summary


def banner(stage: str, cfg, *extra: str) -> None:
    say(" · ".join([f"herl {stage}", f"profile {cfg.profile}", f"model {cfg.model.name_or_path}", *extra,
                    f"config {cfg.hash()}"]))  # fmt: skip


@app.command()
def prepare(
    params: ParamsOpt = Path("params.yaml"), profile: ProfileOpt = None, set_: SetOpt = None, as_json: JsonOpt = False
) -> None:
    """Write the training prompts (seeded constraints) and the held-out IFEval/IFBench sets to prepare.out_dir."""
    from herl_core.stages import run_prepare

    cfg = load_config(params, profile, set_)
    banner("prepare", cfg)
    run_tracked("prepare", params, cfg, lambda t: run_prepare(cfg, sink=t.sink), [cfg.prepare.out_dir], as_json=as_json)


@app.command()
def rollout(
    params: ParamsOpt = Path("params.yaml"), profile: ProfileOpt = None, set_: SetOpt = None, as_json: JsonOpt = False
) -> None:
    """Sample G responses per prompt from the policy and score them (readiness probe, part 1) → probe.rollout_dir."""
    from herl_core.stages import run_rollout

    cfg = load_config(params, profile, set_)
    banner("rollout", cfg, f"{cfg.probe.prompts} prompts × G={cfg.rollout.n}")
    run_tracked(
        "rollout", params, cfg, lambda t: run_rollout(cfg, sink=t.sink), [cfg.probe.rollout_dir],
        precheck=inputs_check(cfg, "rollout"), as_json=as_json,
    )  # fmt: skip


@app.command()
def hindsight(
    params: ParamsOpt = Path("params.yaml"), profile: ProfileOpt = None, set_: SetOpt = None, as_json: JsonOpt = False
) -> None:
    """Hindsight prompts, rewrites, re-scores and bonus on the rollouts (readiness probe, part 2) →
    probe.hindsight_dir."""
    from herl_core.stages import run_hindsight

    cfg = load_config(params, profile, set_)
    banner("hindsight", cfg)
    summary = run_tracked(
        "hindsight", params, cfg, lambda t: run_hindsight(cfg, sink=t.sink), [cfg.probe.hindsight_dir],
        precheck=inputs_check(cfg, "hindsight"), as_json=as_json,
    )  # fmt: skip
    if "control" in summary:  # guidance vs resampling at equal tokens (docs/probe.md)
        say(f"control: {summary['control']['verdict']}")


@app.command()
def train(
    params: ParamsOpt = Path("params.yaml"),
    profile: ProfileOpt = None,
    set_: SetOpt = None,
    resume: Annotated[bool, typer.Option(help="Continue from the newest checkpoint in train.checkpoint_dir.")] = True,
    as_json: JsonOpt = False,
) -> None:
    """Train the policy with HeRL (GRPO with --set hindsight.enabled=false): rollout → hindsight → update per step."""
    from flows.console import train_progress
    from herl_core.resume import RUN_ID_KEY
    from herl_core.stages import run_train

    cfg = load_config(params, profile, set_)
    from herl_core.distributed import is_main_process

    if not is_main_process():  # a data-parallel rank > 0 (docs/scaling.md): trains its share, rank 0 tracks
        quiet_transformers()
        run_train(cfg, resume=resume)
        return
    t = cfg.train
    shape = f"{plural(t.steps, 'step')} of {t.prompts_per_step} prompts × G={cfg.rollout.n}"
    banner("train", cfg, shape, "HeRL" if cfg.hindsight.enabled else "GRPO (hindsight off)")

    def runner(tracker) -> dict:
        extras = {RUN_ID_KEY: tracker.run_id}  # a resume re-attaches to this run (herl_core.resume)
        progress, show = train_progress(t.steps)

        def on_step(done: int, metrics: dict) -> None:  # after the step's checkpoint: its metrics go to MLflow
            tracker.sink.flush_durable()
            show(done, metrics)

        with progress:
            return run_train(cfg, resume=resume, sink=tracker.sink, on_step=on_step, checkpoint_extras=extras)

    run_tracked(
        "train", params, cfg, runner, [t.report_dir], resume=resume, precheck=inputs_check(cfg, "train"),
        as_json=as_json,
    )  # fmt: skip


@app.command()
def evaluate(
    params: ParamsOpt = Path("params.yaml"), profile: ProfileOpt = None, set_: SetOpt = None, as_json: JsonOpt = False
) -> None:
    """Score the trained policy on evaluate.benchmarks (IFEval/IFBench official metrics) → evaluate.out_dir."""
    from herl_core.stages import run_evaluate

    cfg = load_config(params, profile, set_)
    e = cfg.evaluate
    banner("evaluate", cfg, ", ".join(e.benchmarks) + (f", first {e.limit} prompts each" if e.limit else ""))

    def runner(tracker) -> dict:
        progress = EvalProgress()
        try:
            return run_evaluate(cfg, sink=tracker.sink, on_batch=progress)
        finally:
            progress.close()

    metrics = run_tracked(
        "evaluate", params, cfg, runner, [e.out_dir], precheck=inputs_check(cfg, "evaluate"), as_json=as_json
    )
    for line in truncation_warnings(metrics, e.benchmarks):
        console.print(line)


TRUNCATION_WARN = 0.05
"""Above this share of answers cut at evaluate.max_new_tokens the evaluate command warns: the cap, not only the
policy, shapes the scores."""


def truncation_warnings(metrics: dict, benchmarks: list[str]) -> list[str]:
    """A warning per benchmark whose answers were cut at the token cap more than ``TRUNCATION_WARN`` of the time
    (the summary line shows every benchmark's truncation rate beside its scores)."""
    cap = metrics.get("max_new_tokens")
    lines = []
    for b in benchmarks:
        frac = metrics.get(f"{b}/truncated_frac") or 0
        if frac > TRUNCATION_WARN:
            lines.append(
                f"[yellow]warning:[/yellow] {100 * frac:.1f}% of {b} answers ({metrics.get(f'{b}/n_truncated')} of "
                f"{metrics.get(f'{b}/n_prompts')}) hit evaluate.max_new_tokens={cap} without EOS; cut answers are "
                "scored as they stand, so compare these scores only with runs at the same cap (lm-eval's IFEval "
                "uses 1280)"
            )
    return lines


@app.command("config")
def show_config(params: ParamsOpt = Path("params.yaml"), profile: ProfileOpt = None, set_: SetOpt = None) -> None:
    """Print the resolved, validated config as JSON."""
    cfg = load_config(params, profile, set_)
    json.dump(cfg.model_dump(mode="json"), sys.stdout, indent=2)
    sys.stdout.write("\n")


def _register_orchestration() -> None:
    """`herl pipeline | deploy | ui` (flows/pipeline_cli.py) and `herl study` (flows/study_cli.py). Neither imports
    Prefect until its command runs, so the stage commands work where Prefect is not installed (the vLLM env)."""
    from flows import pipeline_cli, study_cli

    pipeline_cli.register(app)
    study_cli.register(app)


_register_orchestration()

if __name__ == "__main__":
    app()
