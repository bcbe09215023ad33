"""Prefect orchestration of the DVC pipeline: Prefect outside, DVC inside (docs/tracking.md).

* One flow per stage (``prepare``, ``rollout``, ``hindsight``, ``train``, ``evaluate``; names as in dvc.yaml), each
  running ONE task: ``dvc repro --single-item <stage>``. One execution path: every stage Prefect runs goes through
  DVC, so ``dvc.lock`` stays true and unchanged stages are skipped by DVC (the task has ``cache_policy=NO_CACHE``:
  no second cache on top of DVC's: two caches would disagree about what is stale).
* The task retries (2×, back-off) only transient failures (DVC lock contention, I/O, connection/judge errors);
  config and data errors fail at once.
* ``pipeline`` takes an exclusive workspace lock (``.herl/pipeline.lock``, ``flows.proc.exclusive_lock``), opens
  the MLflow parent run, runs the stage flows in order as subflows, tags each stage's child run with the fresh
  dvc.lock md5s (the lock is written after the stage command, so the stage itself only sees the previous one) and
  ends the parent with the headline numbers (train's final reward and rewrite success, evaluate's scores), so the
  runs table says how the pipeline went without opening a run.
* Console: a header per stage (``[2/5] rollout``), the stage's own lines (progress, its one-line summary) without
  DVC's per-stage chatter (``console_line``), the whole output in ``.herl/logs/pipeline-<time>.log`` and in the
  task's Prefect log; ``herl pipeline`` (flows/pipeline_cli.py) ends with one closing block.
* Profiles: the pipeline never edits params.yaml. ``profile:`` in params.yaml (or ``dvc exp run -S profile=tiny``)
  selects it; a ``profile`` argument that disagrees with params.yaml is refused with that advice.
"""

from __future__ import annotations

import logging
import re
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from flows.console import say
from flows.proc import child_env, exclusive_lock, stream

STAGES = ("prepare", "rollout", "hindsight", "train", "evaluate")  # == herl_core.stages.STAGES (tested)
LOCK_FILE = ".herl/pipeline.lock"
LOG_DIR = ".herl/logs"
RETRY_DELAYS = [10, 30]
TAIL_LINES = 40
TRANSIENT_MARKERS = (
    "Unable to acquire lock",  # another dvc process (treeverse/dvc#10465)
    "database is locked",
    "Resource temporarily unavailable",
    "Stale file handle",
    "Connection refused",
    "Connection reset",
    "ConnectionError",
    "ConnectError",
    "RemoteDisconnected",
    "timed out",
    "TimeoutError",
    "Temporary failure in name resolution",
    "Too Many Requests",
    "Service Unavailable",
    "JudgeError",
)
FATAL_MARKERS = ("ConfigError", "invalid config", "DataError", "ValidationError", "NonFiniteError", "No such file")


# --------------------------------------------------------------------------------------------------------------------
# one workspace, one pipeline


class WorkspaceBusy(RuntimeError):
    """Another herl pipeline holds this workspace's lock."""


@contextmanager
def workspace_lock(root: str | Path) -> Iterator[None]:
    """Hold ``<root>/.herl/pipeline.lock`` exclusively or raise ``WorkspaceBusy`` at once naming the holder
    (``flows.proc.exclusive_lock``: re-entrant within one process, as the CLI locks, then runs the flow)."""

    def busy(holder: str) -> WorkspaceBusy:
        return WorkspaceBusy(
            f"another herl pipeline is running in this workspace ({holder}); wait for it or use `dvc exp run --queue`"
        )

    with exclusive_lock(Path(root) / LOCK_FILE, busy):
        yield


# --------------------------------------------------------------------------------------------------------------------
# the task: dvc repro one stage


class StageError(RuntimeError):
    """``dvc repro <stage>`` failed; ``transient`` says whether a retry may help."""

    def __init__(self, stage: str, returncode: int, tail: str, transient: bool):
        kind = "transient" if transient else "not transient"
        super().__init__(f"dvc repro {stage} exited with {returncode} ({kind}); last output:\n{tail}")
        self.stage, self.returncode, self.tail, self.transient = stage, returncode, tail, transient


def is_transient(returncode: int, tail: str) -> bool:
    """Exit 2 (usage/config) and config/data errors are never transient; lock, I/O and network errors are."""
    if returncode == 2 or any(m in tail for m in FATAL_MARKERS):
        return False
    return any(m in tail for m in TRANSIENT_MARKERS)


def retry_if_transient(task, task_run, state) -> bool:
    """Prefect ``retry_condition_fn``: retry StageError(transient) and OSError, nothing else."""
    try:
        state.result()
    except StageError as exc:
        return exc.transient
    except OSError:
        return True
    except Exception:
        return False
    return False


DVC_CHATTER = (
    re.compile(r"^Running stage '\w+':$"),
    re.compile(r"^> "),
    re.compile(r"^Updating lock file "),
    re.compile(r"^To track the changes with git, run:$"),
    re.compile(r"^To enable auto staging, run:$"),
    re.compile(r"^git add "),
    re.compile(r"^dvc config core\.autostage true$"),
    re.compile(r"^Use `dvc push` to send your updates to remote storage\.$"),
    re.compile(r"^WARNING: '[^']+' is empty\.$"),
)
"""DVC's lines that the pipeline's console leaves out (they stay in the full log and the Prefect log): the stage
header and command (the pipeline prints its own), the lock update, and the advice to `git add dvc.lock`, to turn on
autostaging and to `dvc push`, which DVC repeats after every stage (the pipeline says it once, at the end)."""


def console_line(line: str) -> str | None:
    """What the pipeline's console shows of one line of ``dvc repro`` output (None: nothing)."""
    text = line.rstrip()
    bare = text.strip()
    if not bare or any(p.search(bare) for p in DVC_CHATTER):
        return None
    skipped = re.fullmatch(r"Stage '(\w+)' didn't change, skipping", bare)
    if skipped:
        return "skipped: nothing it reads changed since the last run (dvc.lock)"
    return text


@task(
    name="dvc-repro",
    task_run_name="dvc repro {stage}",
    retries=2,
    retry_delay_seconds=RETRY_DELAYS,
    retry_condition_fn=retry_if_transient,
    cache_policy=NO_CACHE,
)
def dvc_repro(
    stage: str,
    root: str,
    parent_run_id: str | None = None,
    tracking_uri: str | None = None,
    log_file: str | None = None,
) -> str:
    """``dvc repro --single-item <stage>`` in ``root``; returns the output. Every line goes to the task's Prefect log
    and to ``log_file`` (appended); the console gets ``console_line`` of it, indented under the stage's header."""
    from prefect.runtime import flow_run

    api_log = logging.getLogger("prefect.extra")  # the Prefect API only: the console gets the short form below
    cmd = [sys.executable, "-m", "dvc", "repro", "--single-item", stage]
    env = child_env(parent_run_id, tracking_uri, flow_run_id=flow_run.id)
    lines: list[str] = []
    sink = open(log_file, "a", encoding="utf-8") if log_file else None  # noqa: SIM115 (closed below)

    def log(line: str) -> None:
        api_log.info("%s", line.rstrip())
        lines.append(line)
        if sink is not None:
            sink.write(line)
            sink.flush()
        shown = console_line(line)
        if shown is not None:
            say(f"  {shown}")

    try:
        if sink is not None:
            sink.write(f"==> {stage}: {' '.join(cmd[1:])}\n")
        returncode, tail = stream(cmd, root, env, log, tail=TAIL_LINES)
    finally:
        if sink is not None:
            sink.close()
    if returncode != 0:
        raise StageError(stage, returncode, tail, is_transient(returncode, tail))
    return "".join(lines)


# --------------------------------------------------------------------------------------------------------------------
# flows


def make_stage_flow(stage: str):
    """The Prefect flow of one stage (flow name = stage name)."""

    @flow(name=stage, flow_run_name=stage, log_prints=True)
    def stage_flow(
        root: str = ".", parent_run_id: str | None = None, tracking_uri: str | None = None, log_file: str | None = None
    ) -> str:
        return dvc_repro(stage, root, parent_run_id, tracking_uri, log_file)

    stage_flow.__doc__ = f"Run `dvc repro --single-item {stage}` as one task."
    return stage_flow


STAGE_FLOWS = {stage: make_stage_flow(stage) for stage in STAGES}
prepare, rollout, hindsight, train, evaluate = (STAGE_FLOWS[s] for s in STAGES)


def check_profile(chosen: str | None, requested: str | None, params: str) -> None:
    """The pipeline runs params.yaml as it is; a different ``profile`` request is refused with the way to get it."""
    if requested is not None and requested != chosen:
        raise ValueError(
            f"{params} selects profile {chosen!r} but profile {requested!r} was requested; the pipeline runs "
            f"`dvc repro`, which reads {params} as it is and herl never edits it. Set `profile: {requested}` in "
            f"{params}, or run `dvc exp run -S profile={requested}`."
        )


def ordered_stages(stages: list[str] | None) -> list[str]:
    chosen = list(STAGES) if not stages else stages
    unknown = [s for s in chosen if s not in STAGES]
    if unknown:
        raise ValueError(f"unknown stage(s) {unknown}; known: {list(STAGES)}")
    return sorted(chosen, key=STAGES.index)


@flow(name="pipeline", log_prints=True)
def pipeline(
    root: str = ".",
    params: str = "params.yaml",
    profile: str | None = None,
    stages: list[str] | None = None,
    tags: list[str] | None = None,
) -> dict:
    """The whole chain under one MLflow parent run; refused at once if another pipeline holds the workspace.

    ``tags``: Prefect tags put on every stage flow run and its ``dvc-repro`` task run, so that a tag-based
    concurrency limit (``prefect concurrency-limit create gpu-0 1``) lets one stage at a time use that GPU across
    all pipelines (docs/scaling.md L4). Deployment tags alone do not reach task runs."""
    from prefect import tags as prefect_tags

    from herl_core.config import load_params

    root_path = Path(root).resolve()
    with workspace_lock(root_path):
        cfg = load_params(root_path / params)
        check_profile(cfg.profile, profile, params)
        chosen = ordered_stages(stages)
        check_inputs_in(root_path, cfg, chosen)  # before the parent run is opened: bad input leaves no FAILED run
        with prefect_tags(*(tags or [])):
            return run_stages(cfg, root_path, params, chosen)


def check_inputs_in(root: Path, cfg, stages: list[str]) -> None:
    """``herl_core.stages.check_inputs`` with the workspace's relative paths (the stages run in ``root``)."""
    from contextlib import chdir

    from herl_core.stages import check_inputs

    with chdir(root):
        check_inputs(cfg, stages)


def run_stages(cfg, root: Path, params: str, stages: list[str]) -> dict:
    """Parent run → stage subflows in order → fresh dvc.lock tags on each child → parent ends with the headline
    numbers. The console gets a header per stage (``[2/5] rollout``) and the short form of its output; the whole
    output goes to ``.herl/logs/pipeline-<time>.log`` (``log_file`` of the result)."""
    from flows.tracking import pipeline_dvc_tags, set_tags, stage_run, tracking_uri

    uri = tracking_uri(cfg, root)
    logger = get_run_logger()
    log_file = root / LOG_DIR / f"pipeline-{time.strftime('%Y%m%d-%H%M%S')}.log"
    log_file.parent.mkdir(parents=True, exist_ok=True)
    seconds: dict[str, float] = {}
    with stage_run(cfg, "pipeline", root / params) as parent:
        outcome = {}
        for number, stage in enumerate(stages, start=1):
            say(f"[{number}/{len(stages)}] {stage}")
            started = time.monotonic()
            output = STAGE_FLOWS[stage](str(root), parent.run_id, uri, str(log_file))
            seconds[stage] = time.monotonic() - started
            outcome[stage] = tag_child(parent.client, parent.run_id, stage, root, output)
            logger.info("stage %s: %s", stage, outcome[stage])
        set_tags(
            parent.client,
            parent.run_id,
            {**pipeline_dvc_tags(root), **{f"herl.stage.{k}": v for k, v in outcome.items()}},
        )
        metrics = headline_metrics(parent.client, parent.run_id, cfg)
        outputs = [p for p in (params, "dvc.lock") if (root / p).is_file()]
        parent.finish(metrics, outputs=outputs)
    experiment = parent.client.get_run(parent.run_id).info.experiment_id
    return {
        "parent_run_id": parent.run_id,
        "experiment_id": experiment,
        "tracking_uri": uri,
        "stages": outcome,
        "seconds": {k: round(v, 1) for k, v in seconds.items()},
        "metrics": metrics,
        "log_file": str(log_file.relative_to(root)),
    }


def find_child(client, parent_run_id: str, stage: str):
    """The newest run named ``stage`` whose parent is ``parent_run_id`` (None if the stage made none)."""
    exp = client.get_run(parent_run_id).info.experiment_id
    found = client.search_runs(
        [exp],
        filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}' and attributes.run_name = '{stage}'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return found[0] if found else None


def tag_child(client, parent_run_id: str, stage: str, root: Path, output: str) -> str:
    """Add the fresh dvc.lock md5s of ``stage`` to its child run; returns the child run id or what happened."""
    from flows.tracking import dvc_tags, set_tags

    if f"Stage '{stage}' didn't change, skipping" in output:
        return "skipped (unchanged)"
    child = find_child(client, parent_run_id, stage)
    if child is None:
        return "ran (no MLflow run)"
    set_tags(client, child.info.run_id, {**dvc_tags(root, stage), "herl.dvc_lock": "after-stage"})
    return child.info.run_id


PARENT_METRICS = {
    "train": ("reward/mean", "reward/frac_zero_std", "herl/rewrite_success_rate", "val/reward_mean"),
    "evaluate": ("prompt_strict", "inst_strict", "prompt_loose", "inst_loose"),
}
"""What the parent run shows in the runs table: the train run's final values of these step metrics (the last step's,
as its own row shows them; ``val/reward_mean``: the last validation's, with ``train.eval_every`` on) and evaluate's
scores of every benchmark (``<benchmark>/<score>``)."""


def stage_result(client, parent_run_id: str, cfg, stage: str):
    """The ``stage`` run whose numbers this pipeline reports: its child of this pipeline, else (DVC skipped the stage)
    the newest finished run of it made under the same settings of what it reads (``herl.stage_config_hash``: a probe
    or tracking edit does not rerun evaluate, so the whole-config hash would find none). None if there is none."""
    from herl_core.config import STAGE_SECTIONS

    child = find_child(client, parent_run_id, stage)
    if child is not None:
        return child
    exp = client.get_run(parent_run_id).info.experiment_id
    runs = client.search_runs(
        [exp],
        filter_string=f"attributes.run_name = '{stage}' and "
        f"tags.`herl.stage_config_hash` = '{cfg.hash(STAGE_SECTIONS[stage])}' "
        "and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return runs[0] if runs else None


def stage_metrics(client, parent_run_id: str, cfg, stage: str) -> dict[str, float]:
    """``PARENT_METRICS[stage]`` of ``stage_result`` (train: exact names; evaluate: ``<benchmark>/<name>``); the run is
    named in the parent's tag ``herl.<stage>_run_id``."""
    run = stage_result(client, parent_run_id, cfg, stage)
    if run is None:
        return {}
    client.set_tag(parent_run_id, f"herl.{stage}_run_id", run.info.run_id)
    keep = PARENT_METRICS[stage]
    if stage == "evaluate":
        return {k: v for k, v in run.data.metrics.items() if k.partition("/")[2] in keep}
    return {k: run.data.metrics[k] for k in keep if k in run.data.metrics}


def evaluate_metrics(client, parent_run_id: str, cfg) -> dict[str, float]:
    """evaluate's scores for the parent run (``stage_metrics``)."""
    return stage_metrics(client, parent_run_id, cfg, "evaluate")


def headline_metrics(client, parent_run_id: str, cfg) -> dict[str, float]:
    """The parent run's metrics: train's final reward, zero-std fraction, rewrite success and validation reward,
    evaluate's scores."""
    return {**stage_metrics(client, parent_run_id, cfg, "train"), **evaluate_metrics(client, parent_run_id, cfg)}
