"""Pipeline overhead: what MLflow, DVC and Prefect add to a training run's wall time.

    .venv/bin/python -m benchmarks.pipeline_overhead [--profile tiny] [--reps 1] [--reference-wall-s 374]

In a temporary git + DVC repo holding the project's dvc.yaml and params.yaml (``profile:`` set to ``--profile``)
and a copy of herl_core, the same training run (fresh, no resume) is timed four ways, each a new process, after
one untimed warm-up run, in an order rotated per repetition:

1. ``direct``   python -c "run_train(load_params(), resume=False)": herl_core only, no tracking;
2. ``mlflow``   ``herl train --no-resume``: the CLI with its MLflow run (temp sqlite store);
3. ``dvc``      ``dvc repro --single-item train``: DVC hashing deps/params/outs and writing dvc.lock around (2);
4. ``prefect``  the Prefect stage flow ``flows.pipeline.train`` (one task running (3)), ephemeral Prefect server;
5. ``prefect_server`` the same flow against a running ``prefect server start`` (``PREFECT_API_URL``), as scheduled
   deployments and work-pool workers run it. The server is started before the timed run and stopped after it; its
   start-up is not timed (a long-lived server pays it once).

The MLflow sqlite store is created before the timed runs (its first-time schema migration, about 6 s, is a
one-off per store, not per run). Overhead = variant − direct (medians). It is a fixed cost per run (imports,
store/server start, hashing) plus a small per-step cost (metric logging), so it is reported in seconds and as a
share of ``--reference-wall-s``, the wall time of a ``cpu``-profile run measured separately, or of the ``herl
train --profile cpu`` run in a ``benchmarks.peak_memory`` JSON given as ``--reference-json`` (``benchmarks.suite``
runs that one first).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from benchmarks.common import ROOT, Report, median, table, wait_for_quiet

DIRECT = (
    "from herl_core.config import load_params; from herl_core.stages import run_train; "
    "run_train(load_params('params.yaml'), resume=False)"
)
PREFECT = "from flows.pipeline import train; train(root='.')"


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def prefect_server(env: dict[str, str], home: Path) -> Iterator[dict[str, str]]:
    """A ``prefect server start`` on a free loopback port, healthy before the block; the env that points at it."""
    import httpx

    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    server_env = {**env, "PREFECT_HOME": str(home), "PREFECT_API_URL": api}
    server = subprocess.Popen(
        [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=server_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{api}/health", timeout=2).json() is True:
                    break
            except (httpx.HTTPError, ValueError):
                pass
            if time.monotonic() > deadline or server.poll() is not None:
                raise SystemExit("prefect server did not become healthy within 120 s")
            time.sleep(0.5)
        yield server_env
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()


def make_repo(tmp: Path, profile: str, env: dict[str, str]) -> Path:
    repo = tmp / "repo"
    repo.mkdir()
    shutil.copy(ROOT / "dvc.yaml", repo / "dvc.yaml")
    params, n = re.subn(r"(?m)^profile: \w+$", f"profile: {profile}", (ROOT / "params.yaml").read_text())
    if n != 1:
        raise SystemExit("params.yaml must have one top-level `profile:` line")
    (repo / "params.yaml").write_text(params)
    shutil.copytree(ROOT / "herl_core", repo / "herl_core", ignore=shutil.ignore_patterns("__pycache__"))
    (repo / "scripts").mkdir()
    shutil.copy2(ROOT / "scripts" / "herl", repo / "scripts" / "herl")  # dvc.yaml's stage command
    (repo / ".gitignore").write_text("/runs/\n/.herl/\n/mlartifacts/\n")
    for cmd in (
        ["git", "init", "-q"],
        ["git", "config", "user.email", "bench@example.com"],
        ["git", "config", "user.name", "bench"],
        ["dvc", "init", "-q"],
        ["dvc", "config", "core.site_cache_dir", str(tmp / "dvc-site")],
        ["git", "add", "-A"],
        ["git", "commit", "-q", "-m", "bench"],
        ["herl", "prepare"],
        [sys.executable, "-c", "import mlflow; mlflow.MlflowClient().search_experiments()"],  # create the store
    ):
        subprocess.run(cmd, cwd=repo, env=env, check=True, capture_output=True)
    return repo


def reset(repo: Path) -> None:
    """Remove every output of a previous train run (and dvc.lock) so the next one starts fresh."""
    for rel in ("runs", "models", "reports/train", "dvc.lock", ".herl"):
        path = repo / rel
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def reference_wall(path: Path) -> tuple[float, str]:
    """The wall time of the ``cpu``-profile ``herl train`` run recorded by ``benchmarks.peak_memory`` in ``path``."""
    import json

    try:
        data = json.loads(path.read_text())
        wall, profile, steps = float(data["wall_s"]), data["profile"], data["steps"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise SystemExit(f"{path}: not a peak_memory result with wall_s, profile and steps ({exc})") from None
    if profile != "cpu":
        raise SystemExit(f"{path}: its run used profile {profile!r}; the reference must be a cpu-profile run")
    return wall, f"{path.name}: herl train --profile cpu, {steps} steps, commit {data.get('commit', '?')[:7]}"


def timed(cmd: list[str], repo: Path, env: dict[str, str]) -> float:
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} exited {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return wall


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", default="tiny")
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--reference-wall-s", type=float, default=374.0, help="wall time of a cpu-profile run")
    ap.add_argument(
        "--reference-json",
        default=None,
        help="take the reference wall time from a peak_memory JSON (its `herl train` run of the cpu profile)",
    )
    ap.add_argument("--no-wait", action="store_true")
    ap.add_argument("--out-dir", default=None)
    args = ap.parse_args(argv)
    reference_source = "--reference-wall-s"
    if args.reference_json:
        args.reference_wall_s, reference_source = reference_wall(Path(args.reference_json))
    quiet = {} if args.no_wait else wait_for_quiet()
    report = Report("pipeline_overhead", quiet, Path(args.out_dir) if args.out_dir else None, argv)
    py = sys.executable
    variants = {
        "direct": [py, "-c", DIRECT],
        "mlflow": ["herl", "train", "--no-resume"],
        "dvc": [py, "-m", "dvc", "repro", "--single-item", "train"],
        "prefect": [py, "-c", PREFECT],
        "prefect_server": [py, "-c", PREFECT],
    }
    walls: dict[str, list[float]] = {k: [] for k in variants}
    with tempfile.TemporaryDirectory(prefix="herl-overhead-") as t:
        tmp = Path(t)
        env = {
            **os.environ,
            "PATH": f"{Path(py).parent}{os.pathsep}{os.environ.get('PATH', '')}",
            "PYTHONPATH": str(ROOT),
            "HF_HUB_OFFLINE": "1",
            "MLFLOW_TRACKING_URI": f"sqlite:///{tmp / 'mlflow.db'}",
            "PREFECT_HOME": str(tmp / "prefect"),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "DVC_NO_ANALYTICS": "1",
        }
        repo = make_repo(tmp, args.profile, env)
        reset(repo)
        timed(variants["direct"], repo, env)  # warm-up (file cache, first imports): not recorded
        names = list(variants)
        for rep in range(args.reps):
            for name in names[rep % len(names) :] + names[: rep % len(names)]:  # rotate the order per repetition
                cmd = variants[name]
                reset(repo)
                if name == "prefect_server":
                    with prefect_server(env, tmp / "prefect-server") as server_env:
                        walls[name].append(timed(cmd, repo, server_env))
                else:
                    walls[name].append(timed(cmd, repo, env))
                print(f"[bench] {name}: {walls[name][-1]:.1f} s", file=sys.stderr, flush=True)
    base = median(walls["direct"])
    rows: list[dict[str, Any]] = []
    for name, w in walls.items():
        over = median(w) - base
        rows.append(
            {
                "variant": name,
                "median_wall_s": median(w),
                "overhead_s": over,
                f"share_of_{args.profile}_run": over / base,
                "share_of_cpu_run": over / args.reference_wall_s,
            }
        )
    print(table(rows, list(rows[0])))
    report.write(
        {
            "profile": args.profile,
            "reference_wall_s": args.reference_wall_s,
            "reference_source": reference_source,
            "walls": walls,
            "rows": rows,
        }
    )


if __name__ == "__main__":
    main()
