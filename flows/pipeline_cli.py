"""``herl pipeline``, ``herl deploy`` and ``herl ui``: the orchestration commands (docs/tracking.md).

``register(app)`` adds them to the ``herl`` Typer app (flows/cli.py). Every server they start binds 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from flows.console import closing, command, duration, error, mlflow_hint, runs_fragment, say, stage_summary

console = Console(stderr=True)

ParamsOpt = Annotated[Path, typer.Option("--params", "-p", help="params.yaml of the workspace.")]
StagesOpt = Annotated[
    str | None, typer.Option("--stages", help="Comma-separated subset, run in pipeline order (default: all five).")
]

TagOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--tag",
        help="Prefect tag on every stage flow and task run (repeatable), e.g. gpu-0 for a tag-based concurrency "
        "limit: `prefect concurrency-limit create gpu-0 1` (docs/scaling.md L4).",
    ),
]


def _stages(stages: str | None) -> list[str] | None:
    return [s.strip() for s in stages.split(",") if s.strip()] if stages else None


def ui_command(uri: str, port: int) -> list[str]:
    """``mlflow ui`` on the project's store, local only, one worker (about 11 s to start instead of 23 s)."""
    exe = Path(sys.executable).parent / "mlflow"
    return [str(exe) if exe.exists() else "mlflow", "ui", "--backend-store-uri", uri, "--host", "127.0.0.1",
            "--port", str(port), "--workers", "1"]  # fmt: skip


def quiet_prefect_console() -> None:
    """Prefect's log lines (flow run begins, task run finished, the temporary server starts) off the console; they
    still go to the Prefect API (the UI's flow-run logs). ``herl pipeline`` prints its own, shorter progress."""
    import logging

    from prefect.logging.handlers import PrefectConsoleHandler

    for name in ("prefect", ""):
        for handler in logging.getLogger(name).handlers:
            if isinstance(handler, PrefectConsoleHandler):
                handler.setLevel(logging.CRITICAL)


def dvc_lock_changed(root: Path) -> bool:
    """Whether git sees dvc.lock as new or modified (False outside a git repository)."""
    try:
        done = subprocess.run(["git", "status", "--porcelain", "--", "dvc.lock"], cwd=root, capture_output=True,
                              text=True, timeout=10)  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0 and bool(done.stdout.strip())


def pipeline_closing(root: Path, cfg, result: dict, started: float) -> None:
    """The closing block of ``herl pipeline``: each stage's time (or "skipped") and headline, then where to look."""
    from flows.cli import stage_files

    lines = []
    for stage, outcome in result["stages"].items():
        numbers = root / stage_files(stage, cfg)[0][1]
        shown = json.loads(numbers.read_text(encoding="utf-8")) if numbers.is_file() else {}
        took = "skipped" if str(outcome).startswith("skipped") else duration(result["seconds"].get(stage, 0))
        summary = stage_summary(stage, shown) if shown else ""  # metrics.json holds the stage's headline
        lines.append(f"{stage:<9} {took:>7}  {summary}")
    where = mlflow_hint(result["tracking_uri"], result["experiment_id"], None)  # the runs table, herl's columns
    dvc = command("dvc")
    rows = [
        ("numbers", f"{dvc} metrics show  (each stage's metrics.json)"),
        ("curves", f"{dvc} plots show  → dvc_plots/index.html"),
        ("MLflow", f"{where}  (row 'pipeline' {result['parent_run_id'][:8]}; its [+] shows the stage runs)"),
        ("full log", result["log_file"]),
    ]
    api = os.environ.get("PREFECT_API_URL", "")
    if api:  # a Prefect server keeps the flow runs (without one, a temporary server held them for this run)
        rows.append(("Prefect", f"{api.rstrip('/').removesuffix('/api')}/runs"))
    if dvc_lock_changed(root):
        rows.append(("dvc.lock", "changed: `git add dvc.lock` and commit it to record this run "
                                 "(`dvc push` uploads the outputs, if you set a DVC remote)"))  # fmt: skip
    closing(f"herl pipeline done in {duration(time.monotonic() - started)}", rows, lines=lines)


def register(app: typer.Typer) -> None:
    """Add ``pipeline``, ``deploy`` and ``ui`` to ``app``."""

    @app.command("pipeline")
    def pipeline_cmd(
        params: ParamsOpt = Path("params.yaml"),
        profile: Annotated[
            str | None, typer.Option(help="Must match params.yaml's `profile:` (herl never edits params.yaml).")
        ] = None,
        stages: StagesOpt = None,
        tag: TagOpt = None,
        as_json: Annotated[bool, typer.Option("--json", help="Also print the result as JSON on stdout.")] = False,
        verbose: Annotated[
            bool, typer.Option("--verbose", "-v", help="Also print Prefect's own log lines (flow and task runs).")
        ] = False,
    ) -> None:
        """Run the whole pipeline (dvc repro per stage as Prefect flows, MLflow parent + stage runs)."""
        from flows.pipeline import (
            StageError,
            WorkspaceBusy,
            check_inputs_in,
            check_profile,
            ordered_stages,
            pipeline,
            workspace_lock,
        )
        from herl_core.config import load_params
        from herl_core.io import DataError
        from herl_core.models import ModelSourceError

        root = params.resolve().parent
        started = time.monotonic()
        try:
            with workspace_lock(root):  # refuse before spending seconds on a Prefect server
                cfg = load_params(params)
                check_profile(cfg.profile, profile, params.name)  # ConfigError is a ValueError
                chosen = ordered_stages(_stages(stages))
                check_inputs_in(root, cfg, chosen)  # bad input: nothing written, not even a FAILED MLflow run
                if not verbose:
                    quiet_prefect_console()
                say(f"herl pipeline · profile {cfg.profile} · {' → '.join(chosen)} · config {cfg.hash()}")
                result = pipeline(root=str(root), params=params.name, profile=profile, stages=chosen, tags=tag)
        except WorkspaceBusy as exc:
            error(exc)
            raise typer.Exit(3) from exc
        except (DataError, ModelSourceError) as exc:  # bad input data or model source, as the stage commands
            error(exc)
            raise typer.Exit(1) from exc
        except StageError as exc:
            error(f"stage {exc.stage} failed (dvc repro exited with {exc.returncode}); its output is above, the whole "
                  f"log in {root.name}/.herl/logs/ (newest pipeline-*.log)")  # fmt: skip
            raise typer.Exit(1) from exc
        except ValueError as exc:  # profile mismatch, unknown stage, invalid config
            error(exc)
            raise typer.Exit(2) from exc
        pipeline_closing(root, cfg, result, started)
        if as_json:
            json.dump(result, sys.stdout, indent=2)
            sys.stdout.write("\n")

    @app.command("deploy")
    def deploy_cmd(
        name: Annotated[str, typer.Option(help="Deployment name: pipeline/<name>.")] = "nightly",
        cron: Annotated[str, typer.Option(help="Cron schedule (UTC).")] = "0 3 * * *",
        params: ParamsOpt = Path("params.yaml"),
        stages: StagesOpt = None,
        work_pool: Annotated[
            str | None,
            typer.Option(
                "--work-pool",
                help="Register on this Prefect process work pool (created if missing) and return; "
                "`prefect worker start --pool NAME` runs the flow runs. Default: serve from this process (blocks).",
            ),
        ] = None,
        concurrency_limit: Annotated[
            int | None,
            typer.Option("--concurrency-limit", min=1, help="Work pool: most flow runs at once (needs --work-pool)."),
        ] = None,
        tag: TagOpt = None,
    ) -> None:
        """Register a cron deployment of the pipeline on the Prefect server (PREFECT_API_URL): served, or on a pool."""
        from flows.deploy import NoServerError, WorkPoolError, deploy_to_pool, serve_pipeline

        where = {"name": name, "cron": cron, "root": params.resolve().parent, "params": params.name}
        try:
            if work_pool is None:
                if concurrency_limit is not None:
                    raise ValueError("--concurrency-limit limits a work pool: give --work-pool NAME too")
                serve_pipeline(**where, stages=_stages(stages), tags=tag)
                return
            deployment_id = deploy_to_pool(
                work_pool, **where, stages=_stages(stages), concurrency_limit=concurrency_limit, tags=tag
            )
        except (NoServerError, WorkPoolError, ValueError) as exc:
            error(exc)
            raise typer.Exit(2) from exc
        print(f"deployment pipeline/{name} ({deployment_id}) on work pool {work_pool!r}, cron {cron!r} (UTC)")
        print(f"run its flow runs with: prefect worker start --pool {shlex.quote(work_pool)}")

    @app.command("ui")
    def ui_cmd(
        params: ParamsOpt = Path("params.yaml"),
        port: Annotated[int, typer.Option(help="Port of the MLflow UI.")] = 5000,
        launch: Annotated[bool, typer.Option(help="Start the UI (blocks) instead of printing the command.")] = False,
    ) -> None:
        """Print (or --launch) the `mlflow ui` command for this project's tracking store and the runs-table URL."""
        from herl_core.config import ConfigError, load_params

        try:
            cfg = load_params(params)
        except ConfigError as exc:
            error(exc)
            raise typer.Exit(2) from exc
        from mlflow import MlflowClient

        from flows.tracking import tracking_uri

        uri = tracking_uri(cfg, params.resolve().parent)
        exists = not uri.startswith("sqlite:///") or Path(uri[len("sqlite:///") :]).is_file()  # do not create one
        exp = MlflowClient(tracking_uri=uri).get_experiment_by_name(cfg.tracking.experiment) if exists else None
        fragment = runs_fragment(exp.experiment_id) if exp else "(no runs yet: run `herl pipeline` first)"
        if uri.startswith(("http://", "https://")):
            print(f"tracking server: {uri.rstrip('/')}/{fragment}")
            return
        cmd = ui_command(uri, port)
        print(shlex.join(cmd))
        print(f"then open http://127.0.0.1:{port}/{fragment}")
        if launch:
            raise typer.Exit(subprocess.call(cmd))
