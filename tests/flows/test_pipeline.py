"""flows/pipeline.py with the real tools: Prefect (test harness and a real `prefect server`), DVC in a temp git repo,
MLflow on a temp sqlite store.

The temp repo has its own two-stage dvc.yaml (stages ``prepare`` and ``rollout``) whose commands call
flows.tracking.stage_run like the real stage commands do; this keeps the tests to seconds and independent of the
model stages.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import httpx
import pytest
import yaml
from mlflow import MlflowClient

from flows.pipeline import (
    LOCK_FILE,
    STAGES,
    StageError,
    WorkspaceBusy,
    is_transient,
    pipeline,
    retry_if_transient,
)

pytestmark = pytest.mark.integration
MAIN = Path(__file__).resolve().parents[2]

STAGE_PY = textwrap.dedent(
    """
    import os, sys, time
    from pathlib import Path
    from herl_core.config import load_params
    from flows.tracking import stage_run

    stage = sys.argv[1]
    cfg = load_params("params.yaml")
    with stage_run(cfg, stage) as tracker:
        gate = os.environ.get("HERL_TEST_GATE")
        if gate:  # hold the stage (and the pipeline's workspace lock) until the test opens the gate
            Path(gate + ".started").touch()
            while not Path(gate).exists():
                time.sleep(0.1)
        src = {"prepare": "raw.txt", "rollout": "out/prepare.txt"}[stage]
        Path("out").mkdir(exist_ok=True)
        text = Path(src).read_text() + stage + "\\n"
        Path(f"out/{stage}.txt").write_text(text)
        tracker.sink.log_metrics({"lines": len(text.splitlines())}, 0)
        tracker.finish({"lines": len(text.splitlines())})
    """
)

DVC_YAML = {
    "stages": {
        "prepare": {
            "cmd": "python stage.py prepare",
            "deps": ["stage.py", "raw.txt"],
            "params": ["prepare.seed"],
            "outs": ["out/prepare.txt"],
        },
        "rollout": {
            "cmd": "python stage.py rollout",
            "deps": ["stage.py", "out/prepare.txt"],
            "outs": ["out/rollout.txt"],
        },
    }
}


def init_dvc_repo(root: Path, init_repo) -> None:
    """A git repo with a first commit, then ``dvc init`` committed on top (what `dvc repro` and `exp run` need)."""
    init_repo(root)
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=root, check=True)
    subprocess.run(["git", "add", "-A"], cwd=root, check=True)
    subprocess.run(["git", "commit", "-qm", "dvc init"], cwd=root, check=True)


@pytest.fixture
def repo(tmp_path, mlflow_uri, monkeypatch, init_repo, request) -> Path:
    """A git + DVC repo: the project's params.yaml on the tiny profile (own experiment), stage.py, dvc.yaml."""
    params = (MAIN / "params.yaml").read_text()
    params = params.replace("profile: cpu", "profile: tiny", 1).replace(
        "experiment: herl-tiny", f"experiment: p-{request.node.name}"
    )
    (tmp_path / "params.yaml").write_text(params)
    (tmp_path / "stage.py").write_text(STAGE_PY)
    (tmp_path / "raw.txt").write_text("raw\n")
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump(DVC_YAML, sort_keys=False))
    (tmp_path / ".gitignore").write_text(".herl/\nmlartifacts/\n")
    init_dvc_repo(tmp_path, init_repo)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_uri)
    monkeypatch.setenv("DVC_NO_ANALYTICS", "1")
    return tmp_path


def lock_md5(root: Path, stage: str, path: str) -> str:
    lock = yaml.safe_load((root / "dvc.lock").read_text())["stages"][stage]
    return next(o["md5"] for o in lock["outs"] if o["path"] == path)


def flow_runs_by_name() -> dict[str, list]:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        flows = {f.id: f.name for f in client.read_flows()}
        runs = client.read_flow_runs()
    out: dict[str, list] = {}
    for run in runs:
        out.setdefault(flows[run.flow_id], []).append(run)
    return out


# ------------------------------------------------------------------------------------------------------ unit-level


def test_stage_names_match_herl_core():
    from herl_core.stages import STAGES as CORE

    assert STAGES == CORE


def test_only_transient_failures_are_retried():
    assert is_transient(1, "ERROR: Unable to acquire lock. Most likely another DVC process is running")
    assert is_transient(1, "httpx.ConnectError: [Errno 111] Connection refused")
    assert not is_transient(2, "Connection refused")  # exit 2 = usage/config: never retried
    assert not is_transient(1, "herl_core.config.ConfigError: invalid config ... timed out")  # config wins
    assert not is_transient(1, "ZeroDivisionError: division by zero")  # unknown: fail fast

    class State:
        def __init__(self, exc):
            self.exc = exc

        def result(self):
            raise self.exc

    assert retry_if_transient(None, None, State(StageError("train", 1, "database is locked", True)))
    assert not retry_if_transient(None, None, State(StageError("train", 1, "DataError", False)))
    assert retry_if_transient(None, None, State(OSError("disk hiccup")))
    assert not retry_if_transient(None, None, State(ValueError("bad")))


# ------------------------------------------------------------------------------------------------------ flows


def test_pipeline_runs_stages_as_flows_with_mlflow_children_and_fresh_lock_tags(repo):
    result = pipeline(root=str(repo), stages=["prepare", "rollout"])
    assert (repo / "out/rollout.txt").read_text() == "raw\nprepare\nrollout\n"
    runs = flow_runs_by_name()
    for name in ("pipeline", "prepare", "rollout"):
        assert runs[name] and all(r.state.is_completed() for r in runs[name]), name
    client = MlflowClient()
    parent = client.get_run(result["parent_run_id"])
    assert parent.info.status == "FINISHED" and parent.data.tags["herl.stage"] == "pipeline"
    assert parent.data.tags["prefect.flow_run_id"] in {str(r.id) for r in runs["pipeline"]}
    children = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'"
    )
    assert sorted(c.info.run_name for c in children) == ["prepare", "rollout"]
    stage_flow_ids = {str(r.id) for name in ("prepare", "rollout") for r in runs[name]}
    for child in children:
        stage = child.info.run_name
        # the md5 in dvc.lock AFTER the stage ran (the stage itself could only see the previous lock: none)
        assert child.data.tags[f"dvc.out.out/{stage}.txt.md5"] == lock_md5(repo, stage, f"out/{stage}.txt")
        assert child.data.tags["prefect.flow_run_id"] in stage_flow_ids
        assert child.info.status == "FINISHED" and child.data.metrics["lines"] == {"prepare": 2, "rollout": 3}[stage]
    assert result["stages"] == {c.info.run_name: c.info.run_id for c in children}
    assert parent.data.tags["dvc.out.out/rollout.txt.md5"] == lock_md5(repo, "rollout", "out/rollout.txt")

    again = pipeline(root=str(repo), stages=["prepare", "rollout"])  # nothing changed: DVC skips both stages
    assert again["stages"] == {"prepare": "skipped (unchanged)", "rollout": "skipped (unchanged)"}


def test_herl_pipeline_prints_stage_headers_the_stage_output_and_one_closing_block(repo, monkeypatch):
    """The console of `herl pipeline`: a header per stage, the stage's own lines, DVC's advice (git add dvc.lock,
    autostage, dvc push) once in the closing block instead of after every stage, and where to look next; the whole
    output is in the log file the block names. No JSON on stdout without --json."""
    from typer.testing import CliRunner

    from flows.cli import app

    monkeypatch.chdir(repo)
    result = CliRunner().invoke(app, ["pipeline", "--stages", "prepare,rollout"])
    assert result.exit_code == 0, result.output
    err = result.stderr
    assert err.index("[1/2] prepare") < err.index("[2/2] rollout") < err.index("herl pipeline done in")
    assert err.count("git add dvc.lock") == 1 and "autostage" not in err and err.count("dvc push") == 1
    assert "Beginning flow run" not in err  # Prefect's own lines go to its API only (--verbose shows them)
    client = MlflowClient()
    experiments = [e.experiment_id for e in client.search_experiments()]
    (parent,) = client.search_runs(
        experiments, "attributes.run_name = 'pipeline'", order_by=["attributes.start_time DESC"], max_results=1
    )
    table = f"#/experiments/{parent.info.experiment_id}/runs?viewStateShareKey=herl&workflowType=machine_learning"
    assert table in err and f"row 'pipeline' {parent.info.run_id[:8]}" in err
    (log,) = (repo / ".herl" / "logs").glob("pipeline-*.log")
    assert f"full log  .herl/logs/{log.name}" in err
    text = log.read_text()
    assert text.count("To enable auto staging") == 2 and "==> prepare:" in text and "==> rollout:" in text
    assert result.stdout == ""
    subprocess.run(["git", "add", "dvc.lock"], cwd=repo, check=True)
    subprocess.run(["git", "commit", "-qm", "record the run"], cwd=repo, check=True)
    again = CliRunner().invoke(app, ["pipeline", "--stages", "prepare,rollout", "--json"])
    assert again.exit_code == 0 and "git add dvc.lock" not in again.stderr  # dvc.lock is committed: no advice
    assert again.stderr.count("skipped: nothing it reads changed") == 2
    assert json.loads(again.stdout)["stages"] == {"prepare": "skipped (unchanged)", "rollout": "skipped (unchanged)"}


def test_tags_reach_every_stage_flow_and_task_run_under_a_tag_concurrency_limit(repo):
    """`herl pipeline --tag gpu-0` (docs/scaling.md L4): the tag is on the stage flow runs and on their dvc-repro
    task runs, which is what a tag-based concurrency limit counts; with such a limit of 1 the stages still run (one
    slot each, in turn) and every slot is released at the end."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import TaskRunFilter, TaskRunFilterTags

    with get_client(sync_client=True) as client:
        client.create_concurrency_limit(tag="gpu-t1", concurrency_limit=1)
    pipeline(root=str(repo), stages=["prepare", "rollout"], tags=["gpu-t1"])
    runs = flow_runs_by_name()
    tagged = [r for name in ("prepare", "rollout") for r in runs[name] if "gpu-t1" in r.tags]
    assert len(tagged) == 2 and all(r.state.is_completed() for r in tagged)
    with get_client(sync_client=True) as client:
        tasks = client.read_task_runs(task_run_filter=TaskRunFilter(tags=TaskRunFilterTags(all_=["gpu-t1"])))
        limit = client.read_concurrency_limit_by_tag("gpu-t1")
    repro = sorted(t.name for t in tasks if t.name.startswith("dvc repro"))  # (the rest: subflow placeholders)
    assert repro == ["dvc repro prepare", "dvc repro rollout"]
    assert all(t.state.is_completed() for t in tasks)
    assert limit.concurrency_limit == 1 and list(limit.active_slots) == []  # taken in turn, all given back


def test_profile_request_that_disagrees_with_params_is_refused(repo):
    with pytest.raises(ValueError, match="dvc exp run -S profile=cpu"):
        pipeline(root=str(repo), profile="cpu", stages=["prepare"])
    assert not (repo / "dvc.lock").exists()  # nothing ran


def test_second_concurrent_pipeline_is_refused_and_the_first_completes(repo, tmp_path_factory):
    import typer
    from prefect.settings import PREFECT_API_URL
    from typer.testing import CliRunner

    from flows.pipeline_cli import register

    gate = tmp_path_factory.mktemp("gate") / "open"
    env = {**os.environ, "HERL_TEST_GATE": str(gate), "PREFECT_API_URL": PREFECT_API_URL.value()}
    code = f"from flows.pipeline import pipeline; pipeline(root={str(repo)!r}, stages=['prepare'])"
    first = subprocess.Popen([sys.executable, "-c", code], cwd=repo, env=env)
    try:
        deadline = time.time() + 90
        while not Path(str(gate) + ".started").exists():  # the stage runs: the first pipeline holds the lock
            assert first.poll() is None and time.time() < deadline, "first pipeline did not start its stage"
            time.sleep(0.2)
        assert (repo / LOCK_FILE).read_text().startswith(f"pid {first.pid}, started ")
        message = f"another herl pipeline is running in this workspace (pid {first.pid}, started "
        with pytest.raises(WorkspaceBusy, match=r"wait for it or use `dvc exp run --queue`") as refused:
            pipeline(root=str(repo), stages=["prepare"])
        assert message in str(refused.value)
        app = typer.Typer()
        register(app)
        t0 = time.time()
        cli = CliRunner().invoke(app, ["pipeline", "--params", str(repo / "params.yaml"), "--stages", "prepare"])
        assert cli.exit_code == 3 and message in " ".join(cli.output.split())
        assert time.time() - t0 < 5  # refused at once, before any Prefect or DVC work
        assert first.poll() is None  # the first is unharmed
        gate.touch()
        assert first.wait(timeout=120) == 0
    finally:
        gate.touch()
        if first.poll() is None:
            first.kill()
    assert (repo / "out/prepare.txt").read_text() == "raw\nprepare\n"
    assert "prepare" in yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    assert (repo / LOCK_FILE).read_text() == ""  # released


# ------------------------------------------------------------------------------------------------------ deployment


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(check, timeout: float, what: str):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            value = check()
        except httpx.HTTPError:
            value = None
        if value:
            return value
        time.sleep(1)
    raise AssertionError(f"timed out waiting for {what}")


def test_cron_deployment_registers_and_runs_on_a_real_prefect_server(repo, tmp_path_factory):
    home = tmp_path_factory.mktemp("prefect-server")
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {
        **os.environ,
        "PREFECT_HOME": str(home),
        "PREFECT_API_URL": api,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "2",
    }
    prefect = [sys.executable, "-m", "prefect"]
    server = subprocess.Popen(
        [*prefect, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    serve = None
    try:
        wait_for(lambda: httpx.get(f"{api}/health", timeout=2).json() is True, 90, "prefect server health")
        code = (
            "from flows.deploy import serve_pipeline; "
            f"serve_pipeline(name='nightly', cron='0 3 * * *', root={str(repo)!r}, stages=['prepare'])"
        )
        serve = subprocess.Popen([sys.executable, "-c", code], cwd=MAIN, env=env, start_new_session=True)
        dep = wait_for(
            lambda: (
                (r := httpx.get(f"{api}/deployments/name/pipeline/nightly", timeout=5)).status_code == 200 and r.json()
            ),
            60,
            "deployment pipeline/nightly",
        )
        assert [s["schedule"]["cron"] for s in dep["schedules"]] == ["0 3 * * *"]
        assert dep["parameters"] == {"root": str(repo.resolve()), "params": "params.yaml", "stages": ["prepare"]}
        subprocess.run([*prefect, "deployment", "run", "pipeline/nightly"], env=env, check=True, capture_output=True)

        def runs(state: str):
            body = {"deployments": {"id": {"any_": [dep["id"]]}}, "flow_runs": {"state": {"type": {"any_": [state]}}}}
            return httpx.post(f"{api}/flow_runs/filter", json=body, timeout=5).json()

        done = wait_for(lambda: runs("COMPLETED"), 120, "the triggered deployment run to complete")
        assert len(done) == 1 and (repo / "out/prepare.txt").read_text() == "raw\nprepare\n"
        wait_for(lambda: runs("SCHEDULED"), 30, "cron runs scheduled by the server")  # the scheduler works
    finally:
        for proc in (serve, server):
            if proc is not None and proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)


@pytest.mark.slow
def test_real_dvc_yaml_runs_all_five_stages_on_the_tiny_profile(tmp_path, mlflow_uri, monkeypatch, init_repo):
    """The project's dvc.yaml and stage commands, end to end on the tiny profile (the README's chain, small)."""
    import shutil

    if not (MAIN / "dvc.yaml").is_file():
        pytest.fail("dvc.yaml is missing from the project")
    params = (MAIN / "params.yaml").read_text().replace("profile: cpu", "profile: tiny", 1)
    (tmp_path / "params.yaml").write_text(params)
    shutil.copy(MAIN / "dvc.yaml", tmp_path / "dvc.yaml")
    shutil.copytree(MAIN / "herl_core", tmp_path / "herl_core", ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / "scripts").mkdir()
    shutil.copy2(MAIN / "scripts" / "herl", tmp_path / "scripts" / "herl")  # dvc.yaml's stage command
    (tmp_path / ".gitignore").write_text(".herl/\nmlartifacts/\n")
    init_dvc_repo(tmp_path, init_repo)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_uri)
    result = pipeline(root=str(tmp_path))
    lock = yaml.safe_load((tmp_path / "dvc.lock").read_text())["stages"]
    assert sorted(lock) == sorted(STAGES)
    client = MlflowClient()
    children = {s: client.get_run(rid) for s, rid in result["stages"].items()}
    assert sorted(children) == sorted(STAGES) and all(r.info.status == "FINISHED" for r in children.values())
    for stage, run in children.items():
        for out in lock[stage]["outs"]:
            assert run.data.tags[f"dvc.out.{out['path']}.md5"] == out["md5"]
    parent = client.get_run(result["parent_run_id"])
    assert parent.data.tags["herl.evaluate_run_id"] == children["evaluate"].info.run_id
    assert result["metrics"] and result["metrics"] == {k: parent.data.metrics[k] for k in result["metrics"]}
    assert "herl-policy" in {m.name for m in client.search_registered_models()}
