"""Security default: servers our commands start listen on 127.0.0.1 only."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def listening_addresses(pid: int) -> set[str]:
    procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    found = set()
    for proc in procs:
        try:
            conns = proc.net_connections(kind="inet")
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        found |= {c.laddr.ip for c in conns if c.status == psutil.CONN_LISTEN}
    return found


@pytest.mark.integration
def test_herl_ui_launches_mlflow_bound_to_loopback(tmp_path):
    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    port = free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'm.db'}"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "flows.cli", "ui", "--launch", "--port", str(port), "--params", "params.yaml"],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    try:
        deadline, addrs = time.time() + 120, set()
        while time.time() < deadline and not addrs:
            assert proc.poll() is None, proc.stdout.read().decode()[-2000:]
            addrs = listening_addresses(proc.pid)
            time.sleep(1)
        assert addrs, "mlflow ui never started listening"
        assert addrs <= {"127.0.0.1"}, addrs  # never 0.0.0.0 or a public interface
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
