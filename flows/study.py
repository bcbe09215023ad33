"""Prefect flow ``study``: HeRL vs GRPO (+ ablation) over seeds, then the report (spec §7; docs/study.md).

What it does (the plan: flows/study_plan.py; the report: flows/study_report.py; the statistics: herl_core.stats):

1. load ``study.yaml`` (profile ``tiny`` | ``cpu`` | ``gpu``), resolve and validate the params config of every
   arm × seed before running anything, and check the trained arms share one rollout budget;
2. ``herl prepare`` into ``<out_dir>/data`` (skipped when its report.json exists);
3. per arm × seed, as subprocesses: ``herl train`` then ``herl evaluate`` (``base``: evaluate only), every output
   under ``<out_dir>/<arm>-s<seed>/``. A run whose ``evaluate/metrics.json`` exists is skipped; an interrupted
   train resumes from its checkpoint (``herl train`` resumes by default). ``study_run.json`` in each run folder
   records the config hash: a finished run made under another config is an error, never silently reused;
4. aggregate → ``reports/study.md``, ``reports/study.json``, PNG plots in ``reports/study/``.

These runs are experiments, not pipeline outputs: nothing is written to DVC-tracked paths (data/prepared,
models/policy, reports/train, reports/evaluate), and dvc.yaml has no study stage (docs/study.md).

MLflow (the simplest robust way): this flow creates, with ``MlflowClient`` and explicit run ids, a parent run
``study`` and one child run per arm; each arm's stage commands run with ``HERL_MLFLOW_PARENT_RUN_ID`` = the arm's run
id, so their own ``train`` / ``evaluate`` runs (flows/tracking.py) nest under the arm. After the report the arm runs
get the aggregated metrics (``<metric>/mean``, ``<metric>/ci95``) and the parent the report files. The run ids are
kept in ``<out_dir>/mlflow_runs.json`` so a resumed study logs to the same runs.
"""

from __future__ import annotations

import json
import logging
import shlex
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from flows.proc import child_env, exclusive_lock, stream
from flows.study_plan import (
    BUDGET_KEYS,
    StudyConfig,
    StudyError,
    check_equal_budget,
    data_dir,
    eval_metrics_path,
    load_study,
    plan,
    prepare_command,
    shell_line,
)
from flows.study_report import aggregate, collect_run, plot_curves, plot_eval, render_markdown
from herl_core.config import Config, load_params
from herl_core.io import write_json_atomic, write_text_atomic

RUN_FILE = "study_run.json"
RUNS_FILE = "mlflow_runs.json"
LOCK_FILE = ".study.lock"
TAIL_LINES = 30


# --------------------------------------------------------------------------------------------------------------------
# one command


def _logger():
    """The Prefect run logger inside a flow/task run, else a plain logger (``study.fn`` in unit tests)."""
    from prefect.exceptions import MissingContextError

    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger("herl.study")


class CommandError(RuntimeError):
    """A herl subprocess failed; the message holds the command, the log file and the last lines."""


def argv_of(cmd: list[str]) -> list[str]:
    """``["herl", ...]`` → ``[python, "-m", "flows.cli", ...]`` (the same interpreter as this flow)."""
    return [sys.executable, "-m", "flows.cli", *cmd[1:]] if cmd and cmd[0] == "herl" else list(cmd)


def command_env(parent_run_id: str | None, tracking_uri: str | None) -> dict[str, str]:
    """The environment of the study's commands (``flows.proc.child_env``): their stage runs nest under
    ``parent_run_id`` (an arm's run) in the study's tracking store, tagged with this flow run."""
    return child_env(parent_run_id, tracking_uri, flow_run_id=_flow_run_id())


def _flow_run_id() -> str | None:
    """The current Prefect flow run's id; None outside a flow run (``study.fn`` in unit tests)."""
    from prefect.runtime import flow_run

    return flow_run.id


@task(name="herl-command", task_run_name="{label}", cache_policy=NO_CACHE)
def run_command(cmd: list[str], root: str, log: str, env: dict[str, str], label: str = "herl") -> None:
    """Run one ``herl`` command in ``root``, appending its output to ``log``; raise ``CommandError`` on failure."""
    logger = _logger()
    logger.info("%s", shell_line(cmd))
    path = Path(root) / log
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as out:
        out.write(f"\n$ {shell_line(cmd)}\n")
        out.flush()
        code, tail = stream(argv_of(cmd), root, env, out.write, tail=TAIL_LINES)
    if code != 0:
        raise CommandError(f"`{shell_line(cmd)}` exited with {code} (log: {path}); last lines:\n{tail}")


# --------------------------------------------------------------------------------------------------------------------
# resume bookkeeping


@contextmanager
def study_lock(out_dir: Path) -> Iterator[None]:
    """One study per ``out_dir`` at a time (``flows.proc.exclusive_lock`` on ``<out_dir>/.study.lock``)."""
    lock = out_dir / LOCK_FILE

    def busy(holder: str) -> StudyError:
        return StudyError(f"another study is running in {out_dir} ({holder}; lock {lock})")

    with exclusive_lock(lock, busy):
        yield


def is_finished(run: dict[str, Any], root: Path, config_hash: str) -> bool:
    """True when the run's evaluate metrics exist under the same config; a finished run of another config raises."""
    folder = root / run["dir"]
    if not (root / eval_metrics_path(run)).is_file():
        return False
    record = folder / RUN_FILE
    made = json.loads(record.read_text(encoding="utf-8")).get("config_hash") if record.is_file() else None
    if made != config_hash:
        raise StudyError(
            f"{folder} holds a finished run made under config {made or 'unknown'}, not {config_hash}: delete the "
            "folder to recompute it, or set another out_dir in study.yaml"
        )
    return True


def resolve(study: StudyConfig, runs: list[dict[str, Any]], root: Path) -> dict[str, Config]:
    """Load and validate the params config of every run (fails before anything runs); check the budget."""
    configs = {r["name"]: load_params(root / study.params, study.params_profile, r["overrides"]) for r in runs}
    check_equal_budget(configs)
    return configs


def ensure_data(study: StudyConfig, cfg: Config, root: Path, env: dict[str, str]) -> None:
    """``herl prepare`` into the study's data folder unless done under the same ``prepare`` settings (else raise)."""
    folder = root / data_dir(study)
    settings = cfg.prepare.model_dump(mode="json")
    record = folder / RUN_FILE
    if (folder / "report.json").is_file():
        made = json.loads(record.read_text(encoding="utf-8")).get("prepare") if record.is_file() else None
        if made != settings:
            raise StudyError(
                f"{folder} was prepared under other prepare settings ({made}), not {settings}: delete it or set "
                "another out_dir in study.yaml"
            )
        return
    run_command(prepare_command(study), str(root), f"{study.out_dir}/prepare.log", env, label="prepare")
    write_json_atomic(record, {"prepare": settings})


# --------------------------------------------------------------------------------------------------------------------
# MLflow: parent "study", one child per arm


def open_mlflow(study: StudyConfig, cfg: Config, root: Path, profile: str | None) -> tuple[Any, str, dict[str, str]]:
    """(client, tracking uri, {"study": id, <arm>: id}); ids reused from ``<out_dir>/mlflow_runs.json`` if live."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from flows.tracking import artifact_location, experiment_id, git_info, set_tags, tracking_uri

    uri = tracking_uri(cfg, root)
    client = MlflowClient(tracking_uri=uri)
    saved_path = root / study.out_dir / RUNS_FILE
    saved = json.loads(saved_path.read_text(encoding="utf-8")) if saved_path.is_file() else {}
    ids: dict[str, str] = {}
    if saved.get("tracking_uri") == uri:
        for name, run_id in saved.get("runs", {}).items():
            try:
                if client.get_run(run_id).info.lifecycle_stage == "active":
                    ids[name] = run_id
            except MlflowException:
                pass
    exp = experiment_id(client, study.experiment, artifact_location(cfg, uri, root))
    tags = {**git_info(root), "herl.stage": "study", "herl.study_profile": str(profile)}
    if "study" not in ids:
        ids["study"] = client.create_run(exp, run_name="study").info.run_id
    set_tags(client, ids["study"], tags)
    for arm in study.arms:
        if arm not in ids:
            arm_tags = {"mlflow.parentRunId": ids["study"], "herl.arm": arm}
            ids[arm] = client.create_run(exp, run_name=arm, tags=arm_tags).info.run_id
        set_tags(client, ids[arm], {**tags, "herl.stage": "study-arm", "herl.arm": arm})
    write_json_atomic(saved_path, {"tracking_uri": uri, "runs": ids})
    return client, uri, ids


def log_summary(client: Any, ids: dict[str, str], summary: dict[str, Any], files: list[Path]) -> None:
    """Arm runs: aggregated eval + training metrics (mean, ci95); the parent: the report files. All end FINISHED."""
    from mlflow.entities import Metric

    now = int(datetime.now(UTC).timestamp() * 1000)
    for arm, run_id in ids.items():
        if arm == "study":
            continue
        tables = {**summary["eval"].get(arm, {}), **summary["train"].get(arm, {})}
        rows = []
        for key, ci in tables.items():
            rows += [Metric(f"{key}/mean", ci["mean"], now, 0)] if ci.get("mean") is not None else []
            rows += [Metric(f"{key}/ci95", ci["half"], now, 0)] if ci.get("half") is not None else []
        if rows:
            client.log_batch(run_id, metrics=rows)
        client.set_terminated(run_id, "FINISHED")
    for path in files:
        client.log_artifact(ids["study"], str(path), "report" if path.suffix != ".png" else "report/plots")
    client.set_terminated(ids["study"], "FINISHED")


# --------------------------------------------------------------------------------------------------------------------
# the flow


def select(study: StudyConfig, arms: list[str] | None, seeds: list[int] | None) -> StudyConfig:
    """The study restricted to ``arms`` / ``seeds`` (re-validated; None keeps the file's)."""
    update = {k: v for k, v in (("arms", arms), ("seeds", seeds)) if v}
    return StudyConfig.model_validate({**study.model_dump(), **update}) if update else study


def write_report(study: StudyConfig, runs: list[dict], configs: dict[str, Config], root: Path, meta: dict) -> dict:
    """Collect finished runs, aggregate, write study.json / study.md / plots; returns the summary."""
    benchmarks = next(iter(configs.values())).evaluate.benchmarks
    summary = aggregate([collect_run({**r, "dir": root / r["dir"]}, benchmarks) for r in runs])
    report = root / study.report
    plots_dir = report.with_suffix("")
    made = {
        "reward_curves": plot_curves(summary, plots_dir / "reward_curves.png"),
        "eval_bars": plot_eval(summary, plots_dir / "eval_bars.png"),
    }
    meta["plots"] = {k: str(p.relative_to(report.parent)) for k, p in made.items() if p is not None}
    meta.setdefault("finished", datetime.now(UTC).isoformat(timespec="seconds"))
    summary = {"meta": meta, **summary}
    write_json_atomic(report.with_suffix(".json"), summary)
    write_text_atomic(report, render_markdown(summary))
    return summary


@flow(name="study", flow_run_name="study-{profile}", log_prints=True)
def study(
    study_file: str = "study.yaml",
    profile: str | None = None,
    root: str = ".",
    arms: list[str] | None = None,
    seeds: list[int] | None = None,
    command: str | None = None,
) -> dict:
    """Run (or resume) the study of ``study_file``'s ``profile`` in ``root``; returns the report summary."""
    logger = _logger()
    base = Path(root).resolve()
    spec = select(load_study(base / study_file, profile), arms, seeds)
    runs = plan(spec)
    configs = resolve(spec, runs, base)
    first = next(iter(configs.values()))
    meta = {
        "study_profile": profile,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": command or shlex.join(["herl", "study", "--study", study_file, "--profile", str(profile)]),
        "params": spec.params,
        "report": spec.report,
        "params_profile": spec.params_profile,
        "seeds": spec.seeds,
        "budget": {k: getattr(getattr(first, k.split(".")[0]), k.split(".")[1]) for k in BUDGET_KEYS},
        "runs": [{"name": r["name"], "commands": [shell_line(c) for c in r["commands"]]} for r in runs],
    }
    with study_lock(base / spec.out_dir):
        client, uri, ids = open_mlflow(spec, first, base, profile)
        try:
            ensure_data(spec, first, base, command_env(ids["study"], uri))
            for run, row in zip(runs, meta["runs"], strict=True):
                row["reused"] = is_finished(run, base, configs[run["name"]].hash())
                if row["reused"]:
                    logger.info("%s: finished earlier, reused", run["name"])
                    continue
                record = {"config_hash": configs[run["name"]].hash(), "overrides": run["overrides"]}
                write_json_atomic(base / run["dir"] / RUN_FILE, record)
                env = command_env(ids[run["arm"]], uri)
                for cmd in run["commands"]:
                    label = f"{run['name']}: herl {cmd[1]}"
                    run_command(cmd, str(base), f"{run['dir']}/study.log", env, label=label)
            summary = write_report(spec, runs, configs, base, meta)
        except BaseException as exc:
            for run_id in ids.values():
                client.set_terminated(run_id, "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
            raise
        report = base / spec.report
        files = [report, report.with_suffix(".json"), *(report.parent / p for p in meta["plots"].values())]
        log_summary(client, ids, summary, files)
    logger.info("report: %s", report)
    return summary


def rerender(study_file: str = "study.yaml", profile: str | None = None, root: str = ".") -> dict:
    """Rewrite study.md / study.json / plots from the finished run folders, running nothing (``--report-only``):
    for a report whose aggregation or layout changed after the runs. Every run of the plan must be finished; the
    original meta (command, dates, run commands) is kept and the re-render time is added."""
    base = Path(root).resolve()
    spec = load_study(base / study_file, profile)
    previous = base / Path(spec.report).with_suffix(".json")
    if not previous.is_file():
        raise StudyError(f"--report-only: {previous} not found: run the study first")
    runs = plan(spec)
    missing = [r["name"] for r in runs if not (base / eval_metrics_path(r)).is_file()]
    if missing:
        raise StudyError(f"--report-only: these runs have not finished: {', '.join(missing)}")
    configs = {r["name"]: load_params(base / spec.params, spec.params_profile, r["overrides"]) for r in runs}
    meta = {**json.loads(previous.read_text(encoding="utf-8"))["meta"]}
    meta["rerendered"] = datetime.now(UTC).isoformat(timespec="seconds")
    return write_report(spec, runs, configs, base, meta)
