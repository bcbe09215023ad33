"""A scheduled (cron) deployment of the ``pipeline`` flow, served from this process (issue 3 "scheduled deployment").

Needs a running Prefect server, because an ephemeral one cannot schedule (stack_notes §2 "serve")::

    prefect server start --host 127.0.0.1            # UI and API on http://127.0.0.1:4200 (local only)
    export PREFECT_API_URL=http://127.0.0.1:4200/api
    herl deploy --name nightly --cron "0 3 * * *"     # blocks: this process runs the scheduled flow runs
    prefect deployment run pipeline/nightly          # one run now

``Flow.serve`` is the static-infrastructure way (peers_and_conventions §2.1): the serving process is the worker.
Ctrl-C / SIGTERM pauses the deployment's schedule.
"""

from __future__ import annotations

from pathlib import Path


class NoServerError(RuntimeError):
    """No PREFECT_API_URL: cron schedules need `prefect server start`."""


def api_url() -> str | None:
    from prefect.settings import PREFECT_API_URL

    return PREFECT_API_URL.value()


def deployment_parameters(root: str | Path, params: str, stages: list[str] | None) -> dict:
    """Parameters of the scheduled pipeline run: an absolute workspace, so the schedule does not depend on a CWD."""
    out: dict = {"root": str(Path(root).resolve()), "params": params}
    if stages:
        out["stages"] = stages
    return out


def serve_pipeline(
    name: str = "nightly",
    cron: str = "0 3 * * *",
    root: str | Path = ".",
    params: str = "params.yaml",
    stages: list[str] | None = None,
) -> None:
    """Register ``pipeline/<name>`` with a cron schedule (UTC) on the Prefect server and serve its runs (blocks)."""
    if not api_url():
        raise NoServerError(
            "PREFECT_API_URL is not set: an ephemeral Prefect server cannot run schedules. Start one with "
            "`prefect server start --host 127.0.0.1` and `export PREFECT_API_URL=http://127.0.0.1:4200/api`."
        )
    from flows.pipeline import pipeline

    pipeline.serve(
        name=name,
        cron=cron,
        parameters=deployment_parameters(root, params, stages),
        tags=["herl"],
        description=f"herl pipeline (dvc repro) of {Path(root).resolve()}, cron {cron!r} (UTC)",
    )
