"""Shared helpers of the benchmark scripts: machine facts, a quiet-machine gate, tables and JSON results.

Every script records, next to its numbers: the machine (CPU model, cores, memory), torch's thread count, the
1-minute load average at start and end, the git commit (and whether the tree was dirty) and the exact command.
Timed sections wait until the 1-minute load average is below a threshold (other work may share the cores); when
it never gets quiet the numbers are kept and flagged ``under_load``.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def load1() -> float:
    """The 1-minute load average."""
    return os.getloadavg()[0]


def wait_for_quiet(threshold: float = 1.3, max_wait_s: float | None = None, poll_s: float = 30.0) -> dict[str, Any]:
    """Sleep until the 1-minute load is below ``threshold`` (at most ``max_wait_s``, default $BENCH_MAX_WAIT_S or
    900 s). Returns what was seen."""
    if max_wait_s is None:
        max_wait_s = float(os.environ.get("BENCH_MAX_WAIT_S", "900"))
    start, first = time.monotonic(), load1()
    while load1() >= threshold and time.monotonic() - start < max_wait_s:
        print(f"[bench] load {load1():.2f} >= {threshold}: waiting {poll_s:.0f} s", file=sys.stderr, flush=True)
        time.sleep(poll_s)
    now = load1()
    return {
        "load1_first_seen": first,
        "load1_at_start": now,
        "waited_s": round(time.monotonic() - start, 1),
        "under_load": now >= threshold,
    }


def git_commit() -> dict[str, Any]:
    """HEAD's hash and whether the working tree had uncommitted changes to tracked files. The results folder does not
    count: within ``benchmarks.suite`` each benchmark rewrites its committed JSON, which made every later one
    "dirty" although the code was HEAD's."""

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=False).stdout.strip()

    return {
        "commit": git("rev-parse", "HEAD"),
        "dirty": bool(git("status", "--porcelain", "--untracked-files=no", "--", ".", ":!benchmarks/results")),
    }


ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16")
"""The /proc/cpuinfo flags that decide which float kernels oneDNN, MKL and torch run: figures measured on CPUs with
different sets are not comparable (docs/performance.md)."""


def cpu_info(cpuinfo: str | None = None) -> dict[str, Any]:
    """CPU model, the ISA flags of ``ISA_FLAGS`` it has, and the kernel level torch dispatches to (AVX2 / AVX512,
    which ``ATEN_CPU_CAPABILITY`` can cap). ``cpuinfo``: the text of /proc/cpuinfo (read when None)."""
    import torch

    model, flags = platform.processor(), set()
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            cpuinfo = ""
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name" and model == platform.processor():
            model = value.strip()
        elif key.strip() == "flags" and not flags:
            flags = set(value.split())
    return {
        "cpu": model,
        "isa": [f for f in ISA_FLAGS if f in flags],
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "isa_caps": {k: os.environ[k] for k in ISA_ENV if k in os.environ},
    }


ISA_ENV = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")
"""Environment variables that cap the instruction set the kernels use (recorded when set)."""


def machine_info() -> dict[str, Any]:
    """CPU model and ISA flags (``cpu_info``), cores, memory, Python and library versions, torch threads."""
    import torch

    cpu = cpu_info()
    mem_gb = None
    try:
        mem_gb = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9, 1)
    except (ValueError, OSError):
        pass
    versions = {}
    for name in ("torch", "transformers", "trl"):
        try:
            versions[name] = __import__(name).__version__
        except ImportError:
            versions[name] = None
    return {
        **cpu,
        "cores": os.cpu_count(),
        "memory_gb": mem_gb,
        "python": platform.python_version(),
        "torch_threads": torch.get_num_threads(),
        **versions,
    }


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


def table(rows: Sequence[dict[str, Any]], cols: Sequence[str]) -> str:
    """A GitHub-markdown table of ``rows`` (floats with 3 significant decimals)."""

    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 100 else f"{v:.1f}"
        return str(v)

    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


class Report:
    """Collects a benchmark's context at start; ``write`` adds the results and the end load and saves the JSON.

    ``name``: the results file (``<out_dir>/<name>.json``); ``module``: the script that ran (default
    ``benchmarks.<name>``; a script whose results name is an option, such as ``--name``, passes its own), so that
    ``command`` is the command line that reproduces the file."""

    def __init__(
        self,
        name: str,
        quiet: dict[str, Any] | None = None,
        out_dir: Path | None = None,
        argv: list[str] | None = None,
        module: str | None = None,
    ):
        self.name = name
        self.out_dir = out_dir or RESULTS
        self.started = datetime.now(UTC).isoformat(timespec="seconds")
        self.command = shlex.join(
            [Path(sys.executable).name, "-m", module or f"benchmarks.{name}", *(sys.argv[1:] if argv is None else argv)]
        )
        self.context = {"quiet": quiet or {}, "load1_start": load1(), **git_commit()}

    def write(self, results: dict[str, Any]) -> Path:
        payload = {
            "benchmark": self.name,
            "date": self.started,
            "command": self.command,
            "machine": machine_info(),
            **self.context,
            "load1_end": load1(),
            **results,
        }
        path = write_json_atomic(self.out_dir / f"{self.name}.json", payload)
        print(f"[bench] wrote {path}", file=sys.stderr)
        return path


def write_json_atomic(path: Path, payload: dict[str, Any]) -> Path:
    """``payload`` as indented JSON at ``path``, through a temp file and a rename (never half-written). Results are
    committed, so machine-specific paths are dropped: the repo root becomes ".", temp dirs become ``$TMP``."""
    text = json.dumps(payload, indent=2) + "\n"
    text = text.replace(str(ROOT) + "/", "").replace(tempfile.gettempdir() + "/", "$TMP/")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path
