"""Scheduled (cron) deployments of the ``pipeline`` flow (docs/tracking.md).

Both ways need a running Prefect server, because an ephemeral one cannot schedule (stack_notes §2 "serve")::

    prefect server start --host 127.0.0.1            # UI and API on http://127.0.0.1:4200 (local only)
    export PREFECT_API_URL=http://127.0.0.1:4200/api

* **Served** (``serve_pipeline``, ``herl deploy``): ``Flow.serve``, the static-infrastructure way
  (peers_and_conventions §2.1). The serving process is the worker; it blocks; Ctrl-C / SIGTERM pauses the schedule.
* **Work pool** (``deploy_to_pool``, ``herl deploy --work-pool NAME``): the deployment is registered on a Prefect
  *process* work pool (created if missing) and returns; ``prefect worker start --pool NAME`` runs the flow runs, each
  in a fresh process. The code is loaded from this installation's folder (``Flow.from_source`` on a local folder,
  entrypoint ``flows/pipeline.py:pipeline``): the worker must run where that folder and ``herl`` are installed.
  ``--concurrency-limit N`` caps the pool's concurrent flow runs; the deployment itself has concurrency limit 1
  (one pipeline per workspace, flows/pipeline.py), so a second run of it waits instead of failing on the lock.
"""

from __future__ import annotations

from pathlib import Path
from uuid import UUID

CODE_ROOT = Path(__file__).resolve().parents[1]  # the folder that holds flows/ (repo root, or site-packages)
ENTRYPOINT = "flows/pipeline.py:pipeline"


class NoServerError(RuntimeError):
    """No PREFECT_API_URL: cron schedules need `prefect server start`."""


class WorkPoolError(RuntimeError):
    """The named work pool exists but cannot run our deployment (not a process pool)."""


def api_url() -> str | None:
    from prefect.settings import PREFECT_API_URL

    return PREFECT_API_URL.value()


def require_server() -> None:
    if not api_url():
        raise NoServerError(
            "PREFECT_API_URL is not set: an ephemeral Prefect server cannot run schedules. Start one with "
            "`prefect server start --host 127.0.0.1` and `export PREFECT_API_URL=http://127.0.0.1:4200/api`."
        )


def deployment_parameters(
    root: str | Path, params: str, stages: list[str] | None, tags: list[str] | None = None
) -> dict:
    """Parameters of the scheduled pipeline run: an absolute workspace, so the schedule does not depend on a CWD;
    ``tags`` reach the stage flow and task runs (``pipeline``'s docstring: tag-based concurrency limits)."""
    out: dict = {"root": str(Path(root).resolve()), "params": params}
    if stages:
        out["stages"] = stages
    if tags:
        out["tags"] = list(tags)
    return out


def description(root: str | Path, cron: str) -> str:
    return f"herl pipeline (dvc repro) of {Path(root).resolve()}, cron {cron!r} (UTC)"


def serve_pipeline(
    name: str = "nightly",
    cron: str = "0 3 * * *",
    root: str | Path = ".",
    params: str = "params.yaml",
    stages: list[str] | None = None,
    tags: list[str] | None = None,
) -> None:
    """Register ``pipeline/<name>`` with a cron schedule (UTC) on the Prefect server and serve its runs (blocks)."""
    require_server()
    from flows.pipeline import pipeline

    pipeline.serve(
        name=name,
        cron=cron,
        parameters=deployment_parameters(root, params, stages, tags),
        tags=["herl"],
        description=description(root, cron),
    )


def ensure_process_pool(name: str, concurrency_limit: int | None = None):
    """The work pool ``name``: created as a process pool if missing; ``concurrency_limit`` set if given.

    Returns the pool as read back from the server. Refuses a pool of another type (its workers would need an image).
    """
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate, WorkPoolUpdate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound
    from prefect.workers.process import ProcessWorker

    with get_client(sync_client=True) as client:
        try:
            pool = client.read_work_pool(name)
        except ObjectNotFound:
            template = ProcessWorker.get_default_base_job_template()
            create = WorkPoolCreate(name=name, type="process", base_job_template=template)
            try:
                pool = client.create_work_pool(create)
            except ObjectAlreadyExists:  # created meanwhile by another deploy
                pool = client.read_work_pool(name)
        if pool.type != "process":
            raise WorkPoolError(
                f"work pool {name!r} has type {pool.type!r}; `herl deploy --work-pool` registers on process pools "
                "only (docs/scaling.md L4 says how to deploy on a Docker or Kubernetes pool)"
            )
        if concurrency_limit is not None and pool.concurrency_limit != concurrency_limit:
            client.update_work_pool(name, WorkPoolUpdate(concurrency_limit=concurrency_limit))
            pool = client.read_work_pool(name)
    return pool


def deploy_to_pool(
    work_pool: str,
    name: str = "nightly",
    cron: str = "0 3 * * *",
    root: str | Path = ".",
    params: str = "params.yaml",
    stages: list[str] | None = None,
    concurrency_limit: int | None = None,
    tags: list[str] | None = None,
) -> UUID:
    """Register ``pipeline/<name>`` (cron, UTC) on the process work pool ``work_pool``; returns the deployment id.

    Does not block: ``prefect worker start --pool <work_pool>`` runs the scheduled flow runs.
    """
    if concurrency_limit is not None and concurrency_limit < 1:
        raise ValueError(f"--concurrency-limit must be >= 1, got {concurrency_limit}")
    require_server()
    ensure_process_pool(work_pool, concurrency_limit)
    from prefect import flow

    source = flow.from_source(source=str(CODE_ROOT), entrypoint=ENTRYPOINT)
    return source.deploy(
        name=name,
        work_pool_name=work_pool,
        cron=cron,
        parameters=deployment_parameters(root, params, stages, tags),
        concurrency_limit=1,  # one pipeline per workspace: a second run waits for the first
        job_variables={"working_dir": str(Path(root).resolve())},
        tags=["herl"],
        description=description(root, cron),
        print_next_steps=False,
        ignore_warnings=True,
    )
