"""``herl study``: the typer command over ``flows.study`` (the study flow).

Kept apart from flows/study.py so that ``flows.cli`` imports no Prefect: the stage commands (``herl train``,
``rollout``, ``hindsight``, ``evaluate``) also run in the vLLM environment, where Prefect is not installed
(docs/scaling.md, "vLLM"). Prefect is imported when ``herl study`` runs.
"""

from __future__ import annotations

import shlex
import sys
from typing import Annotated

import typer


def register(app: typer.Typer) -> None:
    """Add ``herl study`` to the typer ``app`` (flows/cli.py calls ``register(app)``)."""

    @app.command("study")
    def study_command(
        study_file: Annotated[str, typer.Option("--study", help="Study file (arms, seeds, budget).")] = "study.yaml",
        profile: Annotated[
            str | None,
            typer.Option("--profile", help="A profile of the study file (its profiles: keys; docs/study.md)."),
        ] = None,
        arms: Annotated[str | None, typer.Option(help="Comma-separated subset of the arms.")] = None,
        seeds: Annotated[str | None, typer.Option(help="Comma-separated subset of the seeds.")] = None,
        phase: Annotated[
            str | None, typer.Option(help="train (training + held-out validation) or broad (IFEval/IFBench).")
        ] = None,
        commit: Annotated[
            bool, typer.Option("--commit", help="git-commit each finished run's results and the report.")
        ] = False,
        report_only: Annotated[
            bool, typer.Option("--report-only", help="Rewrite the report from the committed results; run nothing.")
        ] = False,
    ) -> None:
        """HeRL vs GRPO (+ equal-token GRPO, no-bonus ablation, base) over seeds → the study's report."""
        from flows.study import CommandError, rerender, study

        try:
            if phase is not None and phase not in ("train", "broad"):
                raise ValueError(f"--phase must be train or broad, got {phase!r}")
            if report_only:
                summary = rerender(study_file, profile)
                typer.echo(f"report: {summary['report']} (rendered from {summary['results_dir']}, nothing run)")
                typer.echo(f"status: {summary['status']['line']}")
                return
            summary = study(
                study_file=study_file,
                profile=profile,
                arms=arms.split(",") if arms else None,
                seeds=[int(s) for s in seeds.split(",")] if seeds else None,
                phases=[phase] if phase else None,
                command=shlex.join(["herl", *sys.argv[1:]]),
                commit=commit,
            )
        except (ValueError, CommandError) as exc:  # StudyError, ConfigError, DataError are ValueErrors
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(1) from exc
        typer.echo(f"report: {summary['report']} ({summary['status']['line']})")
