"""What the ``herl`` commands print for a person: errors, live progress, one short summary per stage, a closing block.

Everything goes to stderr (``CONSOLE``); stdout is left for the ``--json`` summaries scripts read.

* Progress (``Progress``): in a terminal, a bar with the count, the elapsed time and an ETA, redrawn live, with one
  line per finished step or batch printed above it; written to a file or a pipe (a log, ``herl pipeline``'s stage
  output, CI), the same lines without the bar, one per update, each with its ETA.
* Steps: ``step`` is the 0-based index of a training step everywhere (console, MLflow, ``steps.jsonl``, the
  experiences table); the console adds how many of the run's steps are done: ``[2/4] step 1``.
* Summaries (``stage_summary``): one or two lines per stage from its headline numbers (``herl_core.stages.headline``),
  then where its files and its MLflow run are (``closing``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.progress import Progress as RichProgress

CONSOLE = Console(stderr=True)


def error(message: object, console: Console = CONSOLE) -> None:
    """``error: <message>`` in red, never re-wrapped (a path or a ``file:line`` stays whole and copy-pasteable) and
    never read as rich markup (messages quote ``[...]`` lists)."""
    console.print(f"[red]error:[/red] {escape(str(message))}", soft_wrap=True)


def say(text: str, console: Console = CONSOLE) -> None:
    """One plain line (no markup, no re-wrapping)."""
    console.print(text, markup=False, highlight=False, soft_wrap=True)


# --------------------------------------------------------------------------------------------------------------------
# numbers


RATES = ("reward/", "herl/rewrite_success_rate", "herl/over_prev_best_rate", "herl/bonus_mean", "pass_at_G",
         "_frac", "_strict", "_loose", "val/reward_mean", "pass_at_k")  # fmt: skip
"""Keys shown with 3 decimals (rates, scores, rewards in [0, 1])."""


def number(value: Any, key: str = "") -> str:
    """A number as a person reads it: rates and scores with 3 decimals, counts as integers, the rest 4 digits."""
    if value is None:
        return "n/a"
    if isinstance(value, bool) or not isinstance(value, int | float):
        return str(value)
    if isinstance(value, float) and math.isnan(value):
        return "nan"
    if float(value).is_integer() and not any(r in key for r in RATES):
        return str(int(value))
    if any(r in key for r in RATES):
        return f"{value:.3f}"
    return f"{value:.4g}"


def plural(count: Any, noun: str) -> str:
    """``1 step``, ``4 steps``."""
    return f"{number(count)} {noun}{'' if count == 1 else 's'}"


def duration(seconds: float) -> str:
    """``42s``, ``3m05s``, ``1h02m``."""
    seconds = max(int(round(seconds)), 0)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


# --------------------------------------------------------------------------------------------------------------------
# progress


class Progress:
    """Progress of ``total`` units (``label``): ``update(done, line)`` after each one. In a terminal a live bar (count,
    elapsed, ETA) with ``line`` printed above it; otherwise ``line`` plus the ETA, one line per update. The ETA is the
    time per unit so far in this process times the units left (a resumed run counts only its own units)."""

    def __init__(self, label: str, total: int, unit: str, console: Console = CONSOLE):
        self.label, self.total, self.unit, self.console = label, total, unit, console
        self.started = time.monotonic()
        self.updates = 0
        self.live: RichProgress | None = None
        if console.is_terminal:
            self.live = RichProgress(
                TextColumn(escape(label)), BarColumn(), MofNCompleteColumn(), TextColumn(unit),
                TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=console, transient=True,
            )  # fmt: skip
            self.task = self.live.add_task(label, total=total)
            self.live.start()

    def eta(self, done: int) -> float | None:
        if not self.updates:
            return None
        return (time.monotonic() - self.started) / self.updates * max(self.total - done, 0)

    def update(self, done: int, line: str) -> None:
        self.updates += 1
        if self.live is not None:
            self.live.console.print(line, markup=False, highlight=False, soft_wrap=True)
            self.live.update(self.task, completed=done)
            return
        left = self.eta(done)
        tail = f"  ETA {duration(left)}" if left and done < self.total else ""
        say(line + tail, self.console)

    def close(self) -> None:
        if self.live is not None:
            self.live.stop()
            self.live = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


STEP_KEYS = (
    ("reward/mean", "reward"),
    ("reward/frac_zero_std", "zero-std"),
    ("herl/rewrite_success_rate", "rewrite-success"),
    ("actor/loss", "loss"),
    ("val/reward_mean", "val-reward"),
)
"""The numbers of a step's console line; the ``val/`` ones appear on validation steps only (``train.eval_every``)."""


def step_line(done: int, total: int, metrics: Mapping[str, Any]) -> str:
    """``[2/4] step 1  reward 0.208  zero-std 1.000  rewrite-success 0.250  loss 0.0012  52.1 s/step``: ``done`` steps
    of the run are complete, the one just finished has index ``done - 1``."""
    parts = [f"[{done}/{total}] step {done - 1}"]
    parts += [f"{label} {number(metrics[key], key)}" for key, label in STEP_KEYS if key in metrics]
    if "perf/step_s" in metrics:
        parts.append(f"{metrics['perf/step_s']:.1f} s/step")
    return "  ".join(parts)


def train_progress(total: int, console: Console = CONSOLE):
    """``(progress, on_step)`` for ``Trainer.train``'s ``on_step(steps_done, metrics)`` callback."""
    progress = Progress("train", total, "steps", console)

    def on_step(done: int, metrics: Mapping[str, Any]) -> None:
        progress.update(done, step_line(done, total, metrics))

    return progress, on_step


class EvalProgress:
    """``on_batch(what, batch, batches, prompts)`` of ``run_evaluate``: a ``Progress`` per benchmark (and per
    revision round), ``evaluate ifeval: batch 1/2 (40 prompts)``."""

    def __init__(self, console: Console = CONSOLE):
        self.console = console
        self.current: tuple[str, Progress] | None = None

    def __call__(self, what: str, batch: int, batches: int, prompts: int) -> None:
        if self.current is None or self.current[0] != what:
            self.close()
            self.current = (what, Progress(f"evaluate {what}", batches, "batches", self.console))
        self.current[1].update(batch, f"evaluate {what}: batch {batch}/{batches} ({prompts} prompts)")

    def close(self) -> None:
        if self.current is not None:
            self.current[1].close()
            self.current = None


# --------------------------------------------------------------------------------------------------------------------
# summaries


def _get(h: Mapping[str, Any], key: str) -> str:
    return number(h.get(key), key)


def stage_summary(stage: str, h: Mapping[str, Any]) -> str:
    """One line: how ``stage`` went, from its headline numbers ``h`` (``herl_core.stages.headline``)."""
    if stage == "prepare":
        return (f"{_get(h, 'train/prompts')} training prompts ({_get(h, 'train/constraints')} constraints); held out: "
                f"validation {_get(h, 'val/prompts')}, IFEval {_get(h, 'ifeval/prompts')}, IFBench "
                f"{_get(h, 'ifbench/prompts')} prompts; disjoint: {'yes' if h.get('disjoint') else 'NO'}")  # fmt: skip
    if stage == "rollout":
        return (f"{_get(h, 'prompts')} prompts × {number((h.get('samples') or 0) // max(h.get('prompts') or 1, 1))} "
                f"samples: reward {_get(h, 'reward/mean')}, pass@G {_get(h, 'pass_at_G')}, groups without signal "
                f"{_get(h, 'reward/frac_zero_std')}, truncated {_get(h, 'truncated_frac')}")  # fmt: skip
    if stage == "hindsight":
        return (f"{_get(h, 'herl/failed_groups')} of {_get(h, 'groups')} groups failed, {_get(h, 'herl/rewrites')} "
                f"rewrites: rewrite success {_get(h, 'herl/rewrite_success_rate')}, over the group's best "
                f"{_get(h, 'herl/over_prev_best_rate')}, bonus {_get(h, 'herl/bonus_mean')}")  # fmt: skip
    if stage == "train":
        parts = [plural(h.get("steps"), "step"), f"reward {_get(h, 'reward/mean_first')} → {_get(h, 'reward/mean')}"]
        if "herl/rewrite_success_rate" in h:
            parts.append(f"rewrite success {_get(h, 'herl/rewrite_success_rate_first')} → "
                         f"{_get(h, 'herl/rewrite_success_rate')}")  # fmt: skip
        parts.append(
            f"groups without signal {_get(h, 'reward/frac_zero_std_first')} → {_get(h, 'reward/frac_zero_std')}"
        )
        if "val/reward_mean" in h:
            parts.append(f"validation reward {_get(h, 'val/reward_mean_first')} → {_get(h, 'val/reward_mean')}")
        if h.get("perf/step_s_mean") is not None:
            parts.append(f"{h['perf/step_s_mean']:.1f} s/step")
        return ", ".join(parts)
    if stage == "evaluate":
        benches = sorted({k.split("/", 1)[0] for k in h if "/" in k}, key=lambda b: (b != "ifeval", b))
        parts = [
            f"{BENCH_NAMES.get(b, b)} prompt-strict {_get(h, f'{b}/prompt_strict')} inst-strict "
            f"{_get(h, f'{b}/inst_strict')} (truncated {_get(h, f'{b}/truncated_frac')})"
            for b in benches
        ]
        fallback = "; UNTRAINED model (no trained policy found)" if h.get("policy_fallback") else ""
        return "; ".join(parts) + f"{fallback}"
    return ", ".join(f"{k} {number(v, k)}" for k, v in h.items())


BENCH_NAMES = {"ifeval": "IFEval", "ifbench": "IFBench"}


def command(name: str) -> str:
    """How to type this environment's ``name`` command (herl, dvc) from the current folder: the bare name when it is
    what PATH finds, else its path (``.venv/bin/dvc`` in a clone whose venv is not activated)."""
    import shutil
    import sys
    from pathlib import Path

    exe = Path(sys.executable).parent / name
    if not exe.exists() or shutil.which(name) == str(exe):
        return name
    try:
        return str(exe.relative_to(Path.cwd()))
    except ValueError:
        return str(exe)


RUNS_VIEW_KEY = "herl"
"""The saved view of an experiment's runs table that herl's links open (flows.tracking.runs_view): the experiment
tag ``mlflow.sharedViewState.herl`` holds it, as MLflow's own "share view" does."""
MODEL_TRAINING = "workflowType=machine_learning"
"""MLflow 3.17's UI opens in its GenAI view unless the link says otherwise (its GenAI / Model training switch)."""


def runs_fragment(experiment_id: str, run_id: str | None = None) -> str:
    """The MLflow UI path of a run (``run_id``) or of the experiment's runs table, in the model-training view; the
    table with herl's columns (``RUNS_VIEW_KEY``: the headline numbers, the Models column)."""
    if run_id:
        return f"#/experiments/{experiment_id}/runs/{run_id}?{MODEL_TRAINING}"
    return f"#/experiments/{experiment_id}/runs?viewStateShareKey={RUNS_VIEW_KEY}&{MODEL_TRAINING}"


def mlflow_hint(uri: str, experiment_id: str | None, run_id: str | None, port: int = 5000) -> str:
    """Where to see a run: its URL on a tracking server, else the ``herl ui`` command and the URL it serves."""
    fragment = runs_fragment(experiment_id, run_id) if experiment_id else ""
    if uri.startswith(("http://", "https://")):
        return f"{uri.rstrip('/')}/{fragment}"
    return f"{command('herl')} ui --launch, then http://127.0.0.1:{port}/{fragment}"


def closing(
    title: str, rows: list[tuple[str, str]], console: Console = CONSOLE, lines: list[str] | None = None
) -> None:
    """The closing block: a rule with ``title``, the headline ``lines``, then aligned ``(what, where)`` rows."""
    console.rule(escape(title), style="dim")
    for line in lines or []:
        say(f"  {line}", console)
    if lines:
        say("", console)
    width = max((len(k) for k, _ in rows), default=0)
    for key, value in rows:
        say(f"  {key:<{width}}  {value}", console)
