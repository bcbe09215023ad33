"""Step time: one GRPO step and one HeRL step of herl vs TRL's ``GRPOTrainer``, same batch, in one run.

    .venv/bin/python -m benchmarks.step_time [--model smollm2] [--prompts 4] [--G 4] [--max-new-tokens 64]
                                             [--rewrite-max-new-tokens 96] [--reps 3] [--no-trl]

Both sides: the same model (SmolLM2-135M-Instruct, the converted folder of ``ensure_smollm2``; or ``tiny``), fp32,
full fine-tuning (no LoRA), the same prompts in the same order (the first ``(reps+1)·prompts`` training prompts, no
shuffling), G samples per prompt at temperature 1 with no top-k/top-p, the same max completion tokens, β = 0 (no
reference model), one optimizer step per training step, AdamW with herl's lr/betas/weight decay, grad-norm clip,
the IFEval-constraint reward of herl on both sides, no gradient checkpointing, the same torch threads.
Each side runs ``reps + 1`` steps from a fresh copy of the model; the first is a warm-up and is discarded; the
table gives the median of the rest. A TRL step is the time between consecutive ``on_step_end`` callbacks
(generation, reward and update all happen inside it); a herl step is ``Trainer.step()``.

Remaining differences (see docs/performance.md): TRL's loss is its default ``dapo`` token-level PPO clip; herl's is
``mixpolicy`` (dual clip + guided-token shaping). Neither side forces completion lengths; the mean completion
length of each side is reported because step time scales with it. TRL detokenises and re-applies the chat template
itself; herl encodes prompts once.

``--backend vllm`` (a CUDA GPU and vLLM in the environment, docs/scaling.md L1): herl generates with
``rollout.engine.backend=vllm`` on the GPU and TRL with ``use_vllm=True, vllm_mode="colocate"`` (vLLM in the training
process, as herl's engine), both with herl's ``rollout.engine.vllm.gpu_memory_utilization``; training on the GPU on both
sides. Refused before any model loads when CUDA or vLLM is missing.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import ROOT, Report, median, table, wait_for_quiet


def herl_config(args: argparse.Namespace, herl_enabled: bool):
    from herl_core.config import load_params

    overrides = [
        f"model.name_or_path={'tiny' if args.model == 'tiny' else 'smollm2-135m-instruct'}",
        f"hindsight.enabled={str(herl_enabled).lower()}",
        f"rollout.n={args.G}",
        f"rollout.max_new_tokens={args.max_new_tokens}",
        f"rollout.engine.generation_batch_size={max(args.prompts * args.G, 1)}",
        f"hindsight.rewrite_max_new_tokens={args.rewrite_max_new_tokens}",
        f"train.prompts_per_step={args.prompts}",
        f"train.mini_batch_prompts={args.prompts}",
        "train.kl_coef=0.0",
        "train.shuffle=false",
        f"train.threads={torch.get_num_threads()}",
        *(["rollout.engine.backend=vllm", "model.device=cuda"] if args.backend == "vllm" else []),
        *args.set,
    ]
    return load_params(ROOT / "params.yaml", profile=args.profile, overrides=overrides)


def bench_prompts(args: argparse.Namespace):
    from herl_core.stages import load_prompts

    cfg = herl_config(args, True)
    data = Path(args.data) if args.data else ROOT / cfg.train.data
    prompts = load_prompts(data)
    need = (args.reps + 1) * args.prompts
    if len(prompts) < need:
        raise SystemExit(f"need {need} prompts in {cfg.train.data}, found {len(prompts)} (run `herl prepare`)")
    return prompts[:need]


def run_herl(args: argparse.Namespace, prompts, herl_enabled: bool) -> dict[str, Any]:
    from herl_core.train import Trainer

    cfg = herl_config(args, herl_enabled)
    trainer = Trainer(cfg, prompts)
    steps = [trainer.step() for _ in range(args.reps + 1)]
    timed = steps[1:]
    return {
        "step_s": [m["perf/step_s"] for m in steps],
        "median_s": median([m["perf/step_s"] for m in timed]),
        "rollout_s": median([m["perf/rollout_s"] for m in timed]),
        "hindsight_s": median([m["perf/hindsight_s"] for m in timed]),
        "update_s": median([m["perf/update_s"] for m in timed]),
        "completion_len": sum(m["rollout/response_len"] for m in timed) / len(timed),
    }


class _StepClock:
    """TrainerCallback recording the wall time of every optimizer step (on_step_end to on_step_end)."""

    def __init__(self) -> None:
        self.begin: float | None = None
        self.ends: list[float] = []

    def make(self):
        from transformers import TrainerCallback

        clock = self

        class Clock(TrainerCallback):
            def on_step_begin(self, *a, **k):
                if clock.begin is None:
                    clock.begin = time.perf_counter()

            def on_step_end(self, *a, **k):
                clock.ends.append(time.perf_counter())

        return Clock()

    def durations(self) -> list[float]:
        marks = [self.begin, *self.ends]
        return [b - a for a, b in zip(marks, marks[1:], strict=False)]


def trl_backend(args: argparse.Namespace, cfg) -> dict[str, Any]:
    """TRL's generation settings for ``--backend``: HF generate on the CPU, or colocated vLLM on the GPU."""
    if args.backend == "hf":
        return {"use_cpu": True, "use_vllm": False}
    return {
        "use_cpu": False, "use_vllm": True, "vllm_mode": "colocate",
        "vllm_gpu_memory_utilization": cfg.rollout.engine.vllm.gpu_memory_utilization,
    }  # fmt: skip


def check_backend(backend: str) -> None:
    """``--backend vllm`` needs CUDA and an importable vLLM: say so before loading anything."""
    if backend != "vllm":
        return
    import importlib.util

    missing = [what for what, ok in (("a CUDA GPU", torch.cuda.is_available()),
                                     ("vllm", importlib.util.find_spec("vllm") is not None)) if not ok]  # fmt: skip
    if missing:
        raise SystemExit(
            f"--backend vllm needs {' and '.join(missing)}: run it in the GPU environment of docs/scaling.md (L1)"
        )


def run_trl(args: argparse.Namespace, prompts) -> dict[str, Any]:
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from herl_core.models import load_policy
    from herl_core.rewards import make_reward

    cfg = herl_config(args, False)
    model, tok = load_policy(cfg.model)
    reward = make_reward(cfg.reward)
    by_id = {p.id: p for p in prompts}
    lengths: list[int] = []

    def constraint_reward(prompts, completions, prompt_id, **kw):
        texts = [c[0]["content"] if isinstance(c, list) else c for c in completions]
        lengths.extend(len(ids) for ids in kw.get("completion_ids", []))
        return [r.score for r in reward.score([by_id[i] for i in prompt_id], texts)]

    system = [{"role": "system", "content": cfg.rollout.system_prompt}] if cfg.rollout.system_prompt else []
    rows = [{"prompt": [*system, {"role": "user", "content": p.prompt}], "prompt_id": p.id} for p in prompts]
    t = cfg.train
    with tempfile.TemporaryDirectory() as out:
        conf = GRPOConfig(
            output_dir=out, report_to="none", logging_strategy="no", save_strategy="no",
            disable_tqdm=True, seed=t.seed, max_steps=args.reps + 1, shuffle_dataset=False,
            per_device_train_batch_size=args.prompts * args.G, num_generations=args.G, gradient_accumulation_steps=1,
            steps_per_generation=1, num_iterations=1, max_completion_length=args.max_new_tokens,
            temperature=1.0, top_k=0, top_p=1.0, beta=0.0, learning_rate=t.lr, adam_beta1=t.betas[0],
            adam_beta2=t.betas[1], weight_decay=t.weight_decay, max_grad_norm=t.grad_clip,
            epsilon=t.clip_ratio_low, epsilon_high=t.clip_ratio_high, lr_scheduler_type="constant",
            warmup_steps=0, gradient_checkpointing=False, bf16=False, dataloader_num_workers=0,
            **trl_backend(args, cfg),
        )  # fmt: skip
        clock = _StepClock()
        trainer = GRPOTrainer(
            model=model, reward_funcs=constraint_reward, args=conf, train_dataset=Dataset.from_list(rows),
            processing_class=tok, callbacks=[clock.make()],
        )  # fmt: skip
        trainer.train()
    steps = clock.durations()
    per = args.prompts * args.G
    timed_lengths = lengths[per:]
    return {
        "step_s": steps,
        "median_s": median(steps[1:]),
        "completion_len": sum(timed_lengths) / len(timed_lengths) if timed_lengths else float("nan"),
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2", choices=["smollm2", "tiny"])
    ap.add_argument("--profile", default="cpu", help="params.yaml profile the herl side starts from")
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--G", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--rewrite-max-new-tokens", type=int, default=96)
    ap.add_argument("--reps", type=int, default=3, help="timed steps per side (one more warm-up step runs first)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--data", default=None, help="prompts JSONL (default: train.data of params.yaml)")
    ap.add_argument("--backend", default="hf", choices=["hf", "vllm"], help="generation on both sides (module doc)")
    ap.add_argument("--set", action="append", default=[], help="extra herl override KEY=VALUE (repeatable)")
    ap.add_argument("--no-trl", action="store_true")
    ap.add_argument("--no-wait", action="store_true")
    ap.add_argument("--out-dir", default=None)
    args = ap.parse_args(argv)
    check_backend(args.backend)
    if args.threads:
        torch.set_num_threads(args.threads)
    quiet = {} if args.no_wait else wait_for_quiet()
    report = Report("step_time", quiet, Path(args.out_dir) if args.out_dir else None, argv)
    prompts = bench_prompts(args)
    sides = {"herl GRPO": run_herl(args, prompts, False), "herl HeRL": run_herl(args, prompts, True)}
    if not args.no_trl:
        sides["TRL GRPOTrainer"] = run_trl(args, prompts)
    trl = sides.get("TRL GRPOTrainer", {}).get("median_s")
    rows = []
    for name, r in sides.items():
        row = {"side": name, "median_step_s": r["median_s"], "completion_len": r["completion_len"]}
        row.update({k: r[k] for k in ("rollout_s", "hindsight_s", "update_s") if k in r})
        row["ratio_vs_trl"] = r["median_s"] / trl if trl else float("nan")
        rows.append(row)
    cols = ["side", "median_step_s", "ratio_vs_trl", "rollout_s", "hindsight_s", "update_s", "completion_len"]
    print(table(rows, cols))
    keys = ("model", "prompts", "G", "max_new_tokens", "rewrite_max_new_tokens", "backend")
    shape = {k: getattr(args, k) for k in keys}
    report.write({"shape": shape, "reps": args.reps, "rows": rows, "sides": sides})


if __name__ == "__main__":
    main()
