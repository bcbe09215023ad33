"""The HeRL-vs-GRPO study's report: per-run values, aggregation over seeds, the Markdown report and its plots
(spec §7.1-7.2; docs/study.md). flows/study.py writes it from the finished runs of the plan (flows/study_plan.py).

Statistics: mean ± 95% confidence half-width with Student's t over the n seeds (``herl_core.stats.mean_ci``);
n = 1 → no CI.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from flows.study_plan import StudyError, eval_metrics_path
from herl_core.stats import mean_ci

METRICS = ("prompt_strict", "inst_strict", "prompt_loose", "inst_loose")
"""The IFEval/IFBench metrics reported per benchmark."""


def collect_run(run: Mapping[str, Any], benchmarks: Sequence[str]) -> dict[str, Any]:
    """A finished run's results for ``aggregate``: flat eval metrics, per-benchmark rounds, training steps."""
    from herl_core.io import DataError

    def read(path: Path) -> Any:
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise DataError(f"{path}: cannot read the run's result: {exc}") from exc

    folder = Path(run["dir"])
    rounds = {b: read(folder / "evaluate" / b / "metrics.json").get("rounds") or [] for b in benchmarks}
    steps = folder / "train" / "steps.jsonl"
    history = (
        [json.loads(x) for x in steps.read_text(encoding="utf-8").splitlines() if x.strip()] if steps.is_file() else []
    )
    return {
        "arm": run["arm"],
        "seed": run["seed"],
        "eval": read(eval_metrics_path(run)),
        "rounds": rounds,
        "history": history,
    }


# --------------------------------------------------------------------------------------------------------------------
# per-run values


def eval_values(metrics: Mapping[str, Any]) -> dict[str, float | None]:
    """``{"<bench>/<metric>": value}`` for METRICS from the evaluate stage's flat ``metrics.json``."""
    found = {k: v for k, v in metrics.items() if "/" in k and k.rsplit("/", 1)[1] in METRICS}
    if not found:
        raise StudyError(f"evaluate metrics.json holds no '<benchmark>/<metric>' key for {METRICS}: {sorted(metrics)}")
    return found


def headline_values(metrics: Mapping[str, Any], rounds: Sequence[Mapping[str, float | None]]) -> dict:
    """The policy alone: round 0 (plain greedy generation) where the run has self-improvement rounds, since the
    flat ``metrics.json`` then holds the final round's numbers, which used the checkers' verdicts at test time
    (docs/evaluation.md §3: report those beside round 0, never instead of it)."""
    values = eval_values(metrics)
    if rounds:
        values.update({k: v for k, v in rounds[0].items() if v is not None and k in values})
    return values


def round_values(rounds: Mapping[str, Sequence[Mapping[str, Any]]]) -> list[dict[str, float | None]]:
    """Per self-improvement round r (0 = plain generation): ``{"<bench>/<metric>": value}``.

    ``rounds``: ``{bench: the "rounds" list of <evaluate.out_dir>/<bench>/metrics.json}``; [] when not run.
    """
    n = max((len(r) for r in rounds.values()), default=0)
    out = []
    for i in range(n):
        row: dict[str, float | None] = {}
        for bench, per_round in rounds.items():
            row.update({f"{bench}/{m}": per_round[i].get(m) if i < len(per_round) else None for m in METRICS})
        out.append(row)
    return out


TRAIN_KEYS = {
    "reward_final": ("reward/mean", "last"),
    "reward_mean": ("reward/mean", "mean"),
    "frac_zero_std_mean": ("reward/frac_zero_std", "mean"),
    "rewrite_success_rate_mean": ("herl/rewrite_success_rate", "mean"),
    "bonus_mean": ("herl/bonus_mean", "mean"),
    "gen_tokens": ("perf/gen_tokens", "sum"),
    "step_s_mean": ("perf/step_s", "mean"),
}
"""Training diagnostic → (per-step metric in steps.jsonl, reduction over steps)."""


def train_values(history: Sequence[Mapping[str, Any]]) -> dict[str, float | None]:
    """TRAIN_KEYS reduced over one run's steps (None when the metric was never logged, e.g. herl/* for GRPO)."""
    out: dict[str, float | None] = {}
    for name, (key, how) in TRAIN_KEYS.items():
        vals = [float(h[key]) for h in history if h.get(key) is not None and math.isfinite(float(h[key]))]
        if not vals:
            out[name] = None
        elif how == "last":
            out[name] = vals[-1]
        else:
            out[name] = sum(vals) if how == "sum" else sum(vals) / len(vals)
    return out


# --------------------------------------------------------------------------------------------------------------------
# aggregation over seeds


def _ci_table(rows: Sequence[Mapping[str, float | None]]) -> dict[str, dict[str, Any]]:
    keys = list(dict.fromkeys(k for r in rows for k in r))
    return {k: mean_ci([r.get(k) for r in rows]) for k in keys}


def curve(histories: Sequence[Sequence[Mapping[str, Any]]], key: str) -> dict[str, list]:
    """Per step: mean over the runs that logged ``key`` and the 95% CI band (band = mean where n = 1)."""
    steps = sorted({int(h["step"]) for hist in histories for h in hist if h.get(key) is not None})
    out: dict[str, list] = {"step": steps, "mean": [], "low": [], "high": []}
    for step in steps:
        ci = mean_ci([h[key] for hist in histories for h in hist if h.get("step") == step and h.get(key) is not None])
        half = ci["half"] or 0.0
        out["mean"].append(ci["mean"])
        out["low"].append(ci["mean"] - half)
        out["high"].append(ci["mean"] + half)
    return out


CURVES = ("reward/mean", "reward/frac_zero_std", "herl/rewrite_success_rate")


def aggregate(results: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Per arm over seeds: eval metrics, per-round metrics and training diagnostics as ``mean_ci`` dicts, curves.

    ``results``: one ``{"arm", "seed", "eval": flat metrics.json, "rounds": {bench: rounds}, "history": steps.jsonl
    rows}`` per finished run (``collect_run``).
    ``gen_tokens_vs_grpo[arm]`` = mean gen tokens of the arm / those of grpo (the real cost of the rewrites).
    """
    arms = list(dict.fromkeys(r["arm"] for r in results))
    out: dict[str, Any] = {"eval": {}, "rounds": {}, "train": {}, "curves": {}, "seeds": {}}
    for arm in arms:
        runs = [r for r in results if r["arm"] == arm]
        out["seeds"][arm] = [r["seed"] for r in runs]
        per_round = [round_values(r.get("rounds") or {}) for r in runs]
        out["eval"][arm] = _ci_table([headline_values(r["eval"], p) for r, p in zip(runs, per_round, strict=True)])
        n_rounds = max((len(p) for p in per_round), default=0)
        out["rounds"][arm] = [_ci_table([p[i] for p in per_round if i < len(p)]) for i in range(n_rounds)]
        if arm != "base":
            out["train"][arm] = _ci_table([train_values(r["history"]) for r in runs])
            out["curves"][arm] = {k: curve([r["history"] for r in runs], k) for k in CURVES}
    grpo_tokens = out["train"].get("grpo", {}).get("gen_tokens", {}).get("mean")
    out["gen_tokens_vs_grpo"] = {}
    for arm, table in out["train"].items():
        mine = table.get("gen_tokens", {}).get("mean")
        out["gen_tokens_vs_grpo"][arm] = mine / grpo_tokens if mine is not None and grpo_tokens else None
    return out


# --------------------------------------------------------------------------------------------------------------------
# report


def fmt_ci(ci: Mapping[str, Any] | None, scale: float = 100.0, digits: int = 1) -> str:
    """``"41.2 ± 3.1"`` (values × scale); n = 1 → ``"41.2 (CI n/a)"``; no value → ``"–"``."""
    if not ci or ci.get("mean") is None:
        return "–"
    mean = f"{ci['mean'] * scale:.{digits}f}"
    return f"{mean} (CI n/a)" if ci.get("half") is None else f"{mean} ± {ci['half'] * scale:.{digits}f}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def _eval_section(summary: Mapping[str, Any]) -> list[str]:
    keys = list(dict.fromkeys(k for table in summary["eval"].values() for k in table))
    rows = [
        [arm, str(len(summary["seeds"][arm])), *(fmt_ci(table.get(k)) for k in keys)]
        for arm, table in summary["eval"].items()
    ]
    intro = (
        "Accuracy in %, mean ± 95% CI half-width over seeds (Student t, n − 1 df); n = 1 → CI n/a. Plain greedy "
        "generation by the policy alone (round 0); answers revised with checker feedback are in the next table."
    )
    return ["## Held-out evaluation (greedy, round 0)", "", intro, "", *_table(["arm", "n", *keys], rows), ""]


def _rounds_section(summary: Mapping[str, Any]) -> list[str]:
    if not any(len(r) > 1 for r in summary["rounds"].values()):
        return ["## Test-time self-improvement", "", "Not run (evaluate.self_improve_rounds = 0).", ""]
    keys = list(dict.fromkeys(k for rounds in summary["rounds"].values() for t in rounds for k in t))
    rows = [
        [arm, str(r), *(fmt_ci(table.get(k)) for k in keys)]
        for arm, rounds in summary["rounds"].items()
        for r, table in enumerate(rounds)
    ]
    intro = "Round 0 = plain generation; round r = after r revisions with the strict checker verdicts visible."
    return ["## Test-time self-improvement", "", intro, "", *_table(["arm", "round", *keys], rows), ""]


def _train_section(summary: Mapping[str, Any]) -> list[str]:
    header = ["arm", "reward final", "reward mean", "frac_zero_std", "rewrite success", "bonus", "gen tokens", "× grpo"]
    rows = []
    for arm, t in summary["train"].items():
        ratio = summary["gen_tokens_vs_grpo"].get(arm)
        rows.append(
            [
                arm,
                *(fmt_ci(t.get(k), 1.0, 3) for k in ("reward_final", "reward_mean", "frac_zero_std_mean")),
                *(fmt_ci(t.get(k), 1.0, 3) for k in ("rewrite_success_rate_mean", "bonus_mean")),
                fmt_ci(t.get("gen_tokens"), 1.0, 0),
                "–" if ratio is None else f"{ratio:.2f}",
            ]
        )
    intro = (
        "Per run, then mean ± 95% CI over seeds: reward = mean constraint reward of the rollouts (final step / mean "
        "over steps); frac_zero_std = share of groups with no reward spread (no GRPO signal), mean over steps; "
        "rewrite success = share of rewrites scoring above their draft; gen tokens = rollout + rewrite tokens over "
        "the whole run (× grpo = the extra generation HeRL pays)."
    )
    return ["## Training diagnostics", "", intro, "", *_table(header, rows), ""]


def render_markdown(summary: Mapping[str, Any]) -> str:
    """reports/study.md: header (command, date, budget), eval table, per-round table, diagnostics, plots, runs."""
    meta = summary["meta"]
    lines = [f"# HeRL vs GRPO study: profile `{meta['study_profile']}`", ""]
    lines += [f"- date: started {meta['date']}, report written {meta.get('finished', meta['date'])} (UTC)"]
    if meta.get("rerendered"):
        lines += [f"- report re-rendered {meta['rerendered']} from the same runs (`herl study --report-only`)"]
    lines += [f"- command: `{meta['command']}`"]
    lines += [f"- params: `{meta['params']}` profile `{meta['params_profile']}`, seeds {meta['seeds']}"]
    lines += [f"- equal budget (every trained arm): {meta['budget']}", ""]
    lines += _eval_section(summary) + _rounds_section(summary) + _train_section(summary)
    lines += ["## Plots", ""] + [f"![{name}]({path})" for name, path in meta.get("plots", {}).items()] + [""]
    lines += ["## Runs", "", "Each run's exact commands (`herl` = `python -m flows.cli`):", ""]
    for run in meta["runs"]:
        lines += [f"- `{run['name']}`" + (" (reused)" if run.get("reused") else "")]
        lines += [f"  - `{cmd}`" for cmd in run["commands"]]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------------------------------
# plots (matplotlib, Agg backend)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curves(summary: Mapping[str, Any], path: str | Path) -> Path | None:
    """CURVES per step, one line per trained arm (mean over seeds) with its 95% CI band; None if nothing logged."""
    keys = [k for k in CURVES if any(c.get(k, {}).get("step") for c in summary["curves"].values())]
    if not keys:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(len(keys), 1, figsize=(7, 2.4 * len(keys)), sharex=True, squeeze=False)
    color = {arm: f"C{i}" for i, arm in enumerate(summary["curves"])}  # one colour per arm in every panel
    for ax, key in zip(axes[:, 0], keys, strict=True):
        for arm, curves in summary["curves"].items():
            c = curves.get(key) or {}
            if c.get("step"):
                ax.plot(c["step"], c["mean"], marker="o", ms=3, label=arm, color=color[arm])
                ax.fill_between(c["step"], c["low"], c["high"], alpha=0.2, color=color[arm])
        ax.set_ylabel(key, fontsize=8)
        ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=8)
    axes[-1, 0].set_xlabel("training step")
    fig.suptitle("training curves: mean over seeds, band = 95% CI", fontsize=9)
    return _save(plt, fig, path)


def plot_eval(summary: Mapping[str, Any], path: str | Path) -> Path | None:
    """Grouped bars: one group per eval metric, one bar per arm (mean, %), whiskers = 95% CI half-width."""
    keys = list(dict.fromkeys(k for table in summary["eval"].values() for k in table))
    if not keys:
        return None
    plt = _pyplot()
    arms = list(summary["eval"])
    width = 0.8 / len(arms)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(keys)), 3.6))
    for i, arm in enumerate(arms):
        cis = [summary["eval"][arm].get(k) or {} for k in keys]
        means = [100 * (c.get("mean") or 0.0) for c in cis]
        errs = [100 * (c.get("half") or 0.0) for c in cis]
        ax.bar([j + (i - (len(arms) - 1) / 2) * width for j in range(len(keys))], means, width, yerr=errs, label=arm)
    ax.set_xticks(range(len(keys)), keys, rotation=30, ha="right", fontsize=7)
    ax.set_ylabel("accuracy (%)")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.suptitle("held-out evaluation: mean over seeds, whiskers = 95% CI", fontsize=9)
    return _save(plt, fig, path)


def _save(plt, fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)
    return path
