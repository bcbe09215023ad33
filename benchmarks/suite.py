"""Every issue-6 benchmark in one run, at one commit (the tables of docs/performance.md).

    .venv/bin/python -m benchmarks.suite [--ab-base REV] [--dry-run] [--allow-dirty]

Runs, one after the other, each in its own process and each waiting for a quiet machine as it does alone:

1. ``rollout_throughput``  herl's engine vs a plain ``generate`` loop, and the matmul bound (3 repetitions);
2. ``rollout_ab``          only with ``--ab-base``: this tree's engine against that commit's, side by side;
3. ``step_time``           our GRPO and HeRL steps vs TRL's ``GRPOTrainer`` (3 repetitions);
4. ``peak_memory``         the ``cpu``-profile ``herl train`` run, all 4 steps, under ``/usr/bin/time -v``;
5. ``pipeline_overhead``   MLflow, DVC and Prefect around a training run, as a share of run 4's wall time.

Each writes its own ``benchmarks/results/<name>.json`` (with commit, loads and command). The suite refuses a working
tree with uncommitted changes to tracked files (``--allow-dirty`` to run anyway), so that every table of the run
belongs to one commit, and writes ``benchmarks/results/suite.json``: the commit, the commands in order, their exit
codes and wall times. It stops at the first benchmark that fails.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from benchmarks.common import RESULTS, ROOT, git_commit, write_json_atomic

SUITE: list[tuple[str, list[str]]] = [
    ("rollout_throughput", ["--new-tokens", "32", "--reps", "3"]),
    ("rollout_ab", ["--calls", "5"]),  # + --base REV (--ab-base)
    ("step_time", ["--max-new-tokens", "32", "--rewrite-max-new-tokens", "48", "--reps", "3"]),
    ("peak_memory", ["--steps", "4"]),
    ("pipeline_overhead", ["--reps", "2", "--reference-json", "benchmarks/results/peak_memory.json"]),
]


def commands(ab_base: str | None) -> list[tuple[str, list[str]]]:
    """(name, argv after ``python -m benchmarks.<name>``) in run order; rollout_ab only with a base revision."""
    out = []
    for name, args in SUITE:
        if name == "rollout_ab":
            if ab_base is None:
                continue
            args = ["--base", ab_base, *args]
        out.append((name, args))
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ab-base", default=None, help="also compare the rollout engine with this revision's")
    ap.add_argument("--dry-run", action="store_true", help="print the commands and exit")
    ap.add_argument("--allow-dirty", action="store_true", help="run with uncommitted changes to tracked files")
    ap.add_argument("--out-dir", default=None, help="where suite.json goes (default benchmarks/results)")
    args = ap.parse_args(argv)
    plan = commands(args.ab_base)
    lines = [f"python -m benchmarks.{name} {' '.join(a)}" for name, a in plan]
    if args.dry_run:
        print("\n".join(lines))
        return
    commit = git_commit()
    if commit["dirty"] and not args.allow_dirty:
        raise SystemExit("benchmarks.suite: the working tree has uncommitted changes; commit them (or --allow-dirty)")
    runs: list[dict[str, Any]] = []
    started = datetime.now(UTC).isoformat(timespec="seconds")
    for (name, a), line in zip(plan, lines, strict=True):
        print(f"[suite] {line}", file=sys.stderr, flush=True)
        t = time.perf_counter()
        rc = subprocess.run([sys.executable, "-m", f"benchmarks.{name}", *a], cwd=ROOT).returncode
        runs.append({"name": name, "command": line, "rc": rc, "wall_s": round(time.perf_counter() - t, 1)})
        if rc != 0:
            break
    summary = {**commit, "started": started, "ended": datetime.now(UTC).isoformat(timespec="seconds"), "runs": runs}
    write_json_atomic((Path(args.out_dir) if args.out_dir else RESULTS) / "suite.json", summary)
    failed = [r["name"] for r in runs if r["rc"] != 0]
    if failed:
        raise SystemExit(f"benchmarks.suite: {failed[0]} failed (see its output above)")


if __name__ == "__main__":
    main()
