"""Side-by-side rollout timing: this tree's ``HFEngine`` against the one of an earlier commit, in one process.

    .venv/bin/python -m benchmarks.rollout_ab --base bfb6eda [--batch 64] [--calls 4] [--new-tokens 32] [--profile]

On a shared machine one benchmark cell moves by ±15 % from run to run (docs/performance.md), more than most single
changes gain. Here both engines sample the same batch of ``--model`` (SmolLM2 by default; batch/4 chat prompts × 4,
exactly ``--new-tokens`` tokens, EOS masked) in alternating calls, after one warm-up each, so both see the same
machine. The base engine is ``herl_core/rollout/hf.py`` as of ``--base``, loaded from ``git show`` into a temporary
module. ``--profile`` adds a torch.profiler table (top CPU ops) of one call of each. Prints tok/s per call and the
medians; writes JSON.
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import ROOT, Report, median, table, wait_for_quiet


def base_engine(rev: str, folder: Path) -> type:
    """``HFEngine`` of ``herl_core/rollout/hf.py`` at ``rev``, with EOS maskable as in this tree."""
    source = subprocess.run(
        ["git", "show", f"{rev}:herl_core/rollout/hf.py"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    path = folder / "hf_base.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("hf_base", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    engine = module.HFEngine
    if "min_new_tokens" in engine.__init__.__code__.co_varnames:
        return engine

    class Forced(engine):  # before min_new_tokens: the generate knob of that name
        def __init__(self, *args: Any, min_new_tokens: int = 0, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.min_new_tokens = min_new_tokens

        def _generation_config(self, sampling: Any) -> Any:
            cfg = super()._generation_config(sampling)
            cfg.min_new_tokens = self.min_new_tokens
            return cfg

    return Forced


def run(args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    from benchmarks.rollout_throughput import load, prompt_texts
    from herl_core.models import encode_prompt
    from herl_core.rollout.base import SamplingParams
    from herl_core.rollout.hf import HFEngine

    model, tok = load(args.model)
    prompts = [encode_prompt(tok, t) for t in prompt_texts(args.batch // 4)]
    engines = {
        "base": base_engine(args.base, folder)(model, tok, batch_size=args.batch, min_new_tokens=args.new_tokens),
        "head": HFEngine(model, tok, batch_size=args.batch, min_new_tokens=args.new_tokens),
    }
    for engine in engines.values():
        engine.generate(prompts[:1], 2, SamplingParams(1.0, 1.0, -1, 4, 0))  # warm-up
    rates: dict[str, list[float]] = {name: [] for name in engines}
    tokens: dict[str, int] = {}
    for call in range(args.calls):
        for name, engine in engines.items():
            start = time.perf_counter()
            gens = engine.generate(prompts, 4, SamplingParams(1.0, 1.0, -1, args.new_tokens, call))
            tokens[name] = sum(len(g.completion_ids) for g in gens)
            rates[name].append(tokens[name] / (time.perf_counter() - start))
            print(f"[ab] call {call} {name}: {rates[name][-1]:.1f} tok/s", file=sys.stderr, flush=True)
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        for name, engine in engines.items():
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                engine.generate(prompts, 4, SamplingParams(1.0, 1.0, -1, args.new_tokens, 99))
            print(f"== {name}\n{prof.key_averages().table(sort_by='self_cpu_time_total', row_limit=15)}")
    rows = [
        {"engine": n, "tokens_per_call": tokens[n], "tok_s_per_call": [round(x, 1) for x in v]}
        | {"median_tok_s": median(v)}
        for n, v in rates.items()
    ]
    return {"base": args.base, "batch": args.batch, "new_tokens": args.new_tokens, "rows": rows}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", required=True, help="git revision whose herl_core/rollout/hf.py is the baseline")
    ap.add_argument("--model", default="smollm2", choices=["smollm2", "tiny"])
    ap.add_argument("--batch", type=int, default=64, help="sequences per call (batch/4 prompts × 4 samples)")
    ap.add_argument("--calls", type=int, default=4, help="timed calls per engine, alternating")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--profile", action="store_true", help="also print a torch.profiler table of one call each")
    ap.add_argument("--no-wait", action="store_true", help="do not wait for a quiet machine")
    ap.add_argument("--out-dir", default=None)
    args = ap.parse_args(argv)
    quiet = {} if args.no_wait else wait_for_quiet()
    report = Report("rollout_ab", quiet, Path(args.out_dir) if args.out_dir else None, argv)
    with tempfile.TemporaryDirectory(prefix="herl-ab-") as folder:
        res = run(args, Path(folder))
    print(table(res["rows"], list(res["rows"][0])))
    report.write(res)


if __name__ == "__main__":
    main()
