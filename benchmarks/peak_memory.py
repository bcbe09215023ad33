"""Peak memory: peak RSS of a SmolLM2 training run of one step (``cpu`` profile), measured from outside.

    .venv/bin/python -m benchmarks.peak_memory [--profile cpu] [--steps 1] [--set KEY=VALUE ...]

Runs ``herl train --profile cpu --no-resume --set train.steps=1`` (outputs in a temp folder, MLflow in a temp sqlite
file) under ``/usr/bin/time -v`` and samples the RSS of the process tree with psutil every 0.1 s. Reports the
kernel's peak (``Maximum resident set size`` of time -v, the exact figure) and psutil's sampled peak; the whole run
includes startup, model load, one rollout + hindsight + update step, and saving the policy.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import ROOT, Report, table, wait_for_quiet


def tree_rss(proc) -> int:
    """RSS in bytes of ``proc`` and its children (0 once gone)."""
    import psutil

    total = 0
    try:
        for p in [proc, *proc.children(recursive=True)]:
            try:
                total += p.memory_info().rss
            except psutil.NoSuchProcess:
                pass
    except psutil.NoSuchProcess:
        pass
    return total


def measure(cmd: list[str], env: dict[str, str], interval: float = 0.1) -> dict[str, Any]:
    """Run ``cmd`` (under /usr/bin/time -v when present) and sample its tree's RSS until it exits."""
    import psutil

    timed = ["/usr/bin/time", "-v", *cmd] if shutil.which("/usr/bin/time") else cmd
    start = time.perf_counter()
    proc = subprocess.Popen(timed, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    ps = psutil.Process(proc.pid)
    peak = 0
    while proc.poll() is None:
        peak = max(peak, tree_rss(ps))
        time.sleep(interval)
    out = proc.stdout.read() if proc.stdout else ""
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} exited {proc.returncode}:\n{out[-4000:]}")
    kernel = re.search(r"Maximum resident set size \(kbytes\): (\d+)", out)
    return {
        "wall_s": time.perf_counter() - start,
        "peak_rss_gb_time_v": int(kernel.group(1)) * 1024 / 1e9 if kernel else None,
        "peak_rss_gb_sampled": peak / 1e9,
        "log_tail": out[-1500:],
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", default="cpu")
    ap.add_argument("--steps", type=int, default=1)
    ap.add_argument("--set", dest="sets", action="append", default=[], help="extra --set overrides for herl train")
    ap.add_argument("--no-wait", action="store_true")
    ap.add_argument("--out-dir", default=None)
    args = ap.parse_args(argv)
    quiet = {} if args.no_wait else wait_for_quiet()
    report = Report("peak_memory", quiet, Path(args.out_dir) if args.out_dir else None, argv)
    herl = str(Path(sys.executable).with_name("herl"))
    with tempfile.TemporaryDirectory(prefix="herl-peakmem-") as tmp:
        sets = [
            f"train.steps={args.steps}",
            f"train.out_dir={tmp}/policy",
            f"train.checkpoint_dir={tmp}/ckpt",
            f"train.report_dir={tmp}/reports",
            *args.sets,
        ]
        cmd = [herl, "train", "--profile", args.profile, "--no-resume"] + [a for s in sets for a in ("--set", s)]
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "MLFLOW_TRACKING_URI": f"sqlite:///{tmp}/mlflow.db"}
        res = measure(cmd, env)
        steps_file = Path(tmp) / "reports" / "steps.jsonl"
        res["steps_jsonl"] = steps_file.read_text() if steps_file.is_file() else ""
    res["herl_command"] = " ".join(cmd).replace(tmp, "$TMP")
    row = {k: res[k] for k in ("peak_rss_gb_time_v", "peak_rss_gb_sampled", "wall_s")}
    print(table([{"profile": args.profile, "steps": args.steps, **row}], ["profile", "steps", *row]))
    report.write({"profile": args.profile, "steps": args.steps, **res})


if __name__ == "__main__":
    main()
