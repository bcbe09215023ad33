"""``herl pipeline``, ``herl deploy`` and ``herl ui``: the orchestration commands (issue 3; docs/tracking.md).

``register(app)`` adds them to the ``herl`` Typer app (flows/cli.py). Every server they start binds 127.0.0.1.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from flows.console import error

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
    ) -> None:
        """Run the whole pipeline (dvc repro per stage as Prefect flows, MLflow parent + stage runs)."""
        from flows.pipeline import (
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
        try:
            with workspace_lock(root):  # refuse before spending seconds on a Prefect server
                cfg = load_params(params)
                check_profile(cfg.profile, profile, params.name)  # ConfigError is a ValueError
                chosen = ordered_stages(_stages(stages))
                check_inputs_in(root, cfg, chosen)  # bad input: nothing written, not even a FAILED MLflow run
                result = pipeline(root=str(root), params=params.name, profile=profile, stages=chosen, tags=tag)
        except WorkspaceBusy as exc:
            error(exc)
            raise typer.Exit(3) from exc
        except (DataError, ModelSourceError) as exc:  # bad input data or model source, as the stage commands
            error(exc)
            raise typer.Exit(1) from exc
        except ValueError as exc:  # profile mismatch, unknown stage, invalid config
            error(exc)
            raise typer.Exit(2) from exc
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
        fragment = f"#/experiments/{exp.experiment_id}/runs" if exp else "(no runs yet: run `herl pipeline` first)"
        if uri.startswith(("http://", "https://")):
            print(f"tracking server: {uri.rstrip('/')}/{fragment}")
            return
        cmd = ui_command(uri, port)
        print(shlex.join(cmd))
        print(f"then open http://127.0.0.1:{port}/{fragment}")
        if launch:
            raise typer.Exit(subprocess.call(cmd))
