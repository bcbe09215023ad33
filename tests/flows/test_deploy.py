"""flows/deploy.py on a real Prefect API (the session's test harness): `herl deploy --work-pool`.

The served way (`herl deploy` without --work-pool) is tested end to end on a real `prefect server` in
test_pipeline.py::test_cron_deployment_registers_and_runs_on_a_real_prefect_server.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from flows.cli import app
from flows.deploy import CODE_ROOT, ENTRYPOINT, NoServerError, WorkPoolError, deploy_to_pool, ensure_process_pool

MAIN = Path(__file__).resolve().parents[2]


def client():
    from prefect.client.orchestration import get_client

    return get_client(sync_client=True)


def read(deployment_name: str, pool: str):
    with client() as c:
        return c.read_deployment_by_name(deployment_name), c.read_work_pool(pool)


# ------------------------------------------------------------------------------------------------------ no server


def test_no_server_is_refused_clearly_before_touching_anything(tmp_path):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(restore_defaults={PREFECT_API_URL}):
        with pytest.raises(NoServerError, match="prefect server start"):
            deploy_to_pool("local", root=tmp_path)
        (tmp_path / "params.yaml").write_text("profile: tiny\n")
        out = CliRunner().invoke(app, ["deploy", "--work-pool", "local", "--params", str(tmp_path / "params.yaml")])
    assert out.exit_code == 2 and "PREFECT_API_URL is not set" in out.output


def test_concurrency_limit_needs_a_work_pool_and_must_be_positive(tmp_path):
    out = CliRunner().invoke(app, ["deploy", "--concurrency-limit", "2", "--params", str(tmp_path / "params.yaml")])
    assert out.exit_code == 2 and "give --work-pool NAME too" in out.output
    with pytest.raises(ValueError, match=">= 1, got 0"):
        deploy_to_pool("local", root=tmp_path, concurrency_limit=0)


# ------------------------------------------------------------------------------------------------------ on a pool


def test_cli_registers_the_cron_deployment_on_a_new_process_pool(tmp_path, prefect_harness):
    params = tmp_path / "params.yaml"
    params.write_text("profile: tiny\n")
    args = ["deploy", "--work-pool", "gpu-box", "--concurrency-limit", "2", "--name", "hourly", "--tag", "gpu-0"]
    out = CliRunner().invoke(
        app, [*args, "--cron", "0 * * * *", "--params", str(params), "--stages", "prepare,rollout"]
    )
    assert out.exit_code == 0, out.output
    assert "prefect worker start --pool gpu-box" in out.output

    dep, pool = read("pipeline/hourly", "gpu-box")
    assert (pool.type, pool.concurrency_limit) == ("process", 2)
    assert "command" in pool.base_job_template["variables"]["properties"]  # the process worker's default template
    assert dep.work_pool_name == "gpu-box" and dep.entrypoint == ENTRYPOINT == "flows/pipeline.py:pipeline"
    assert dep.parameters == {
        "root": str(tmp_path.resolve()),
        "params": "params.yaml",
        "stages": ["prepare", "rollout"],
        "tags": ["gpu-0"],  # the flow puts them on every stage flow and task run (test_pipeline.py)
    }
    assert [s.schedule.cron for s in dep.schedules] == ["0 * * * *"]
    assert dep.pull_steps == [{"prefect.deployments.steps.set_working_directory": {"directory": str(CODE_ROOT)}}]
    assert (CODE_ROOT / ENTRYPOINT.split(":")[0]).is_file()  # the worker finds the flow file there
    assert dep.job_variables == {"working_dir": str(tmp_path.resolve())}
    assert dep.global_concurrency_limit.limit == 1  # one pipeline per workspace
    assert dep.tags == ["herl"]


def test_existing_pool_keeps_its_limit_unless_one_is_given(tmp_path, prefect_harness):
    first = ensure_process_pool("shared", concurrency_limit=3)
    assert (first.type, first.concurrency_limit) == ("process", 3)
    deploy_to_pool("shared", name="a", root=tmp_path)  # no limit given: the pool's 3 stays
    assert read("pipeline/a", "shared")[1].concurrency_limit == 3
    deploy_to_pool("shared", name="b", root=tmp_path, concurrency_limit=1)
    dep, pool = read("pipeline/b", "shared")
    assert pool.concurrency_limit == 1 and pool.id == first.id  # updated in place, not recreated
    assert [s.schedule.cron for s in dep.schedules] == ["0 3 * * *"]  # the default: 03:00 UTC


def test_a_pool_of_another_type_is_refused(tmp_path, prefect_harness):
    from prefect.client.schemas.actions import WorkPoolCreate

    with client() as c:
        c.create_work_pool(WorkPoolCreate(name="k8s", type="kubernetes"))
    from prefect.exceptions import ObjectNotFound

    with pytest.raises(WorkPoolError, match="'k8s' has type 'kubernetes'"):
        deploy_to_pool("k8s", name="never", root=tmp_path)
    with client() as c, pytest.raises(ObjectNotFound):
        c.read_deployment_by_name("pipeline/never")  # nothing was registered


# ------------------------------------------------------------------------------------------------------ a worker


def dvc_workspace(root: Path, init_repo) -> None:
    """params.yaml (tiny profile) + a one-stage dvc.yaml (`prepare` writes out.txt) in a git + DVC repo."""
    params = (MAIN / "params.yaml").read_text().replace("profile: cpu", "profile: tiny", 1)
    (root / "params.yaml").write_text(params)
    cmd = "python -c \"open('out.txt', 'w').write('ok')\""
    (root / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"prepare": {"cmd": cmd, "outs": ["out.txt"]}}}))
    (root / ".gitignore").write_text(".herl/\nmlartifacts/\n")
    init_repo(root)
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=root, check=True)


@pytest.mark.integration
def test_a_process_worker_runs_the_deployed_pipeline(tmp_path, mlflow_uri, prefect_harness, init_repo):
    from prefect.deployments import run_deployment

    from flows.deploy import api_url

    dvc_workspace(tmp_path, init_repo)
    deploy_to_pool("worker-pool", name="now", root=tmp_path, stages=["prepare"])
    run = run_deployment("pipeline/now", timeout=0)  # scheduled for now; nothing runs it until a worker polls
    env = {**os.environ, "PREFECT_API_URL": api_url(), "MLFLOW_TRACKING_URI": mlflow_uri, "DVC_NO_ANALYTICS": "1"}
    worker = subprocess.run(
        [sys.executable, "-m", "prefect", "worker", "start", "--pool", "worker-pool", "--run-once"],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert worker.returncode == 0, worker.stderr[-3000:]
    with client() as c:
        done = c.read_flow_run(run.id)
    assert done.state.is_completed(), (done.state, worker.stderr[-3000:])
    assert (tmp_path / "out.txt").read_text() == "ok"
    assert "prepare" in yaml.safe_load((tmp_path / "dvc.lock").read_text())["stages"]


def test_a_bad_cron_is_a_usage_error(tmp_path, prefect_harness):
    params = tmp_path / "params.yaml"
    params.write_text("profile: tiny\n")
    out = CliRunner().invoke(app, ["deploy", "--work-pool", "local", "--cron", "every day", "--params", str(params)])
    assert out.exit_code == 2 and "every day" in out.output, out.output
