"""Fixtures of tests/flows: an isolated Prefect home, one session-scoped Prefect test harness, temp MLflow stores.

The harness (a temporary SQLite Prefect server, about 11 s on 2 cores) is session-scoped
and started by an autouse gate only for tests that run flows (module ``test_pipeline`` or marker ``integration``),
so the MLflow-only tests in test_tracking.py do not pay for it.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
from pathlib import Path

import pytest

_PREFECT_HOME = tempfile.mkdtemp(prefix="herl-test-prefect-")
os.environ["PREFECT_HOME"] = _PREFECT_HOME
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_RESULTS_LOCAL_STORAGE_PATH", os.path.join(_PREFECT_HOME, "storage"))
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


@pytest.fixture(scope="session")
def prefect_harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=90):
        yield


@pytest.fixture(autouse=True)
def _prefect_when_needed(request):
    """Start the session harness (once) for tests that run flows."""
    if request.node.get_closest_marker("integration") or request.module.__name__.endswith("test_pipeline"):
        request.getfixturevalue("prefect_harness")


@pytest.fixture(scope="module")
def mlflow_uri(tmp_path_factory) -> str:
    """One sqlite tracking DB per test module (creating it migrates the schema: about 6 s)."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


def git(root: Path, *args: str) -> str:
    done = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=True)
    return done.stdout.strip()


def git_init(root: Path) -> str:
    """A git repo with everything in ``root`` committed; returns the commit."""
    git(root, "init", "-q")
    git(root, "config", "user.email", "test@example.com")
    git(root, "config", "user.name", "test")
    git(root, "add", "-A")
    git(root, "commit", "-q", "-m", "init")
    return git(root, "rev-parse", "HEAD")


@pytest.fixture
def init_repo():
    """``init_repo(root) -> commit`` (conftest helpers are not importable under --import-mode=importlib)."""
    return git_init
