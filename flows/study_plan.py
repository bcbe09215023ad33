"""The HeRL-vs-GRPO study's plan: ``study.yaml``, the arms, and the ``herl`` commands of every run, per phase (spec
§7.1-7.2; docs/study.md). flows/study.py runs the plan, flows/study_report.py reports it.

Arms (spec §7.2 ablation at our scale; "NaiveHE" has no code path, §7.2, so it is not an arm):

* ``base``: the starting model, not trained. Its held-out validation numbers are step 0 of the trained runs (the same
  policy, sampled with the same validation seeds); the broad phase evaluates it once (greedy: no seed);
* ``grpo``: RLVR through the same trainer (``hindsight.enabled=false``, spec §6 baselines), equal steps;
* ``grpo_equal_tokens``: GRPO with G raised to ``equal_tokens.rollout_n`` so that it generates about as many tokens
  per run as HeRL does with its rewrites (the equal-compute baseline; the ratio comes from a measurement, stated
  with its source in ``study.yaml``);
* ``herl``: the defaults (hindsight rewrites + bonus, spec §3.4-3.12);
* ``herl_no_bonus``: hindsight without the bonus reward (``hindsight.bonus_enabled=false``, §3.8; the ablation's
  "+HE").

``variants``: named override sets run for every trained arm × seed (a learning-rate grid: the pilot); run names
``<arm>-<variant>-s<seed>``. Phases: ``train`` (``herl train`` with validation during training and after the last
update: the primary metric) and ``broad`` (``herl evaluate`` on IFEval / IFBench). Every run writes only under
``<out_dir>/<name>/``, never into the pipeline's DVC outputs; its small results are copied to
``<results_dir>/<name>/`` (committed; flows/study.py).

Equal budget: within a variant every trained arm runs with the same resolved ``BUDGET_KEYS`` (``check_equal_budget``),
except ``rollout.n`` of ``grpo_equal_tokens``. HeRL's rewrites are extra generation by design; the report shows the
tokens each arm generated.
"""

from __future__ import annotations

import shlex
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from herl_core.config import Config, StrictModel, deep_merge, duplicate_keys, line_of, parse_overrides

ArmName = Literal["base", "grpo", "grpo_equal_tokens", "herl", "herl_no_bonus"]
ARMS: dict[str, list[str]] = {
    "base": [],
    "grpo": ["hindsight.enabled=false"],
    "grpo_equal_tokens": ["hindsight.enabled=false"],  # + rollout.n = equal_tokens.rollout_n (arm_overrides)
    "herl": [],
    "herl_no_bonus": ["hindsight.bonus_enabled=false"],
}
"""Arm → the ``--set`` overrides that define it (on top of the study's shared overrides)."""

Phase = Literal["train", "broad"]
PHASES: tuple[Phase, ...] = ("train", "broad")
PHASE_SECTIONS: dict[str, tuple[str, ...]] = {
    "train": ("model", "reward", "prepare", "rollout", "hindsight", "train"),
    "broad": ("model", "prepare", "rollout", "hindsight", "train", "evaluate"),
}
"""The config sections whose hash identifies a finished phase of a run (what the phase's commands read, and the
data they were prepared from): a phase finished under other settings is never silently reused."""

BUDGET_KEYS = (
    "model.name_or_path",
    "model.lora",
    "rollout.n",
    "rollout.max_new_tokens",
    "rollout.temperature",
    "hindsight.rewrite_max_new_tokens",
    "train.steps",
    "train.prompts_per_step",
    "train.mini_batch_prompts",
    "train.lr",
    "train.data",
    "train.eval_every",
    "train.eval_set",
    "train.eval_prompts",
    "train.eval_samples",
    "train.eval_max_new_tokens",
    "evaluate.benchmarks",
    "evaluate.limit",
    "evaluate.max_new_tokens",
    "evaluate.self_improve_rounds",
)
"""Resolved config keys that must agree across the trained arms of a variant (same prompts, G, lengths, steps,
optimiser, held-out sets). ``grpo_equal_tokens`` differs in ``rollout.n`` by design."""


class StudyError(ValueError):
    """A study file that does not validate, or a run folder that belongs to another configuration."""


# --------------------------------------------------------------------------------------------------------------------
# config (study.yaml)


class EqualTokens(StrictModel):
    """How ``grpo_equal_tokens`` matches HeRL's generated tokens: G raised to ``rollout_n``, and the source of it."""

    rollout_n: Annotated[int, Field(ge=2, description="G of the grpo_equal_tokens arm.")]
    source: Annotated[
        str, Field(min_length=1, description="The measurement behind rollout_n (run, token ratio, commit).")
    ]


class PowerDesign(StrictModel):
    """The design whose minimum detectable difference a pilot report computes (flows/study_report.py)."""

    prompts: Annotated[int, Field(ge=1, description="Held-out prompts of the main study.")]
    seeds: Annotated[int, Field(ge=1, description="Seeds per arm of the main study.")]
    seed_sd: Annotated[
        float | None,
        Field(ge=0, description="Assumed sd over seeds of the run-level paired difference (a one-seed pilot)."),
    ] = None
    seed_sd_source: Annotated[str | None, Field(description="Where seed_sd comes from.")] = None


class StudyConfig(StrictModel):
    """One study: which params profile, arms, seeds, variants and shared overrides; where runs, results and the
    report go."""

    params: Annotated[str, Field(description="herl params file every command loads.")] = "params.yaml"
    params_profile: Annotated[str, Field(description="Profile of the params file passed as --profile.")] = "cpu"
    arms: Annotated[list[ArmName], Field(min_length=1, description="Arms to run (ARMS).")] = [  # type: ignore[assignment]
        "base",
        "grpo",
        "herl",
        "herl_no_bonus",
    ]
    seeds: Annotated[list[int], Field(min_length=1, description="train.seed values; one run per trained arm each.")] = [
        0,
        1,
        2,
    ]
    overrides: Annotated[
        list[str], Field(description="--set section.key=value applied to every command of every arm (the budget).")
    ] = []
    variants: Annotated[
        dict[str, list[str]],
        Field(description="Named --set lists, each run for every trained arm × seed (a learning-rate grid)."),
    ] = {}
    equal_tokens: Annotated[
        EqualTokens | None, Field(description="G of grpo_equal_tokens and its source (required for that arm).")
    ] = None
    phases: Annotated[list[Phase], Field(min_length=1, description="Phases run by default (--phase picks one).")] = [
        "train",
        "broad",
    ]
    power: Annotated[PowerDesign | None, Field(description="Main design whose MDE this (pilot) study reports.")] = None
    preregistered: Annotated[
        dict[str, str], Field(description="The design as fixed before the runs: echoed at the top of the report.")
    ] = {}
    out_dir: Annotated[str, Field(description="Root of the run folders <name>/ and the prepared data.")] = "runs/study"
    results_dir: Annotated[
        str, Field(description="Committed small results of every finished run (<name>/); the report reads only these.")
    ] = "results/study/default"
    report: Annotated[str, Field(description="Markdown report; .json next to it, plots in the folder of its stem.")] = (
        "reports/study.md"
    )
    experiment: Annotated[str, Field(description="MLflow experiment of the study runs (tracking.experiment).")] = (
        "herl-study"
    )

    @field_validator("seeds", "arms", "phases")
    @classmethod
    def _unique(cls, value: list) -> list:
        if len(set(value)) != len(value):
            raise ValueError(f"entries must be unique, got {value}")
        return value

    @field_validator("overrides")
    @classmethod
    def _parsable(cls, value: list[str]) -> list[str]:
        parse_overrides(value)  # raises ConfigError (a ValueError) naming the bad item
        return value

    @field_validator("variants")
    @classmethod
    def _variant_names(cls, value: dict[str, list[str]]) -> dict[str, list[str]]:
        for name, sets in value.items():
            if not name or not all(c.isalnum() or c in "._-" for c in name):
                raise ValueError(f"variant name {name!r}: use letters, digits, '.', '_' and '-' (it names run folders)")
            parse_overrides(sets)
        return value

    @model_validator(mode="after")
    def _equal_tokens_given(self) -> StudyConfig:
        if "grpo_equal_tokens" in self.arms and self.equal_tokens is None:
            raise ValueError("arm grpo_equal_tokens needs equal_tokens: {rollout_n: G, source: '<measurement>'}")
        return self


def load_study(path: str | Path = "study.yaml", profile: str | None = None) -> StudyConfig:
    """Load ``study.yaml``: base keys ← ``profiles[profile]`` (else the file's ``profile``); errors name file:line."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
        raw, root = yaml.safe_load(text) or {}, yaml.compose(text)
    except FileNotFoundError as exc:
        raise StudyError(f"{path}: file not found") from exc
    except yaml.YAMLError as exc:
        raise StudyError(f"{path}: invalid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise StudyError(f"{path}: top level must be a mapping")
    repeated = [f"{path}:{line}: {key}: duplicate key (first at line {n})" for key, line, n in duplicate_keys(root)]
    if repeated:
        raise StudyError("duplicate keys:\n  " + "\n  ".join(repeated))
    profiles = raw.pop("profiles", {}) or {}
    chosen = profile if profile is not None else raw.pop("profile", None)
    raw.pop("profile", None)
    origin: tuple[str, ...] = ()
    if chosen is not None:
        if chosen not in profiles:
            raise StudyError(f"{path}: unknown study profile {chosen!r}; known: {sorted(profiles)}")
        raw, origin = deep_merge(raw, profiles[chosen] or {}), ("profiles", chosen)
    try:
        return StudyConfig.model_validate(raw)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            loc = tuple(err["loc"])
            line = line_of(root, origin + loc[:1]) or line_of(root, loc[:1])
            lines.append(f"{path}:{line or '?'}: {'.'.join(map(str, loc))}: {err['msg']} (got {err.get('input')!r})")
        raise StudyError("invalid study config:\n  " + "\n  ".join(lines)) from exc


# --------------------------------------------------------------------------------------------------------------------
# planning: one run folder and one command list per phase, per arm × variant × seed


def run_name(arm: str, seed: int | None, variant: str | None = None) -> str:
    """``base`` (seed-independent), ``<arm>-s<seed>`` or ``<arm>-<variant>-s<seed>``."""
    if arm == "base":
        return "base"
    return f"{arm}-{variant}-s{seed}" if variant else f"{arm}-s{seed}"


def data_dir(study: StudyConfig) -> Path:
    """The study's own prepared data (``herl prepare`` output), so the pipeline's data/prepared is never touched."""
    return Path(study.out_dir) / "data"


def shared_overrides(study: StudyConfig) -> list[str]:
    """``--set`` common to every command: the budget, the study's data folder, its experiment, no model logging."""
    data = data_dir(study)
    sets = [*study.overrides, f"prepare.out_dir={data}", f"train.data={data / 'train.jsonl'}"]
    sets += [f"train.eval_set={data / 'val.jsonl'}"]
    return [*sets, f"tracking.experiment={study.experiment}", "tracking.log_model=false"]


def arm_overrides(study: StudyConfig, arm: str) -> list[str]:
    """The ``--set`` that define ``arm`` (ARMS, plus G of grpo_equal_tokens)."""
    sets = list(ARMS[arm])
    if arm == "grpo_equal_tokens":
        assert study.equal_tokens is not None  # validated
        sets.append(f"rollout.n={study.equal_tokens.rollout_n}")
    return sets


def run_overrides(study: StudyConfig, arm: str, seed: int | None, variant: str | None = None) -> list[str]:
    """Every ``--set`` of one run: shared ones, the variant's, the arm's definition, outputs under its run folder.

    ``base`` gets a ``train.out_dir`` that is never written, so evaluate falls back to ``model.name_or_path``
    (the untrained model) instead of a pipeline policy.
    """
    run = Path(study.out_dir) / run_name(arm, seed, variant)
    sets = [*shared_overrides(study), *(study.variants.get(variant, []) if variant else [])]
    sets += [*arm_overrides(study, arm), f"train.out_dir={run / 'policy'}", f"evaluate.out_dir={run / 'evaluate'}"]
    if arm == "base":
        return sets
    sets += [f"train.seed={seed}", f"train.checkpoint_dir={run / 'checkpoints'}", f"train.report_dir={run / 'train'}"]
    return [*sets, f"evaluate.policy={run / 'policy'}"]


def herl_command(study: StudyConfig, stage: str, sets: Sequence[str]) -> list[str]:
    """``herl <stage> --params P --profile p --set ...`` as an argv list (``herl`` = ``python -m flows.cli``)."""
    argv = ["herl", stage, "--params", study.params, "--profile", study.params_profile]
    for item in sets:
        argv += ["--set", item]
    return argv


def plan(study: StudyConfig) -> list[dict[str, Any]]:
    """The runs in order: base once, then each trained arm per variant per seed (seed-major, so early seeds finish
    first). Each run: arm, variant, seed, name, dir (run folder), results (its committed results folder), overrides,
    and ``commands[phase]``: the ``herl`` commands of that phase (base trains nothing)."""
    variants: list[str | None] = list(study.variants) or [None]
    runs: list[dict[str, Any]] = [{"arm": "base", "seed": None, "variant": None}] if "base" in study.arms else []
    runs += [
        {"arm": a, "seed": s, "variant": v} for s in study.seeds for v in variants for a in study.arms if a != "base"
    ]
    for run in runs:
        sets = run_overrides(study, run["arm"], run["seed"], run["variant"])
        run["name"] = run_name(run["arm"], run["seed"], run["variant"])
        run["dir"] = str(Path(study.out_dir) / run["name"])
        run["results"] = str(Path(study.results_dir) / run["name"])
        run["overrides"] = sets
        train = [] if run["arm"] == "base" else [herl_command(study, "train", sets)]
        run["commands"] = {"train": train, "broad": [herl_command(study, "evaluate", sets)]}
    return runs


def prepare_command(study: StudyConfig) -> list[str]:
    """``herl prepare`` into the study's own data folder (done when its report.json, written last, exists)."""
    return herl_command(study, "prepare", shared_overrides(study))


def _get(cfg: Config, dotted: str) -> Any:
    node: Any = cfg
    for part in dotted.split("."):
        node = getattr(node, part)
    return node


def check_equal_budget(configs: Mapping[str, Config], runs: Sequence[Mapping[str, Any]] | None = None) -> None:
    """Raise ``StudyError`` when trained arms of one variant differ in any BUDGET_KEYS value (names the key and the
    values). ``runs`` (the plan) groups the configs by variant and exempts ``rollout.n`` of grpo_equal_tokens;
    without it every config is one group."""
    info = {r["name"]: r for r in runs or []}
    groups: dict[Any, dict[str, Config]] = {}
    for name, cfg in configs.items():
        groups.setdefault(info.get(name, {}).get("variant"), {})[name] = cfg
    for group in groups.values():
        for key in BUDGET_KEYS:
            values = {
                name: _get(cfg, key)
                for name, cfg in group.items()
                if not (key == "rollout.n" and info.get(name, {}).get("arm") == "grpo_equal_tokens")
            }
            if len({repr(v) for v in values.values()}) > 1:
                raise StudyError(f"unequal budget: {key} differs across arms: {values}")


def shell_line(argv: Sequence[str]) -> str:
    """The argv as one copy-pasteable shell line."""
    return shlex.join(argv)
