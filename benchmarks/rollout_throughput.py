"""Rollout throughput: herl's ``HFEngine`` vs a plain ``model.generate`` loop, and the matmul ceiling.

    .venv/bin/python -m benchmarks.rollout_throughput [--models smollm2 tiny] [--batch-sizes 8 32 64] [--new-tokens 32]

For each model and batch size B, both sides sample B sequences (B/n distinct chat prompts × n samples each, n =
``--samples-per-prompt``, 4 = the ``cpu`` profile's G) of exactly ``--new-tokens`` tokens (EOS suppressed
with ``min_new_tokens = max_new_tokens``) at temperature 1, no top-k/top-p, after one
warm-up call. herl's engine runs its full path: logits processors that record the sampled log-probs, EOS trimming,
detokenisation. The plain loop is what a user would write: tokenizer(padding) + ``model.generate`` under
``torch.no_grad``.

Ceiling: the best GFLOP/s of fp32 matmul over representative shapes (the decode shapes of the batch-64 step and one
large square) and two kernels (``torch.mm``; oneDNN's linear with a packed weight, which the engine uses on a CPU),
with the same threads. Bound on tokens/s = ceiling / (2·N) FLOPs per generated token, N =
the model's parameter count with tied embeddings counted once (that copy is the LM head; the embedding lookup costs
no FLOPs). Attention-score FLOPs (4·layers·context·hidden per token) are left out, which makes the bound optimistic.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch

from benchmarks.common import Report, median, table, wait_for_quiet

TOPICS = ["a robot who learns to paint", "a lighthouse keeper", "the first day of school", "a city under the sea",
          "a dragon who is afraid of fire", "two rival bakers", "a lost umbrella", "a chess tournament"]  # fmt: skip


def prompt_texts(k: int) -> list[str]:
    """k distinct instructions (cycling the topics with a numbered variant once they run out)."""
    return [f"Write a short story about {TOPICS[i % len(TOPICS)]} (version {i // len(TOPICS) + 1})." for i in range(k)]


def matmul_ceiling(hidden: int, inter: int, vocab: int, batch: int = 64, reps: int = 10) -> dict[str, Any]:
    """GFLOP/s of fp32 (m,k)@(k,n) per shape, two ways: ``torch.mm`` and oneDNN's linear with the weight packed once
    (what ``HFEngine`` runs on a CPU, ``herl_core.rollout.packed``; skipped where unavailable). ``ceiling`` = the
    best of all of them, so the bound holds for whichever kernel is faster on this machine."""
    from herl_core.rollout.packed import available

    shapes = [(batch, hidden, inter), (batch, inter, hidden), (batch, hidden, vocab), (1024, 1024, 1024)]
    out: dict[str, dict[str, float]] = {}
    for m, k, n in shapes:
        a, b = torch.randn(m, k), torch.randn(k, n)
        kernels = {"mm": lambda a=a, b=b: torch.mm(a, b)}
        if available():
            w = b.t().contiguous()  # (n, k): a linear's weight
            packed = torch.ops.mkldnn._reorder_linear_weight(w)
            kernels["onednn_packed"] = lambda a=a, p=packed: torch.ops.mkldnn._linear_pointwise(
                a, p, None, "none", [], ""
            )
        rates = {}
        for kernel, call in kernels.items():
            call()
            times = []
            for _ in range(reps):
                t = time.perf_counter()
                call()
                times.append(time.perf_counter() - t)
            rates[kernel] = 2 * m * k * n / min(times) / 1e9
        out[f"{m}x{k}x{n}"] = rates
    return {"gflops_by_shape": out, "ceiling_gflops": max(r for rates in out.values() for r in rates.values())}


def time_ours(model: Any, tok: Any, prompts: list[list[int]], n: int, new: int, reps: int) -> tuple[float, int]:
    from herl_core.rollout.base import SamplingParams
    from herl_core.rollout.hf import HFEngine

    engine = HFEngine(model, tok, batch_size=len(prompts) * n, min_new_tokens=new)  # EOS masked: equal lengths
    engine.generate(prompts[:1], 2, SamplingParams(1.0, 1.0, -1, 4, 0))  # warm-up
    times, n_tok = [], 0
    for r in range(reps):
        t = time.perf_counter()
        gens = engine.generate(prompts, n, SamplingParams(1.0, 1.0, -1, new, r))
        times.append(time.perf_counter() - t)
        n_tok = sum(len(g.completion_ids) for g in gens)
    return median(times), n_tok


def time_plain(model: Any, tok: Any, texts: list[str], n: int, new: int, reps: int) -> tuple[float, int]:
    tok.padding_side = "left"
    kw = dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, pad_token_id=tok.pad_token_id)
    model.eval()
    with torch.no_grad():
        enc = tok(texts[:1] * 2, return_tensors="pt", padding=True)
        model.generate(**enc, max_new_tokens=4, min_new_tokens=4, **kw)  # warm-up
        times, n_tok = [], 0
        for _ in range(reps):
            t = time.perf_counter()
            enc = tok([t for t in texts for _ in range(n)], return_tensors="pt", padding=True)
            out = model.generate(**enc, max_new_tokens=new, min_new_tokens=new, **kw)
            outs = tok.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
            times.append(time.perf_counter() - t)
            n_tok = (out.shape[1] - enc["input_ids"].shape[1]) * out.shape[0]
    assert len(outs) == len(texts) * n
    return median(times), n_tok


def load(name: str) -> tuple[Any, Any]:
    from herl_core.config import ModelConfig
    from herl_core.models import load_policy

    return load_policy(ModelConfig(name_or_path="tiny" if name == "tiny" else "smollm2-135m-instruct"))


def n_params(model: Any) -> int:
    """Parameters with tied weights counted once (``model.parameters()`` deduplicates shared tensors)."""
    return sum(p.numel() for p in model.parameters())


def run(args: argparse.Namespace) -> dict[str, Any]:
    from herl_core.models import encode_prompt

    rows = []
    ceilings = {}
    for name in args.models:
        model, tok = load(name)
        cfg = model.config
        ceil = matmul_ceiling(cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size)
        ceilings[name] = ceil
        flops_per_token = 2 * n_params(model)
        bound = ceil["ceiling_gflops"] * 1e9 / flops_per_token
        for batch in args.batch_sizes:
            n = args.samples_per_prompt if batch % args.samples_per_prompt == 0 else 1
            prompts = [encode_prompt(tok, t) for t in prompt_texts(batch // n)]
            texts = [tok.decode(p) for p in prompts]  # the same chat-templated text for the plain loop
            t_ours, n_ours = time_ours(model, tok, prompts, n, args.new_tokens, args.reps)
            t_plain, n_plain = time_plain(model, tok, texts, n, args.new_tokens, args.reps)
            ours, plain = n_ours / t_ours, n_plain / t_plain
            rows.append(
                {
                    "model": name,
                    "params_M": n_params(model) / 1e6,
                    "batch": batch,
                    "prompts_x_n": f"{batch // n}x{n}",
                    "new_tokens": args.new_tokens,
                    "ours_tokens": n_ours,
                    "plain_tokens": n_plain,
                    "ours_tok_s": ours,
                    "plain_tok_s": plain,
                    "ours/plain": ours / plain,
                    "bound_tok_s": bound,
                    "ours/bound": ours / bound,
                    "plain/bound": plain / bound,
                }
            )
            print(table(rows[-1:], list(rows[-1])), flush=True)
    return {"rows": rows, "ceilings": ceilings, "flops_per_token": "2 * N_params (tied embeddings once)"}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["smollm2", "tiny"], choices=["smollm2", "tiny"])
    ap.add_argument("--batch-sizes", nargs="+", type=int, default=[8, 32, 64])
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--samples-per-prompt", type=int, default=4, help="n (G): batch = batch/n distinct prompts × n")
    ap.add_argument("--reps", type=int, default=1, help="timed calls per cell (median), after one warm-up")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    ap.add_argument("--no-wait", action="store_true", help="do not wait for a quiet machine")
    ap.add_argument("--out-dir", default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    quiet = {} if args.no_wait else wait_for_quiet()
    from pathlib import Path

    report = Report("rollout_throughput", quiet, Path(args.out_dir) if args.out_dir else None, argv)
    res = run(args)
    print(table(res["rows"], list(res["rows"][0])))
    report.write(res)


if __name__ == "__main__":
    main()
