"""What bf16 costs or saves on a CPU, and whether the weights still move: one SmolLM2 policy update
(herl_core/update.py) in three precisions (herl_core/precision.py) — ``fp32`` (weights, AdamW state and compute in
fp32), ``bf16-autocast`` (bf16 compute under autocast on fp32 master weights and AdamW state: what
``model.dtype: bfloat16`` trains in) and ``bf16-pure`` (weights and AdamW state in bf16, no autocast: what
``train.master_dtype: bfloat16`` with ``train.allow_low_precision_master`` trains in) — on this CPU's own instruction
set and capped at AVX2. Per mode: the update's time, the process's peak memory, and the fraction of the trainable
weights that one update at lr 1e-6 changes.

    .venv/bin/python -m benchmarks.mixed_precision [--repeats 2] [--updates 2] [--isa native,avx2]

Every measurement is a fresh child process (``--child``), so each has its own peak RSS (``ru_maxrss``: model load,
the update's weights, gradients, AdamW moments and activations). The children alternate (fp32, bf16-autocast,
bf16-pure, then the reverse order in the next repeat, for each ISA in turn), so a change of the shared machine's load
hits every mode alike; the 1-minute load average is recorded at every child's start and end. A child loads
SmolLM2-135M-Instruct in the mode's master dtype, builds a fixed batch of ``--rows`` sequences (seeded random tokens:
``--prompt-len`` prompt + ``--completion-len`` completion tokens, micro-batches of ``--micro-batch``, advantages ±1),
runs one warm-up update and then ``--updates`` timed ones: ``update()`` as the trainer calls it (forward + backward per
micro-batch under the mode's autocast, the gradient clip, fused AdamW on the masters). The peak RSS is read after the
timed updates; then one more update, with a copy of the weights taken before it (after the peak was read, so the copy
does not count), measures which weight elements changed: ``changed_frac`` over all trainable elements,
``norm_changed_frac`` over the RMSNorm weights (values near 1.0, where a bf16 rounding step is 7.8e-3),
``tensors_changed`` = trainable tensors with at least one changed element. That update is AdamW's (updates + 2)-th on
the same batch, so it moves each weight by about lr = 1e-6.

``--isa avx2`` sets ``ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2`` in the child: the
kernels an AVX2-only CPU runs (no avx512_bf16, so oneDNN converts bf16 operands to fp32 and back). The CPU's model and
ISA flags are in the result's ``machine`` (benchmarks/common.py ``cpu_info``), each child's caps in ``isa_caps``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.common import ROOT, Report, load1, median, table

AVX2_ENV = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}
MODES: dict[str, tuple[str, str]] = {
    "fp32": ("float32", "float32"),
    "bf16-autocast": ("bfloat16", "float32"),
    "bf16-pure": ("bfloat16", "bfloat16"),
}
"""mode → (compute dtype = ``model.dtype``, master dtype = ``train.master_dtype``)."""


def child(args: argparse.Namespace) -> dict[str, Any]:
    """One measurement: load the model, then a warm-up, ``args.updates`` timed updates and one change-counting update
    in ``args.mode``."""
    import torch

    from benchmarks.common import cpu_info
    from herl_core.checkpoint import TrainerState
    from herl_core.config import ModelConfig, TrainConfig
    from herl_core.distributed import DataParallel
    from herl_core.loss import get_policy_loss
    from herl_core.models import load_policy
    from herl_core.precision import Precision
    from herl_core.samples import Sample
    from herl_core.update import Policy, StepBatch, update

    torch.set_num_threads(args.threads)
    compute, master = MODES[args.mode]
    model, tok = load_policy(ModelConfig(name_or_path=args.model, device="cpu"), dtype=master)
    gen = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    samples = [
        Sample(
            train_prompt_ids=torch.randint(3, vocab, (args.prompt_len,), generator=gen).tolist(),
            completion_ids=torch.randint(3, vocab, (args.completion_len,), generator=gen).tolist(),
            text="",
            reward=None,
            score=0.0,
        )
        for _ in range(args.rows)
    ]
    n_tok = args.rows * args.completion_len
    batch = StepBatch(
        samples,
        torch.arange(args.rows) // 4,
        torch.tensor([1.0, -1.0] * (args.rows // 2)),
        [list(range(args.rows))],
        [(n_tok, args.rows, float(n_tok))],
        args.rows // 4,
    )
    t = TrainConfig(micro_batch_size=args.micro_batch, lr=1e-6, prompts_per_step=args.rows // 4, mini_batch_prompts=1)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=t.lr, betas=t.betas, weight_decay=t.weight_decay, fused=True)
    precision = Precision.from_names(compute, master)
    policy = Policy(model, model, optimizer, get_policy_loss(t.policy_loss), None, tok.pad_token_id, precision)
    dp, state = DataParallel.single(), TrainerState()
    rss_loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    load_start = load1()
    times, grad_norms = [], []
    for k in range(args.updates + 1):
        start = time.perf_counter()
        metrics = update(policy, batch, t, 1.0, dp, state)
        if k:  # the first update allocates AdamW's moments and warms the kernels up
            times.append(time.perf_counter() - start)
        grad_norms.append(metrics["actor/grad_norm"])
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    update(policy, batch, t, 1.0, dp, state)
    changed = [(p.detach() != b).sum().item() for p, b in zip(params, before, strict=True)]
    sizes = [p.numel() for p in params]
    norms = [i for i, n in enumerate(names) if "norm" in n]
    return {
        "mode": args.mode,
        "compute_dtype": compute,
        "master_dtype": master,
        "param_dtype": str(params[0].dtype).removeprefix("torch."),
        "isa": torch.backends.cpu.get_cpu_capability(),
        "isa_caps": cpu_info()["isa_caps"],
        "update_s": times,
        "update_s_median": median(times),
        "peak_rss_gb": peak,
        "peak_rss_after_load_gb": rss_loaded,
        "grad_norms": grad_norms,
        "changed_frac": sum(changed) / sum(sizes),
        "norm_changed_frac": sum(changed[i] for i in norms) / max(sum(sizes[i] for i in norms), 1),
        "tensors_changed": sum(c > 0 for c in changed),
        "tensors": len(params),
        "trainable_elements": sum(sizes),
        "load1_start": load_start,
        "load1_end": load1(),
        "threads": torch.get_num_threads(),
    }


def run_child(args: argparse.Namespace, mode: str, isa: str) -> dict[str, Any]:
    env = {**os.environ, **(AVX2_ENV if isa == "avx2" else {}), "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "benchmarks.mixed_precision", "--child", "--mode", mode, "--model", args.model,
           "--rows", str(args.rows), "--prompt-len", str(args.prompt_len), "--completion-len",
           str(args.completion_len), "--micro-batch", str(args.micro_batch), "--updates", str(args.updates),
           "--threads", str(args.threads)]  # fmt: skip
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} exited {done.returncode}:\n{done.stderr[-4000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"[bench] {isa:6s} {mode:13s} {[round(s, 3) for s in result['update_s']]} s, "
          f"peak {result['peak_rss_gb']:.2f} GB, changed {result['changed_frac']:.3f}, "
          f"load {result['load1_start']:.1f}-{result['load1_end']:.1f}", file=sys.stderr, flush=True)  # fmt: skip
    return {**result, "isa_requested": isa}


def summarise(runs: list[dict[str, Any]], isas: list[str]) -> list[dict[str, Any]]:
    """One row per (ISA, mode) measured: the median update time over all timed updates of every repeat, the largest
    peak RSS, the smallest fraction of weights changed (one update at lr 1e-6) over the repeats."""
    rows = []
    for isa in isas:
        fp32 = [r for r in runs if r["isa_requested"] == isa and r["mode"] == "fp32"]
        base = median([s for r in fp32 for s in r["update_s"]])
        for mode in MODES:
            mine = [r for r in runs if r["isa_requested"] == isa and r["mode"] == mode]
            if not mine:
                continue
            times = [s for r in mine for s in r["update_s"]]
            rows.append({
                "isa": mine[0]["isa"], "mode": mode, "compute": mine[0]["compute_dtype"],
                "master": mine[0]["master_dtype"], "update_s": median(times), "min_s": min(times),
                "max_s": max(times), "vs_fp32": median(times) / base,
                "peak_rss_gb": max(r["peak_rss_gb"] for r in mine),
                "changed_frac": min(r["changed_frac"] for r in mine),
                "norm_changed_frac": min(r["norm_changed_frac"] for r in mine),
                "tensors_changed": f"{min(r['tensors_changed'] for r in mine)}/{mine[0]['tensors']}", "n": len(times),
                "load1": median([r["load1_start"] for r in mine] + [r["load1_end"] for r in mine]),
            })  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--rows", type=int, default=8, help="sequences per update (a multiple of 4)")
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--completion-len", type=int, default=64)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--updates", type=int, default=2, help="timed updates per child (after one warm-up)")
    p.add_argument("--repeats", type=int, default=2, help="children per (ISA, mode), order reversed every repeat")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--isa", default="native,avx2", help="comma-separated: native, avx2")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, from {', '.join(MODES)} (fp32 first)")
    p.add_argument("--mode", choices=list(MODES), default="fp32", help=argparse.SUPPRESS)
    p.add_argument("--out-dir", default=None)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(args)))
        return 0
    isas = [x.strip() for x in args.isa.split(",") if x.strip()]
    modes = [x.strip() for x in args.modes.split(",") if x.strip()]
    if bad := [m for m in modes if m not in MODES] + [i for i in isas if i not in ("native", "avx2")]:
        raise SystemExit(f"--modes/--isa: unknown {', '.join(bad)} (modes: {', '.join(MODES)}; isa: native, avx2)")
    if modes[:1] != ["fp32"]:
        raise SystemExit("--modes must start with fp32: every row is compared with it (vs_fp32)")
    if args.rows % 4:
        raise SystemExit(f"--rows {args.rows}: must be a multiple of 4 (groups of 4 sequences)")
    report = Report("mixed_precision", quiet={"load1_first_seen": load1(), "under_load": load1() >= 1.3},
                    out_dir=None if args.out_dir is None else Path(args.out_dir),
                    argv=argv)  # fmt: skip
    runs = []
    for r in range(args.repeats):
        for isa in isas:
            for mode in modes if r % 2 == 0 else modes[::-1]:
                runs.append(run_child(args, mode, isa))
    rows = summarise(runs, isas)
    cols = ["isa", "mode", "update_s", "min_s", "max_s", "vs_fp32", "peak_rss_gb", "changed_frac", "norm_changed_frac",
            "tensors_changed", "n", "load1"]  # fmt: skip
    print(table(rows, cols))
    settings = {k: getattr(args, k) for k in ("model", "rows", "prompt_len", "completion_len", "micro_batch",
                                                "updates", "repeats", "threads", "modes", "isa")}  # fmt: skip
    report.write({"settings": settings, "rows": rows, "runs": runs})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
