"""What flows/pipeline.py and flows/study.py both need to run ``herl``/``dvc`` subprocesses: one exclusive file lock,
one environment builder and one line-streaming subprocess runner.

* ``exclusive_lock``: ``fcntl.flock`` on a file, non-blocking (a second holder is refused at once, naming the first
  one's pid and start time), re-entrant within one process (the CLI locks, then runs the flow that locks again).
* ``child_env``: this process's environment for a child command: the MLflow parent run its stage runs nest under,
  the Prefect flow run, the tracking URI, this interpreter's bin folder first on PATH; never this process's own
  ``$HERL_MLFLOW_RUN_ID`` (a child opens its own run).
* ``stream``: run a command, hand every output line to a callback, return the exit code and the last lines.
"""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

_HELD: dict[Path, int] = {}  # lock file → fd, for re-entry within one process


@contextmanager
def exclusive_lock(path: str | Path, busy: Callable[[str], Exception]) -> Iterator[None]:
    """Hold ``path`` exclusively, or raise ``busy(holder)`` at once (``holder``: "pid N, started <time>" as the
    holding process wrote it). The holder line is cleared on release."""
    path = Path(path).resolve()
    if path in _HELD:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = path.read_text(encoding="utf-8").strip() or "pid unknown"
        os.close(fd)
        raise busy(holder) from None
    os.ftruncate(fd, 0)
    os.write(fd, f"pid {os.getpid()}, started {datetime.now().isoformat(timespec='seconds')}\n".encode())
    _HELD[path] = fd
    try:
        yield
    finally:
        del _HELD[path]
        os.ftruncate(fd, 0)
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def child_env(
    parent_run_id: str | None = None, tracking_uri: str | None = None, flow_run_id: str | None = None
) -> dict[str, str]:
    """The environment of a child ``herl``/``dvc`` command (module doc). ``parent_run_id`` / ``flow_run_id`` None
    leave an inherited ``$HERL_MLFLOW_PARENT_RUN_ID`` / ``$HERL_PREFECT_FLOW_RUN_ID`` as they are."""
    from flows.tracking import FLOW_RUN_ENV, PARENT_ENV, RUN_ENV

    env = dict(os.environ)
    env.pop(RUN_ENV, None)
    env.update({k: v for k, v in ((PARENT_ENV, parent_run_id), (FLOW_RUN_ENV, flow_run_id)) if v})
    if tracking_uri:
        env["MLFLOW_TRACKING_URI"] = tracking_uri
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def stream(
    argv: Sequence[str], cwd: str | Path, env: dict[str, str], on_line: Callable[[str], None], tail: int = 40
) -> tuple[int, str]:
    """Run ``argv`` in ``cwd`` (stderr merged into stdout), call ``on_line`` with every output line as it comes;
    return (exit code, the last ``tail`` lines)."""
    last: deque[str] = deque(maxlen=tail)
    with subprocess.Popen(
        list(argv), cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    ) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            on_line(line)
            last.append(line)
        code = proc.wait()
    return code, "".join(last)
