"""The study's report, rendered from the committed results folder alone (spec §7.1-7.2; docs/study.md).
flows/study.py writes ``<results_dir>/<run>/`` as each phase of a run finishes and calls ``build_report`` →
``render_markdown`` / ``plot_all``; ``herl study --report-only`` does the same on any clone. Nothing here reads a
run folder, a model or the clock: the same results give the same report, byte for byte.

What it reports (docs/study.md "Statistics"):

* **primary metric**: the held-out all-constraints-met rate after training (``val/all_met_frac`` of
  ``validation_final.json``: k sampled answers per held-out prompt, the share meeting every constraint), per arm:
  mean ± 95 % Student-t half-width over seeds (``herl_core.stats.mean_ci``). ``base`` = step 0 of the trained runs
  (the untrained policy, sampled with the same validation seeds);
* **paired differences** (e.g. HeRL − GRPO): per seed s and prompt i, d = (all-met share of arm A) − (of arm B),
  both runs of seed s; the mean over seeds × prompts with a bootstrap interval that resamples seeds and prompts
  (``herl_core.stats.paired_bootstrap``);
* learning curves (validation points, mean and 95 % band over seeds), per-type pass rates, tokens generated and wall
  time per arm, the broad test (IFEval / IFBench, rounds 0 and 1) and, for a pilot with a ``power`` design, the
  minimum detectable difference (``herl_core.stats.min_detectable_difference``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from flows.study_plan import StudyConfig, StudyError
from herl_core.stats import mean_ci, min_detectable_difference, paired_bootstrap

RUN_RECORD = "study_run.json"
PRIMARY = "val/all_met_frac"
"""The primary metric (fixed before any run): share of the k sampled held-out answers that meet every constraint."""
CURVE_KEYS = ("val/all_met_frac", "val/greedy/all_met_frac", "val/reward_mean", "val/truncated_frac", "reward/mean")
TRAIN_DIAGNOSTICS = {
    "rollout/truncated_frac": ("rollouts cut %", 100.0),
    "rollout/response_len": ("rollout length", 1.0),
    "herl/rewrite_success_rate": ("rewrite > draft %", 100.0),
    "herl/rewrite_len": ("rewrite length", 1.0),
    "herl/rewrite_truncated_frac": ("rewrites cut %", 100.0),
    "herl/guided_truncated_frac": ("merged rewrites cut %", 100.0),
    "actor/guided_token_frac": ("guided tokens %", 100.0),
}
"""Per-step training values the report averages over each run's steps (then mean ± 95 % over seeds): what the
policy was trained on, to read a difference in the primary metric against (docs/metrics.md)."""
METRICS = ("prompt_strict", "inst_strict", "prompt_loose", "inst_loose")
"""The IFEval/IFBench metrics of the broad test."""
BROAD_LENGTH = ("truncated_frac", "response_tokens_mean")
"""What the broad test's tables show beside the metrics: the share of answers cut at the cap and the mean length."""
SHORT_TOKENS = 8
"""An answer under this many tokens is a word or a short phrase. Such answers meet many format rules vacuously (no
whitespace, title case, every word starting with the next letter, ...), so the broad test reports how many of the
kept answers are this short and how many of the met prompts were met by one."""
ARM_PAIRS = (
    ("herl", "grpo_equal_tokens"),
    ("herl", "grpo"),
    ("herl", "herl_no_bonus"),
    ("herl_no_bonus", "grpo"),
    ("grpo_equal_tokens", "grpo"),
)
"""Paired comparisons between trained arms, in report order. The first is the pre-registered primary contrast (HeRL
against GRPO at an equal generated-token budget, docs/study.md); where a study has no grpo_equal_tokens arm, HeRL −
GRPO at equal steps comes first. Every trained arm is also compared with base."""
BOOTSTRAP_REPS = 10_000
BOOTSTRAP_SEED = 0


# --------------------------------------------------------------------------------------------------------------------
# reading one run's results


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise StudyError(f"{path}: cannot read the run's result: {exc}") from exc


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]


def collect_run(folder: Path) -> dict[str, Any]:
    """A run's committed results: its record, per-step history, final validation, per-prompt validation outcomes
    ``{step: {prompt_id: all-met share}}`` (sampled answers), and its broad-test metrics per benchmark."""
    record = _read_json(folder / RUN_RECORD)
    train = folder / "train"
    history = _read_jsonl(train / "steps.jsonl")
    final = _read_json(train / "validation_final.json") if (train / "validation_final.json").is_file() else None
    outcomes: dict[int, dict[str, float]] = {}
    for row in _read_jsonl(train / "val_outcomes.jsonl"):
        if row["part"] == "val/" and row["scored"]:
            outcomes.setdefault(int(row["step"]), {})[row["prompt_id"]] = row["all_met"] / row["scored"]
    broad: dict[str, Any] = {}
    broad_outcomes: dict[str, list[dict[str, float]]] = {}
    broad_short: dict[str, dict[str, float | None]] = {}
    if "broad" in record.get("phases", {}):
        flat = _read_json(folder / "evaluate" / "metrics.json")
        for bench in sorted({k.split("/", 1)[0] for k in flat if "/" in k}):
            broad[bench] = _read_json(folder / "evaluate" / bench / "metrics.json")
            rows = _read_jsonl(folder / "evaluate" / bench / "outcomes.jsonl")
            rounds = range(len(broad[bench].get("rounds") or [None]))
            broad_outcomes[bench] = [round_outcomes(rows, r) for r in rounds]
            short = short_answers(rows)
            if short is not None:
                broad_short[bench] = short
    cap = None
    if broad and (folder / "config.json").is_file():
        cap = _read_json(folder / "config.json").get("evaluate", {}).get("max_new_tokens")
    return {"record": record, "history": history, "final": final, "outcomes": outcomes, "broad": broad,
            "broad_outcomes": broad_outcomes, "broad_cap": cap, "broad_short": broad_short}  # fmt: skip


def short_answers(rows: Sequence[Mapping[str, Any]]) -> dict[str, float | None] | None:
    """Of a broad-test run's kept answers (``outcomes.jsonl``, after the last round): ``short`` = the share under
    SHORT_TOKENS tokens, ``met_by_short`` = the share of the prompts meeting every instruction (strict) whose answer
    is that short (None when no prompt is met). None when the rows carry no lengths (results written before
    outcomes.jsonl kept ``response_tokens``)."""
    sized = [r for r in rows if r.get("response_tokens") is not None]
    if not sized:
        return None
    met = [r for r in sized if r.get("prompt_strict")]
    return {
        "short": sum(r["response_tokens"] < SHORT_TOKENS for r in sized) / len(sized),
        "met_by_short": sum(r["response_tokens"] < SHORT_TOKENS for r in met) / len(met) if met else None,
    }


def bench_order(bench: str) -> tuple[int, str]:
    """IFEval first (the paper's headline benchmark), then the others by name."""
    return (bench != "ifeval", bench)


def round_outcomes(rows: Sequence[Mapping[str, Any]], r: int) -> dict[str, float]:
    """``{prompt id: 1.0 | 0.0}``: prompt-level strict accuracy after revision round ``r`` (0 = the policy's own
    answer), from the kept answers of a broad-test run (``outcomes.jsonl``: the best answer of each prompt and the
    round that produced it). A prompt is revised only while it fails and an answer is kept only when it meets more
    instructions, so after round r the prompt is met iff its kept answer is from a round ≤ r and meets every
    instruction; a kept answer from a later round means the prompt still failed after round r. Unscorable prompts
    (``prompt_strict`` None) are left out."""
    return {
        row["id"]: float(row.get("round", 0) <= r and bool(row["prompt_strict"]))
        for row in rows
        if row["prompt_strict"] is not None
    }


def group_name(arm: str, variant: str | None) -> str:
    return f"{arm}-{variant}" if variant else arm


# --------------------------------------------------------------------------------------------------------------------
# per-run values


def run_budget(result: Mapping[str, Any]) -> dict[str, float | None]:
    """Tokens and seconds of one run: training generation (rollouts + rewrites), validation generation, the sum of
    the step times (``perf/step_s``, validation excluded), validation seconds, and the train phase's wall time."""

    def total(key: str, extra: Mapping[str, Any] | None = None) -> float | None:
        vals = [float(h[key]) for h in result["history"] if h.get(key) is not None]
        if extra and extra.get(key) is not None:
            vals.append(float(extra[key]))
        return sum(vals) if vals else None

    phase = result["record"].get("phases", {}).get("train") or {}
    return {
        "train_tokens": total("perf/gen_tokens"),
        "val_tokens": total("perf/val_tokens", result["final"]),
        "step_s": total("perf/step_s"),
        "val_s": total("perf/val_s", result["final"]),
        "wall_s": phase.get("wall_s"),
    }


def run_mean(result: Mapping[str, Any], key: str) -> float | None:
    """Mean of ``key`` over the run's training steps that logged it; None if none did (e.g. a GRPO run's herl/*,
    or a metric newer than the run)."""
    vals = [float(h[key]) for h in result["history"] if h.get(key) is not None]
    return sum(vals) / len(vals) if vals else None


def curve_points(result: Mapping[str, Any], key: str) -> dict[int, float]:
    """{step: value} of ``key`` over the run's history, plus the final validation (step = train.steps)."""
    points = {int(h["step"]): float(h[key]) for h in result["history"] if h.get(key) is not None}
    final = result["final"]
    if final and final.get(key) is not None:
        points[int(final["step"])] = float(final[key])
    return points


# --------------------------------------------------------------------------------------------------------------------
# aggregation


def _band(values: Sequence[float]) -> dict[str, Any]:
    ci = mean_ci(values)
    half = ci["half"] or 0.0
    return {**ci, "low": ci["mean"] - half, "high": ci["mean"] + half}


def paired_table(
    a: Mapping[int, Mapping[str, float]], b: Mapping[int, Mapping[str, float]]
) -> tuple[list[int], list[list[float]]] | None:
    """The paired differences A − B, ``{seed: {prompt id: value}}`` each: the seeds both have and, per seed, the
    differences over the prompts every such run has (sorted by id); None when no seed or prompt is shared."""
    seeds = sorted(set(a) & set(b))
    if not seeds:
        return None
    prompts = sorted(set.intersection(*(set(a[s]) & set(b[s]) for s in seeds)))
    if not prompts:
        return None
    return seeds, [[a[s][p] - b[s][p] for p in prompts] for s in seeds]


def _paired(a: Mapping[int, Mapping[str, float]], b: Mapping[int, Mapping[str, float]]) -> dict[str, Any] | None:
    """Bootstrap of the paired difference A − B over the seeds both have and the prompts every such run has."""
    paired = paired_table(a, b)
    if paired is None:
        return None
    seeds, table = paired
    return {**paired_bootstrap(table, BOOTSTRAP_REPS, seed=BOOTSTRAP_SEED), "seed_list": seeds}


def build_report(
    study: StudyConfig, runs: Sequence[Mapping[str, Any]], root: Path, profile: str | None, study_file: str
) -> dict[str, Any]:
    """Everything the report shows, from ``<root>/<results_dir>`` (module doc). ``runs``: the plan."""
    results_root = root / study.results_dir
    done: dict[str, dict[str, Any]] = {}
    for run in runs:
        folder = root / run["results"]
        if (folder / RUN_RECORD).is_file():
            done[run["name"]] = {**collect_run(folder), "run": run}
    finished = {p: [r["name"] for r in runs if p in done.get(r["name"], {}).get("record", {}).get("phases", {})]
                for p in study.phases}  # fmt: skip
    expected = {p: [r["name"] for r in runs if r["commands"][p]] for p in study.phases}
    remaining = {p: [n for n in expected[p] if n not in finished[p]] for p in study.phases}
    command = f"herl study --study {study_file} --profile {profile}"
    parts = [f"{p}: {len(finished[p])} of {len(expected[p])} runs done" for p in study.phases]
    status = {
        "finished": finished,
        "remaining": remaining,
        "complete": not any(remaining.values()),
        "line": "; ".join(parts),
        "continue": None if not any(remaining.values()) else command,
    }

    # ---- per group (arm or arm-variant): primary metric, per type, curves, budget
    trained = [done[r["name"]] for r in runs if r["arm"] != "base" and r["name"] in done]
    groups: dict[str, list[dict[str, Any]]] = {}
    for res in trained:
        groups.setdefault(group_name(res["run"]["arm"], res["run"]["variant"]), []).append(res)
    outcomes: dict[str, dict[int, dict[str, float]]] = {}  # group → seed → prompt → final all-met share
    base_outcomes: dict[int, dict[str, float]] = {}  # seed → prompt → step-0 all-met share
    base_values: dict[int, dict[str, float]] = {}  # seed → step-0 val/* metrics (first run of the seed)
    arms: dict[str, Any] = {}
    for group, members in groups.items():
        finals = [m for m in members if m["final"]]
        metrics: dict[str, Any] = {}
        if finals:
            keys = sorted({k for m in finals for k in m["final"] if k.startswith("val/") and "min_draw" not in k})
            metrics = {k: mean_ci([m["final"].get(k) for m in finals]) for k in keys}
        budget_rows = [run_budget(m) for m in members]
        budget = {k: mean_ci([b[k] for b in budget_rows]) for k in budget_rows[0]}
        curves = {}
        for key in CURVE_KEYS:
            per_run = [curve_points(m, key) for m in members]
            steps = sorted({s for p in per_run for s in p})
            curves[key] = {"step": steps, **{f: [] for f in ("mean", "low", "high", "n")}}
            for s in steps:
                band = _band([p[s] for p in per_run if s in p])
                for f in ("mean", "low", "high", "n"):
                    curves[key][f].append(band[f])
        arms[group] = {
            "arm": members[0]["run"]["arm"],
            "variant": members[0]["run"]["variant"],
            "seeds": [m["run"]["seed"] for m in members],
            "metrics": metrics,
            "budget": budget,
            "curves": curves,
            "training": {k: mean_ci([run_mean(m, k) for m in members]) for k in TRAIN_DIAGNOSTICS},
        }
        for m in members:
            seed = m["run"]["seed"]
            if m["final"] and m["outcomes"]:
                outcomes.setdefault(group, {})[seed] = m["outcomes"][max(m["outcomes"])]
            if 0 in m["outcomes"] and seed not in base_outcomes:
                base_outcomes[seed] = m["outcomes"][0]
            step0 = next((h for h in m["history"] if h.get("step") == 0 and PRIMARY in h), None)
            if step0 is not None and seed not in base_values:
                base_values[seed] = {k: v for k, v in step0.items() if k.startswith("val/") and "min_draw" not in k}
    if base_values:
        keys = sorted({k for v in base_values.values() for k in v})
        arms = {
            "base": {
                "arm": "base",
                "variant": None,
                "seeds": sorted(base_values),
                "metrics": {k: mean_ci([v.get(k) for v in base_values.values()]) for k in keys},
                "budget": {},
                "curves": {},
            },
            **arms,
        }
    step0_check = _step0_agreement(trained)

    # ---- paired differences
    have = {*outcomes, *(["base"] if base_outcomes else [])}
    paired = []
    for a, b in comparisons(arms, have):
        result = _paired(outcomes[a], base_outcomes if b == "base" else outcomes[b])
        if result is not None:
            paired.append({"a": a, "b": b, **result})

    # ---- budget ratios: tokens per arm relative to grpo and to herl (same variant)
    for info in arms.values():
        mine = info["budget"].get("train_tokens", {}).get("mean") if info["budget"] else None
        for ref in ("grpo", "herl"):
            theirs = arms.get(group_name(ref, info["variant"]), {}).get("budget", {}).get("train_tokens", {})
            ratio = mine / theirs["mean"] if mine and theirs.get("mean") else None
            info.setdefault("tokens_vs", {})[ref] = ratio

    # ---- broad test: base (one run) and each group, per round
    broad: dict[str, list[dict[str, Any]]] = {}
    for res in done.values():
        if not res["broad"]:
            continue
        group = group_name(res["run"]["arm"], res["run"]["variant"])
        broad.setdefault(group, []).append(res["broad"])
    broad_table = {group: _broad_rounds(rows) for group, rows in broad.items()}
    sizes: dict[str, set[tuple[Any, Any]]] = {}
    for res in done.values():
        for bench, m in res["broad"].items():
            sizes.setdefault(bench, set()).add((m.get("n_prompts"), m.get("n_prompts_scored")))
    short: dict[str, dict[str, list[Any]]] = {}  # group → "<bench>/<short | met_by_short>" → per run
    for res in done.values():
        group = group_name(res["run"]["arm"], res["run"]["variant"])
        for bench, values in res["broad_short"].items():
            for key, value in values.items():
                short.setdefault(group, {}).setdefault(f"{bench}/{key}", []).append(value)
    broad_info = {
        "caps": sorted({res["broad_cap"] for res in done.values() if res["broad"] and res["broad_cap"]}),
        "prompts": {b: [list(x) for x in sorted(v, key=str)] for b, v in sorted(sizes.items())},
        "short": {g: {k: mean_ci(v) for k, v in t.items()} for g, t in short.items()},
    }
    broad_paired = _broad_paired(done.values())

    return {
        "profile": profile,
        "study_file": study_file,
        "report": study.report,
        "results_dir": study.results_dir,
        "design": {
            "params": study.params,
            "params_profile": study.params_profile,
            "arms": list(study.arms),
            "seeds": list(study.seeds),
            "variants": study.variants,
            "overrides": list(study.overrides),
            "equal_tokens": study.equal_tokens.model_dump() if study.equal_tokens else None,
            "phases": list(study.phases),
        },
        "preregistered": study.preregistered,
        "data": _read_json(results_root / "data.json") if (results_root / "data.json").is_file() else None,
        "status": status,
        "arms": arms,
        "paired": paired,
        "broad": broad_table,
        "broad_paired": broad_paired,
        "broad_info": broad_info,
        "step0_check": step0_check,
        "power": _power(study, outcomes, arms, base_outcomes) if study.power else None,
        "runs": [_run_row(done[r["name"]]) for r in runs if r["name"] in done],
    }


def comparisons(arms: Mapping[str, Mapping[str, Any]], have: set[str]) -> list[tuple[str, str]]:
    """The (A, B) groups a report compares, both in ``have``: the ARM_PAIRS in their order (same variant), then every
    trained group against base. ``arms``: group → {"arm", "variant"}."""
    pairs = [(g, group_name(b, info["variant"])) for a, b in ARM_PAIRS for g, info in arms.items() if info["arm"] == a]
    pairs += [(g, "base") for g, info in arms.items() if info["arm"] != "base"]
    return [(a, b) for a, b in pairs if a in have and b in have]


def _broad_paired(results: Any) -> list[dict[str, Any]]:
    """Paired differences of the broad test's prompt-level strict accuracy, per benchmark and round ("<bench>/<r>"):
    the same comparisons as the primary metric's. Per seed and prompt, A − B; base ran once (greedy: no seed), so
    its value stands for every seed of the other group. ``results``: the finished runs' ``collect_run`` dicts with
    their plan entry (``run``), in plan order."""
    values: dict[str, dict[str, dict[Any, dict[str, float]]]] = {}  # group → "<bench>/<r>" → seed → prompt → 0/1
    kinds: dict[str, dict[str, Any]] = {}
    for res in results:
        run = res["run"]
        group = group_name(run["arm"], run["variant"])
        kinds[group] = {"arm": run["arm"], "variant": run["variant"]}
        for bench, rounds in res.get("broad_outcomes", {}).items():
            for r, outcome in enumerate(rounds):
                values.setdefault(group, {}).setdefault(f"{bench}/{r}", {})[run["seed"]] = outcome
    out = []
    for a, b in comparisons(kinds, set(values)):
        cells = {}
        for key, mine in values[a].items():
            theirs = values[b].get(key)
            if theirs is None:
                continue
            if b == "base":
                theirs = {seed: theirs[None] for seed in mine}
            result = _paired(mine, theirs)
            if result is not None:
                cells[key] = result
        if cells:
            out.append({"a": a, "b": b, "cells": cells})
    return out


def _step0_agreement(trained: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Pairing check: every run of a seed validated the same untrained policy with the same seeds at step 0, so
    their step-0 primary metric should agree (up to float rounding of the batch layout)."""
    by_seed: dict[int, list[float]] = {}
    for m in trained:
        step0 = next((h for h in m["history"] if h.get("step") == 0 and PRIMARY in h), None)
        if step0 is not None:
            by_seed.setdefault(m["run"]["seed"], []).append(float(step0[PRIMARY]))
    spread = {s: max(v) - min(v) for s, v in by_seed.items()}
    return {"max_spread": max(spread.values(), default=0.0), "per_seed": spread}


def _broad_rounds(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Per round: {"<bench>/<metric>": mean_ci over the runs} (round 0 = plain greedy generation)."""
    n = max((len(b.get("rounds") or [b]) for row in rows for b in row.values()), default=0)
    out = []
    for i in range(n):
        table: dict[str, Any] = {}
        for bench in sorted({b for row in rows for b in row}, key=bench_order):
            for metric in (*METRICS, *BROAD_LENGTH):
                vals = []
                for row in rows:
                    rounds = row.get(bench, {}).get("rounds") or [row.get(bench, {})]
                    if i < len(rounds) and rounds[i].get(metric) is not None:
                        vals.append(rounds[i][metric])
                    elif i == 0 and metric == "truncated_frac" and row.get(bench, {}).get(metric) is not None:
                        vals.append(row[bench][metric])
                if vals:
                    table[f"{bench}/{metric}"] = mean_ci(vals)
        out.append(table)
    return out


def _power(
    study: StudyConfig,
    outcomes: Mapping[str, Mapping[int, Mapping[str, float]]],
    arms: Mapping[str, Any],
    base_outcomes: Mapping[int, Mapping[str, float]],
) -> dict[str, Any]:
    """The minimum detectable paired difference of the main design (``study.power``) from this pilot's variance:
    prompt_var = the variance over prompts of the per-prompt difference between two trained policies of one seed
    (mean over the pilot's pairs of groups; every pair listed), seed_var = the design's assumed sd² when given, else
    2 × the variance over seeds of one group's primary metric (the largest such group)."""
    assert study.power is not None
    design = study.power
    pairs = []
    names = sorted(outcomes)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            for seed in sorted(set(outcomes[a]) & set(outcomes[b])):
                prompts = sorted(set(outcomes[a][seed]) & set(outcomes[b][seed]))
                if len(prompts) > 1:
                    d = [outcomes[a][seed][p] - outcomes[b][seed][p] for p in prompts]
                    pairs.append({"a": a, "b": b, "seed": seed, "prompts": len(d), "var": mean_ci(d)["sd"] ** 2})
    for group in names:
        for seed in sorted(set(outcomes[group]) & set(base_outcomes)):
            prompts = sorted(set(outcomes[group][seed]) & set(base_outcomes[seed]))
            if len(prompts) > 1:
                d = [outcomes[group][seed][p] - base_outcomes[seed][p] for p in prompts]
                pairs.append({"a": group, "b": "base", "seed": seed, "prompts": len(d), "var": mean_ci(d)["sd"] ** 2})
    between = [p["var"] for p in pairs if p["b"] != "base"]
    prompt_var = sum(between) / len(between) if between else None
    seed_var, seed_source = None, None
    if design.seed_sd is not None:
        seed_var, seed_source = design.seed_sd**2, design.seed_sd_source or "assumed (study.yaml power.seed_sd)"
    else:
        multi = [(g, a["metrics"][PRIMARY]) for g, a in arms.items() if PRIMARY in a["metrics"]]
        multi = [(g, ci) for g, ci in multi if ci["n"] > 1]
        if multi:
            group, ci = max(multi, key=lambda x: x[1]["n"])
            seed_var, seed_source = 2 * ci["sd"] ** 2, f"2 × the variance over the {ci['n']} seeds of {group}"
    mde = None
    if prompt_var is not None and seed_var is not None:
        mde = min_detectable_difference(prompt_var, design.prompts, seed_var, design.seeds)
    return {
        "design": design.model_dump(),
        "pairs": pairs,
        "prompt_var": prompt_var,
        "seed_var": seed_var,
        "seed_var_source": seed_source,
        "mde": mde,
    }


def _run_row(res: Mapping[str, Any]) -> dict[str, Any]:
    record = res["record"]
    return {"name": record["name"], "phases": record.get("phases", {})}


# --------------------------------------------------------------------------------------------------------------------
# Markdown


def pts(x: float | None, digits: int = 1) -> str:
    """A rate as points (× 100)."""
    return "–" if x is None else f"{100 * x:.{digits}f}"


def fmt_ci(ci: Mapping[str, Any] | None, scale: float = 100.0, digits: int = 1) -> str:
    """``"41.2 ± 3.1"`` (values × scale); n = 1 → ``"41.2 (n = 1)"``; no value → ``"–"``."""
    if not ci or ci.get("mean") is None:
        return "–"
    mean = f"{ci['mean'] * scale:.{digits}f}"
    return f"{mean} (n = 1)" if ci.get("half") is None else f"{mean} ± {ci['half'] * scale:.{digits}f}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def verdict(pair: Mapping[str, Any], mde: float | None = None) -> str:
    """One plain sentence on a paired difference and its interval."""
    est, lo, hi = (100 * pair[k] for k in ("estimate", "lo", "hi"))
    head = f"{pair['a']} − {pair['b']} = {est:+.1f} points, 95 % interval [{lo:+.1f}, {hi:+.1f}]"
    size = f" ({pair['seeds']} seeds × {pair['prompts']} prompts)"
    if lo > 0:
        return f"{head}{size}: {pair['a']} is better; the interval excludes 0."
    if hi < 0:
        return f"{head}{size}: {pair['b']} is better; the interval excludes 0."
    tail = f"; differences below the pre-registered MDE of {100 * mde:.1f} points were not resolvable" if mde else ""
    return f"{head}{size}: no detectable difference, the interval covers 0{tail}."


def render_markdown(summary: Mapping[str, Any]) -> str:
    """The report: status, pre-registered design, primary metric, paired differences, curves, per-type rates, budget,
    broad test, power (pilot) and every run's commit and commands."""
    status = summary["status"]
    lines = [f"# Study `{summary['profile']}` ({summary['study_file']})", ""]
    lines += [f"Status: {status['line']}."]
    if status["continue"]:
        lines += [f"Continue with `{status['continue']}` (resumes; finished runs are reused)."]
    lines += ["", f"Rendered from `{summary['results_dir']}` alone (`herl study --profile {summary['profile']} "
              "--report-only` reproduces this file).", ""]  # fmt: skip
    lines += _design_section(summary) + _primary_section(summary) + _paired_section(summary)
    lines += _curve_section(summary) + _type_section(summary) + _diagnostic_section(summary) + _budget_section(summary)
    lines += _broad_section(summary) + _power_section(summary)
    if summary.get("plots"):
        lines += ["## Plots", ""] + [f"![{k}]({p})" for k, p in summary["plots"].items()] + [""]
    lines += ["## Runs", "", "Every finished phase: the commit it ran at, its wall time and its exact commands "
              "(`herl` = `python -m flows.cli`).", ""]  # fmt: skip
    for run in summary["runs"]:
        for phase, p in run["phases"].items():
            host = p.get("host") or {}
            load = [f"{x:.2f}" if isinstance(x, int | float) else x for x in host.get("load_avg_1_5_15") or [None]]
            dirty = " (uncommitted changes)" if p.get("dirty") else ""
            retrained = ", policy retrained on this machine" if p.get("retrained") else ""
            lines += [f"- `{run['name']}` {phase}: commit `{p.get('commit', '?')[:10]}`{dirty}, {p.get('started')} → "
                      f"{p.get('finished')} UTC, {p.get('wall_s')} s wall on {host.get('cores')} × "
                      f"{host.get('cpu')} (load {load[0]}){retrained}"]  # fmt: skip
            lines += [f"  - `{cmd}`" for cmd in p.get("commands", [])]
    return "\n".join(lines) + "\n"


def _design_section(summary: Mapping[str, Any]) -> list[str]:
    d = summary["design"]
    lines = ["## Design", ""]
    for key, text in summary["preregistered"].items():
        lines += [f"- **{key}**: {text}"]
    lines += [f"- arms {d['arms']}, seeds {d['seeds']}, params `{d['params']}` profile `{d['params_profile']}`"]
    if d["variants"]:
        lines += [f"- variants (each run for every trained arm × seed): {d['variants']}"]
    if d["equal_tokens"]:
        e = d["equal_tokens"]
        lines += [f"- grpo_equal_tokens: G = {e['rollout_n']} ({e['source']})"]
    lines += [f"- shared overrides: `{' '.join(d['overrides'])}`"]
    data = summary.get("data")
    if data:
        splits = data["report"]["splits"]
        sizes = ", ".join(f"{k} {v['prompts']}" for k, v in splits.items())
        types = data["report"].get("constraint_types") or "all sampleable IFEval types"
        lines += [f"- data: {sizes} prompts; constraint types {types}"]
    return [*lines, ""]


def _primary_section(summary: Mapping[str, Any]) -> list[str]:
    arms = summary["arms"]
    if not any(PRIMARY in a["metrics"] for a in arms.values()):
        return ["## Primary metric", "", "No finished run has validation (train.eval_every = 0, or nothing ran).", ""]
    rows = []
    for group, a in arms.items():
        ci = a["metrics"].get(PRIMARY)
        greedy = a["metrics"].get("val/greedy/all_met_frac")
        pass_k = a["metrics"].get("val/pass_at_k")
        values = ", ".join(pts(v) for v in (ci or {}).get("values", []))
        sd = pts((ci or {}).get("sd"))
        rows.append([group, str(len(a["seeds"])), fmt_ci(ci), values, sd, fmt_ci(pass_k), fmt_ci(greedy)])
    intro = (
        "Held-out all-constraints-met rate in %: the share of the k sampled answers (rollout temperature) per "
        "held-out prompt that meet every constraint, after the last update; mean ± 95 % Student-t half-width over "
        "seeds. `base` = the untrained policy (step 0 of the trained runs, same validation seeds). pass@k = prompts "
        "with at least one such answer; greedy = one greedy answer per prompt. Seed sd: the sample standard deviation "
        "over seeds (n − 1), the spread a power calculation has to assume before the seeds exist."
    )
    head = ["arm", "seeds", "all-met (primary)", "per seed", "seed sd", "pass@k", "greedy all-met"]
    check = summary["step0_check"]
    note = (f"Pairing check: the step-0 primary metric of the runs of one seed differs by at most "
            f"{pts(check['max_spread'], 2)} points (same untrained policy, same validation seeds).")  # fmt: skip
    return ["## Primary metric (pre-registered)", "", intro, "", *_table(head, rows), "", note, ""]


def _paired_section(summary: Mapping[str, Any]) -> list[str]:
    if not summary["paired"]:
        return []
    rows = [
        [f"{p['a']} − {p['b']}", f"{100 * p['estimate']:+.1f}", f"[{100 * p['lo']:+.1f}, {100 * p['hi']:+.1f}]",
         f"{p['frac_positive']:.3f}", f"{p['seeds']} × {p['prompts']}"]
        for p in summary["paired"]
    ]  # fmt: skip
    intro = (
        "Paired difference of the primary metric in points: per seed and held-out prompt, the difference of the two "
        "runs' all-met shares (same prompts, same data order, same initial samples, same validation seeds); mean "
        f"over seeds × prompts; 95 % percentile interval of {BOOTSTRAP_REPS} bootstrap replicates resampling seeds "
        "and prompts (herl_core/stats.py `paired_bootstrap`); P(D* > 0) = share of replicates above 0."
    )
    head = ["comparison", "difference", "95 % interval", "P(D* > 0)", "seeds × prompts"]
    lines = ["## Paired differences", "", intro, "", *_table(head, rows), ""]
    mde = summary["preregistered"].get("mde_points")
    try:
        mde_value = float(mde) / 100 if mde is not None else None
    except ValueError:
        mde_value = None
    for p in summary["paired"]:
        if p["b"] != "base":
            lines += [f"- {verdict(p, mde_value)}"]
    return [*lines, ""]


def _curve_section(summary: Mapping[str, Any]) -> list[str]:
    arms = {g: a for g, a in summary["arms"].items() if a["curves"].get(PRIMARY, {}).get("step")}
    if not arms:
        return []
    steps = sorted({s for a in arms.values() for s in a["curves"][PRIMARY]["step"]})
    rows = []
    for group, a in arms.items():
        c = a["curves"][PRIMARY]
        at = dict(zip(c["step"], zip(c["mean"], c["low"], c["high"], strict=True), strict=True))
        rows.append([group, *(f"{pts(at[s][0])} [{pts(at[s][1])}, {pts(at[s][2])}]" if s in at else "–"
                              for s in steps)])  # fmt: skip
    intro = (
        "Learning curve of the primary metric (%): mean over seeds [95 % band] at each validation point; step s = "
        "the policy before step s's update, the last column the policy after the last update."
    )
    return ["## Learning curves", "", intro, "", *_table(["arm", *map(str, steps)], rows), ""]


def _type_section(summary: Mapping[str, Any]) -> list[str]:
    arms = summary["arms"]
    keys = {k for a in arms.values() for k in a["metrics"] if k.startswith("val/type/")}
    types = sorted(k.removeprefix("val/type/") for k in keys)
    if not types:
        return []
    rows = [[t, *(fmt_ci(a["metrics"].get(f"val/type/{t}")) for a in arms.values())] for t in types]
    intro = "Pass rate per constraint type on the held-out prompts (sampled answers), %, mean ± 95 % over seeds."
    return ["## Per-type pass rates (held out, after training)", "", intro, "", *_table(["type", *arms], rows), ""]


def _diagnostic_section(summary: Mapping[str, Any]) -> list[str]:
    """Length and truncation of what each arm generated (held out, after training) and trained on (per step)."""
    arms = summary["arms"]
    held_out = [("val/truncated_frac", "held-out cut %", 100.0), ("val/response_len", "held-out length", 1.0)]
    train = [(k, label, scale) for k, (label, scale) in TRAIN_DIAGNOSTICS.items()
             if any((a.get("training") or {}).get(k, {}).get("mean") is not None for a in arms.values())]  # fmt: skip
    if not any(a["metrics"].get(k) for a in arms.values() for k, _, _ in held_out) and not train:
        return []
    rows = []
    for group, a in arms.items():
        cells = [fmt_ci(a["metrics"].get(k), scale) for k, _, scale in held_out]
        cells += [fmt_ci((a.get("training") or {}).get(k), scale) for k, _, scale in train]
        rows.append([group, *cells])
    intro = (
        "What each arm generated and trained on, mean ± 95 % over seeds. Held out: the final validation's sampled "
        "answers (share cut at the token cap without EOS, mean length in tokens). Training: each run's mean over its "
        "steps of the rollouts' and, for HeRL arms, the rewrites' length and truncation, the share of rewrites "
        "scoring above their draft, and the share of trained tokens that came from guided rewrites (docs/metrics.md). "
        "Not pre-registered: read these to explain the primary metric, not as results of their own."
    )
    head = ["arm", *(label for _, label, _ in held_out), *(label for _, label, _ in train)]
    return ["## Diagnostics: length and truncation", "", intro, "", *_table(head, rows), ""]


def _budget_section(summary: Mapping[str, Any]) -> list[str]:
    arms = {g: a for g, a in summary["arms"].items() if a["budget"]}
    if not arms:
        return []
    rows = []
    for group, a in arms.items():
        b, vs = a["budget"], a.get("tokens_vs", {})
        ratio = " / ".join("–" if vs.get(r) is None else f"{vs[r]:.2f}" for r in ("grpo", "herl"))
        rows.append([group, fmt_ci(b["train_tokens"], 1.0, 0), ratio, fmt_ci(b["val_tokens"], 1.0, 0),
                     fmt_ci(b["step_s"], 1.0, 0), fmt_ci(b["val_s"], 1.0, 0), fmt_ci(b["wall_s"], 1.0, 0)])  # fmt: skip
    intro = (
        "Per run, mean ± 95 % over seeds. Training tokens = rollouts + hindsight rewrites (`perf/gen_tokens`), the "
        "equal-budget check (× grpo / × herl); validation tokens are the same work for every arm. Seconds: the sum "
        "of the step times (validation excluded), the validation time, and the train phase's wall time (model "
        "loading included) on a machine shared with other work (see Runs for the load)."
    )
    head = ["arm", "train tokens", "× grpo / × herl", "val tokens", "step s", "val s", "wall s"]
    return ["## Budget: tokens and time", "", intro, "", *_table(head, rows), ""]


def _broad_section(summary: Mapping[str, Any]) -> list[str]:
    broad = summary["broad"]
    title = "## Broad test (IFEval / IFBench)"
    if not broad:
        return [title, "", "Not run yet (`--phase broad`).", ""]
    info = summary.get("broad_info") or {}
    caps = info.get("caps") or []
    cap = f"at most {' / '.join(str(c) for c in caps)} tokens per answer" if caps else "the answer cap of each run"
    intro = (
        f"Greedy answers of each final policy on the benchmarks ({cap}), %, mean ± 95 % over seeds; round 0 = "
        "plain generation, round 1 = after one revision with the strict checker verdicts visible (test-time "
        "self-improvement; the policy plus verifier feedback, not the policy alone). Cut = answers that reached "
        "the cap without ending."
    )
    lines = [title, "", intro, ""]
    benches = sorted({k.split("/", 1)[0] for rounds in broad.values() for t in rounds for k in t}, key=bench_order)
    for bench in benches:
        sizes = info.get("prompts", {}).get(bench) or []
        size = "; ".join(f"{n} prompts, {k} scored" if n != k else f"{n} prompts" for n, k in sizes)
        rows = [[group, str(r), *(fmt_ci(t.get(f"{bench}/{m}")) for m in (*METRICS, "truncated_frac")),
                 fmt_ci(t.get(f"{bench}/response_tokens_mean"), scale=1.0)]
                for group, rounds in broad.items() for r, t in enumerate(rounds)]  # fmt: skip
        head = ["arm", "round", "prompt-strict", "inst-strict", "prompt-loose", "inst-loose", "cut", "tokens"]
        lines += [f"{bench}" + (f" ({size}):" if size else ":"), "", *_table(head, rows), ""]
        short = {g: t for g, t in (info.get("short") or {}).items() if f"{bench}/short" in t}
        if short:
            rows = [[g, fmt_ci(t[f"{bench}/short"]), fmt_ci(t.get(f"{bench}/met_by_short"))] for g, t in short.items()]
            head = ["arm", f"answers < {SHORT_TOKENS} tokens", f"met prompts answered in < {SHORT_TOKENS} tokens"]
            lines += [f"{bench}, short answers after the last round (a word or a phrase meets many format rules "
                      "vacuously), %:", "", *_table(head, rows), ""]  # fmt: skip
    return lines + _broad_paired_section(summary)


def _broad_paired_section(summary: Mapping[str, Any]) -> list[str]:
    pairs = summary.get("broad_paired") or []
    keys = sorted(
        {k for p in pairs for k in p["cells"]}, key=lambda k: (*bench_order(k.split("/")[0]), int(k.rsplit("/", 1)[1]))
    )
    if not keys:
        return []

    def cell(c: Mapping[str, Any] | None) -> str:
        if c is None:
            return "–"
        return f"{100 * c['estimate']:+.1f} [{100 * c['lo']:+.1f}, {100 * c['hi']:+.1f}]"

    sizes = {k: next(f"{p['cells'][k]['seeds']} × {p['cells'][k]['prompts']}" for p in pairs if k in p["cells"])
             for k in keys}  # fmt: skip
    head = ["comparison", *(f"{k.split('/')[0]} round {k.split('/')[1]}" for k in keys)]
    rows = [[f"{p['a']} − {p['b']}", *(cell(p["cells"].get(k)) for k in keys)] for p in pairs]
    intro = (
        "Paired differences of prompt-level strict accuracy (every instruction of the prompt met), in points: per "
        "seed and prompt, A − B on the same greedy prompts; base ran once, so its answer stands for every seed. "
        "Mean over seeds × prompts with the 95 % percentile interval of "
        f"{BOOTSTRAP_REPS} bootstrap replicates resampling seeds and prompts (seeds × scored prompts: "
        + ", ".join(f"{k.split('/')[0]} {v}" for k, v in sizes.items() if k.endswith("/0"))
        + "). Exploratory: no power analysis."
    )
    return ["Broad test, paired differences:", "", intro, "", *_table(head, rows), ""]


def _power_section(summary: Mapping[str, Any]) -> list[str]:
    power = summary.get("power")
    if not power:
        return []
    design = power["design"]
    lines = ["## Power: the minimum detectable difference of the main design", ""]
    rows = [[f"{p['a']} − {p['b']}", str(p["seed"]), str(p["prompts"]), f"{p['var']:.4f}"] for p in power["pairs"]]
    lines += [*_table(["pair", "seed", "prompts", "variance of per-prompt difference"], rows), ""]
    prompt_var, seed_var = power["prompt_var"], power["seed_var"]
    lines += ["- prompt variance (mean over the pairs of trained policies): "
              + ("–" if prompt_var is None else f"{prompt_var:.4f}")]  # fmt: skip
    lines += ["- seed variance of the run-level difference: " + ("–" if seed_var is None else f"{seed_var:.5f}")
              + f" ({power['seed_var_source'] or 'not available'})"]  # fmt: skip
    mde = power["mde"]
    if mde:
        lines += [f"- design {design['prompts']} held-out prompts × {design['seeds']} seeds: se = "
                  f"{pts(mde['se'], 2)} points, **MDE = {pts(mde['mde'])} points** (two-sided 5 %, "
                  "power 80 %)"]  # fmt: skip
    return [*lines, ""]


# --------------------------------------------------------------------------------------------------------------------
# plots (matplotlib, Agg backend)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_all(summary: Mapping[str, Any], folder: Path) -> dict[str, Path | None]:
    """The report's PNGs in ``folder``: learning curves with bands, broad-test bars."""
    return {
        "learning_curves": plot_curves(summary, folder / "learning_curves.png"),
        "broad_bars": plot_broad(summary, folder / "broad_bars.png"),
    }


def plot_curves(summary: Mapping[str, Any], path: Path) -> Path | None:
    """CURVE_KEYS per step, one line per trained arm (mean over seeds) with its 95 % band; None if nothing logged."""
    arms = {g: a for g, a in summary["arms"].items() if a["curves"]}
    keys = [k for k in CURVE_KEYS if any(a["curves"].get(k, {}).get("step") for a in arms.values())]
    if not keys:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(len(keys), 1, figsize=(7, 2.4 * len(keys)), sharex=True, squeeze=False)
    color = {g: f"C{i}" for i, g in enumerate(arms)}
    for ax, key in zip(axes[:, 0], keys, strict=True):
        for group, a in arms.items():
            c = a["curves"].get(key) or {}
            if c.get("step"):
                ax.plot(c["step"], c["mean"], marker="o", ms=3, label=group, color=color[group])
                # every curve is a rate in [0, 1]; a t-interval over 2-3 seeds can reach past it
                low, high = ([min(max(v, 0.0), 1.0) for v in c[k]] for k in ("low", "high"))
                ax.fill_between(c["step"], low, high, alpha=0.2, color=color[group])
        ax.set_ylabel(key, fontsize=8)
        ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=7)
    axes[-1, 0].set_xlabel("training step (validation: policy before that step's update)")
    fig.suptitle("mean over seeds, band = 95% CI (clipped to [0, 1])", fontsize=9)
    return _save(plt, fig, path)


def plot_broad(summary: Mapping[str, Any], path: Path) -> Path | None:
    """Grouped bars of the broad test's round-0 metrics: one group per metric, one bar per arm, whiskers = 95% CI."""
    rounds = {g: r[0] for g, r in summary["broad"].items() if r}
    keys = [k for k in dict.fromkeys(k for t in rounds.values() for k in t) if not k.endswith(BROAD_LENGTH)]
    if not keys:
        return None
    plt = _pyplot()
    width = 0.8 / len(rounds)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(keys)), 3.6))
    for i, (group, table) in enumerate(rounds.items()):
        cis = [table.get(k) or {} for k in keys]
        means = [100 * (c.get("mean") or 0.0) for c in cis]
        errs = [100 * (c.get("half") or 0.0) for c in cis]
        offset = (i - (len(rounds) - 1) / 2) * width
        ax.bar([j + offset for j in range(len(keys))], means, width, yerr=errs, label=group)
    ax.set_xticks(range(len(keys)), keys, rotation=30, ha="right", fontsize=7)
    ax.set_ylabel("accuracy (%)")
    ax.legend(fontsize=7)
    ax.grid(axis="y", alpha=0.3)
    fig.suptitle("broad test, round 0 (greedy): mean over seeds, whiskers = 95% CI", fontsize=9)
    return _save(plt, fig, path)


def _save(plt, fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=100, metadata={"Software": None})
    plt.close(fig)
    tmp.replace(path)
    return path
