"""Prefect flow ``study``: HeRL vs GRPO (+ baselines and ablation) over seeds, then the report (spec §7;
docs/study.md).

What it does (the plan: flows/study_plan.py; the report: flows/study_report.py; the statistics: herl_core.stats):

1. load ``study.yaml`` (a profile), resolve and validate the params config of every run before running anything,
   and check the trained arms share one budget;
2. ``herl prepare`` into ``<out_dir>/data`` (skipped when done under the same settings); the data's fingerprint is
   kept in ``<results_dir>/data.json`` and a later machine must prepare the same bytes;
3. phase ``train``, per run: ``herl train`` with validation (``val/*`` every ``train.eval_every`` steps and after
   the last update: the primary metric); phase ``broad``, per run: ``herl evaluate`` on IFEval / IFBench (base
   included). Each finished phase of a run copies its small results (steps.jsonl, validation curves and per-prompt
   outcomes, evaluation metrics and per-prompt verdicts, the resolved config, the commit, the commands, wall time)
   to ``<results_dir>/<name>/`` and, with ``commit``, commits them. A phase whose results exist under the same
   config is skipped, whichever machine made them; a finished phase of another config is an error. An
   interrupted ``herl train`` resumes from its checkpoint. The broad phase of a run whose policy folder is not on
   this machine (trained elsewhere: weights are never committed) retrains it first and records that;
4. render the report from ``<results_dir>`` alone → ``report`` (.md), .json, PNG plots (``rerender`` does only
   this: ``herl study --report-only``).

These runs are experiments, not pipeline outputs: nothing is written to DVC-tracked paths (data/prepared,
models/policy, reports/train, reports/evaluate), and dvc.yaml has no study stage (docs/study.md).

MLflow: this flow creates, with ``MlflowClient`` and explicit run ids, a parent run ``study`` and one child run per
arm (per arm and variant); each run's stage commands run with ``HERL_MLFLOW_PARENT_RUN_ID`` = that child's id, so
their own ``train`` / ``evaluate`` runs (flows/tracking.py) nest under it. After the report the children get the
aggregated metrics and the parent the report files. The ids are kept in ``<out_dir>/mlflow_runs.json``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from flows.proc import child_env, exclusive_lock, stream
from flows.study_plan import (
    PHASE_SECTIONS,
    PHASES,
    StudyConfig,
    StudyError,
    check_equal_budget,
    data_dir,
    load_study,
    plan,
    prepare_command,
    shell_line,
)
from flows.study_report import RUN_RECORD, build_report, plot_all, render_markdown
from herl_core.config import Config, load_params
from herl_core.io import write_json_atomic, write_jsonl_atomic, write_text_atomic

RUN_FILE = "study_run.json"
RUNS_FILE = "mlflow_runs.json"
LOCK_FILE = ".study.lock"
DATA_RECORD = "data.json"
TAIL_LINES = 30
TRAIN_FILES = ("steps.jsonl", "summary.json", "validation_final.json", "val_outcomes.jsonl")
"""What the train phase keeps of ``train.report_dir`` (the rollouts, experiences and merges stay in the run folder:
they hold every sampled text and are large)."""


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
# resume bookkeeping: a phase is finished when its results are in results_dir under the same config


@contextmanager
def study_lock(out_dir: Path) -> Iterator[None]:
    """One study per ``out_dir`` at a time (``flows.proc.exclusive_lock`` on ``<out_dir>/.study.lock``)."""
    lock = out_dir / LOCK_FILE

    def busy(holder: str) -> StudyError:
        return StudyError(f"another study is running in {out_dir} ({holder}; lock {lock})")

    with exclusive_lock(lock, busy):
        yield


def phase_hash(cfg: Config, phase: str) -> str:
    """The hash of the config sections a phase reads (PHASE_SECTIONS)."""
    return cfg.hash(PHASE_SECTIONS[phase])


def read_record(results: Path) -> dict[str, Any]:
    """``<results>/study_run.json`` ({} when absent)."""
    path = results / RUN_RECORD
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def phase_finished(run: dict[str, Any], phase: str, root: Path, config_hash: str) -> bool:
    """True when ``run``'s results hold ``phase`` under the same config; results of another config raise."""
    results = root / run["results"]
    made = read_record(results).get("phases", {}).get(phase)
    if made is None:
        return False
    if made.get("config_hash") != config_hash:
        raise StudyError(
            f"{results} holds the {phase} phase of a run made under config {made.get('config_hash')}, not "
            f"{config_hash}: delete that folder (and {run['dir']}) to recompute it, or set another results_dir and "
            "out_dir in study.yaml"
        )
    return True


def resolve(study: StudyConfig, runs: list[dict[str, Any]], root: Path) -> dict[str, Config]:
    """Load and validate the params config of every run (fails before anything runs); check the budget."""
    configs = {r["name"]: load_params(root / study.params, study.params_profile, r["overrides"]) for r in runs}
    check_equal_budget({r["name"]: configs[r["name"]] for r in runs if r["arm"] != "base"}, runs)
    return configs


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def ensure_data(study: StudyConfig, cfg: Config, root: Path, env: dict[str, str]) -> None:
    """``herl prepare`` into the study's data folder unless done under the same ``prepare`` settings (else raise);
    then check the prepared files against ``<results_dir>/data.json`` (written the first time): results made from
    other data are never mixed with new runs."""
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
    else:
        run_command(prepare_command(study), str(root), f"{study.out_dir}/prepare.log", env, label="prepare")
        write_json_atomic(record, {"prepare": settings})
    files = {name: _sha256(folder / name) for name in ("train.jsonl", "val.jsonl") if (folder / name).is_file()}
    committed = root / study.results_dir / DATA_RECORD
    if committed.is_file():
        known = json.loads(committed.read_text(encoding="utf-8"))
        if known.get("sha256") != files:
            raise StudyError(
                f"{folder} differs from the data the results in {study.results_dir} were made from "
                f"({committed}: {known.get('sha256')}; prepared here: {files})"
            )
        return
    report = json.loads((folder / "report.json").read_text(encoding="utf-8"))
    write_json_atomic(committed, {"prepare": settings, "sha256": files, "report": report})


def host_info() -> dict[str, Any]:
    """CPU model, cores and the load average when a phase ended (wall times depend on both)."""
    model = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {"cpu": model, "cores": os.cpu_count(), "load_avg_1_5_15": list(load) if load else None}


def _outcome_row(sample: dict[str, Any]) -> dict[str, Any]:
    """One evaluated prompt without its texts: the verdicts a paired comparison needs."""
    keep = ("id", "round", "prompt_strict", "prompt_loose", "instructions", "truncated", "response_tokens")
    return {k: sample[k] for k in keep if k in sample}


def save_results(
    run: dict[str, Any], phase: str, cfg: Config, root: Path, entry: dict[str, Any], benchmarks: list[str]
) -> Path:
    """Copy ``phase``'s small results of ``run`` into ``<results_dir>/<name>/``, then record the phase in
    study_run.json (written last: a phase is finished only once everything it lists is there)."""
    src, dst = root / run["dir"], root / run["results"]
    if phase == "train":
        for name in TRAIN_FILES:
            if (src / "train" / name).is_file():
                (dst / "train").mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src / "train" / name, dst / "train" / name)
    else:
        evaluate = src / "evaluate"
        (dst / "evaluate").mkdir(parents=True, exist_ok=True)
        shutil.copyfile(evaluate / "metrics.json", dst / "evaluate" / "metrics.json")
        for bench in benchmarks:
            (dst / "evaluate" / bench).mkdir(parents=True, exist_ok=True)
            for name in ("metrics.json", "per_type.json"):
                shutil.copyfile(evaluate / bench / name, dst / "evaluate" / bench / name)
            samples = [json.loads(x) for x in (evaluate / bench / "samples.jsonl").read_text().splitlines() if x]
            write_jsonl_atomic(dst / "evaluate" / bench / "outcomes.jsonl", [_outcome_row(s) for s in samples])
    write_json_atomic(dst / "config.json", cfg.model_dump(mode="json"))
    record = read_record(dst)
    record.update({k: run[k] for k in ("name", "arm", "variant", "seed", "overrides")})
    record.setdefault("phases", {})[phase] = entry
    write_json_atomic(dst / RUN_RECORD, record)
    return dst


def git_commit(root: Path, paths: list[Path], message: str) -> str | None:
    """Commit ``paths`` (and only them) in ``root``'s repository; returns the new commit, or None when there was
    nothing to commit or git refused (a warning: the results stay on disk and the next commit takes them)."""
    rel = [str(p.relative_to(root)) for p in paths if p.exists()]
    if not rel:
        return None

    def git(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=120)

    added = git("add", "--", *rel)
    if added.returncode != 0:
        _logger().warning("git add %s failed: %s", rel, added.stderr.strip())
        return None
    if git("diff", "--cached", "--quiet", "--", *rel).returncode == 0:
        return None
    done = git("commit", "-m", message, "--only", "--", *rel)
    if done.returncode != 0:
        _logger().warning("git commit of %s failed: %s", rel, done.stderr.strip())
        return None
    return git("rev-parse", "HEAD").stdout.strip()


# --------------------------------------------------------------------------------------------------------------------
# MLflow: parent "study", one child per arm (and variant)


def group_of(run: dict[str, Any]) -> str:
    """The MLflow child run a run's stage runs nest under: the arm, or ``<arm>-<variant>``."""
    return f"{run['arm']}-{run['variant']}" if run.get("variant") else run["arm"]


def open_mlflow(
    study: StudyConfig, runs: list[dict[str, Any]], cfg: Config, root: Path, profile: str | None
) -> tuple[Any, str, dict[str, str]]:
    """(client, tracking uri, {"study": id, <group>: id}); ids reused from ``<out_dir>/mlflow_runs.json`` if live."""
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
    for group in dict.fromkeys(group_of(r) for r in runs):
        arm = group.split("-", 1)[0]
        if group not in ids:
            arm_tags = {"mlflow.parentRunId": ids["study"], "herl.arm": arm}
            ids[group] = client.create_run(exp, run_name=group, tags=arm_tags).info.run_id
        set_tags(client, ids[group], {**tags, "herl.stage": "study-arm", "herl.arm": arm})
    write_json_atomic(saved_path, {"tracking_uri": uri, "runs": ids})
    return client, uri, ids


def log_summary(client: Any, ids: dict[str, str], summary: dict[str, Any], files: list[Path]) -> None:
    """Child runs: the aggregated primary metric and diagnostics (mean, ci95); the parent: the report files."""
    from mlflow.entities import Metric

    now = int(datetime.now(UTC).timestamp() * 1000)
    for group, run_id in ids.items():
        if group == "study":
            continue
        rows = []
        for key, ci in (summary["arms"].get(group) or {}).get("metrics", {}).items():
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


def write_report(study: StudyConfig, profile: str | None, study_file: str, root: Path) -> dict[str, Any]:
    """Render the report of the FULL plan of ``study_file``'s profile from ``<results_dir>`` alone (finished runs
    only; the rest is listed as remaining): report .md, .json and plots. Deterministic: the same results give the
    same files."""
    summary = build_report(study, plan(study), root, profile, study_file)
    report = root / study.report
    summary["plots"] = {
        k: str(p.relative_to(report.parent)) for k, p in plot_all(summary, report.with_suffix("")).items() if p
    }
    write_json_atomic(report.with_suffix(".json"), summary)
    write_text_atomic(report, render_markdown(summary))
    return summary


def _run_phase(run: dict[str, Any], phase: str, cfg: Config, base: Path, env: dict[str, str]) -> dict[str, Any]:
    """Run the commands of one phase of one run; returns the phase's record (commit, commands, times, host)."""
    from flows.tracking import git_info

    commands = list(run["commands"][phase])
    retrained = phase == "broad" and run["arm"] != "base" and not (base / run["dir"] / "policy").is_dir()
    if retrained:  # trained on another machine: weights are not committed, so train again (it resumes if it can)
        commands = run["commands"]["train"] + commands
    started, t0 = datetime.now(UTC), time.perf_counter()
    for cmd in commands:
        run_command(cmd, str(base), f"{run['dir']}/study.log", env, label=f"{run['name']}: herl {cmd[1]}")
    info = git_info(base)
    return {
        "config_hash": phase_hash(cfg, phase),
        "commit": info["mlflow.source.git.commit"],
        "dirty": info["herl.git.dirty"] == "true",
        "commands": [shell_line(c) for c in commands],
        "started": started.isoformat(timespec="seconds"),
        "finished": datetime.now(UTC).isoformat(timespec="seconds"),
        "wall_s": round(time.perf_counter() - t0, 1),
        "host": host_info(),
        **({"retrained": True} if retrained else {}),
    }


@flow(name="study", flow_run_name="study-{profile}", log_prints=True)
def study(
    study_file: str = "study.yaml",
    profile: str | None = None,
    root: str = ".",
    arms: list[str] | None = None,
    seeds: list[int] | None = None,
    phases: list[str] | None = None,
    command: str | None = None,
    commit: bool = False,
) -> dict:
    """Run (or resume) the study of ``study_file``'s ``profile`` in ``root``; returns the report summary.
    ``arms``/``seeds`` restrict what runs (the report covers the whole plan); ``phases`` (default: the profile's)
    picks train and/or broad; ``commit`` commits each finished phase's results and, at the end, the report."""
    logger = _logger()
    base = Path(root).resolve()
    full = load_study(base / study_file, profile)
    spec = select(full, arms, seeds)
    runs = plan(spec)
    configs = resolve(spec, runs, base)
    first = next(iter(configs.values()))
    chosen = [p for p in PHASES if p in (phases or spec.phases)]
    line = command or shlex.join(["herl", "study", "--study", study_file, "--profile", str(profile)])
    with study_lock(base / spec.out_dir):
        client, uri, ids = open_mlflow(spec, runs, first, base, profile)
        try:
            ensure_data(spec, first, base, command_env(ids["study"], uri))
            if commit:
                git_commit(base, [base / spec.results_dir / DATA_RECORD], f"study {profile}: data fingerprint")
            for phase in chosen:
                for run in runs:
                    cfg = configs[run["name"]]
                    if not run["commands"][phase]:
                        continue
                    if phase_finished(run, phase, base, phase_hash(cfg, phase)):
                        logger.info("%s %s: finished earlier, reused", run["name"], phase)
                        continue
                    entry = _run_phase(run, phase, cfg, base, command_env(ids[group_of(run)], uri))
                    entry["study_command"] = line
                    folder = save_results(run, phase, cfg, base, entry, list(cfg.evaluate.benchmarks))
                    logger.info("%s %s: finished in %.0f s, results in %s", run["name"], phase, entry["wall_s"], folder)
                    if commit:
                        git_commit(base, [folder], f"study {profile}: {run['name']} {phase} phase finished")
            summary = write_report(full, profile, study_file, base)
        except BaseException as exc:
            for run_id in ids.values():
                client.set_terminated(run_id, "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
            raise
        report = base / full.report
        files = [report, report.with_suffix(".json"), *(report.parent / p for p in summary["plots"].values())]
        if commit:
            git_commit(base, files, f"study {profile}: report ({summary['status']['line']})")
        log_summary(client, ids, summary, files)
    logger.info("report: %s", report)
    return summary


def rerender(study_file: str = "study.yaml", profile: str | None = None, root: str = ".") -> dict:
    """Rewrite the report from ``<results_dir>`` alone, running nothing (``--report-only``): on a fresh clone, after
    a change of the report's layout, or to see where a study stands. Finished runs are reported, the others listed
    as remaining with the command that continues the study."""
    base = Path(root).resolve()
    spec = load_study(base / study_file, profile)
    if not (base / spec.results_dir).is_dir():
        raise StudyError(f"--report-only: {spec.results_dir} not found: no run of this study has finished")
    return write_report(spec, profile, study_file, base)
