"""The HeRL-vs-GRPO study's plan: ``study.yaml``, the arms, and the ``herl`` commands of every arm × seed (spec
§7.1-7.2; docs/study.md). flows/study.py runs the plan, flows/study_report.py reports it.

Arms (spec §7.2 ablation at our scale; "NaiveHE" has no code path, §7.2, so it is not an arm):

* ``base``: the starting model, not trained, evaluated once (greedy decoding does not depend on the seed);
* ``grpo``: RLVR through the same trainer (``hindsight.enabled=false``, spec §6 baselines);
* ``herl``: the defaults (hindsight rewrites + bonus, spec §3.4-3.12);
* ``herl_no_bonus``: hindsight without the bonus reward (``hindsight.bonus_enabled=false``, §3.8; the ablation's
  "+HE").

Equal rollout budget: every trained arm runs with the same resolved ``rollout``/``train`` budget keys
(``check_equal_budget``); HeRL's rewrites are extra generation by design and are reported (``perf/gen_tokens``).
Every arm × seed writes only under ``<out_dir>/<arm>-s<seed>/`` (``run_overrides``), never into the pipeline's DVC
outputs.
"""

from __future__ import annotations

import shlex
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import Field, ValidationError, field_validator

from herl_core.config import Config, StrictModel, deep_merge, duplicate_keys, line_of, parse_overrides

ArmName = Literal["base", "grpo", "herl", "herl_no_bonus"]
ARMS: dict[str, list[str]] = {
    "base": [],
    "grpo": ["hindsight.enabled=false"],
    "herl": [],
    "herl_no_bonus": ["hindsight.bonus_enabled=false"],
}
"""Arm → the ``--set`` overrides that define it (on top of the study's shared overrides)."""

BUDGET_KEYS = (
    "rollout.n",
    "rollout.max_new_tokens",
    "rollout.temperature",
    "train.steps",
    "train.prompts_per_step",
    "train.mini_batch_prompts",
    "train.lr",
    "train.data",
    "model.name_or_path",
    "evaluate.benchmarks",
    "evaluate.limit",
    "evaluate.max_new_tokens",
    "evaluate.self_improve_rounds",
)
"""Resolved config keys that must agree across trained arms (same prompts, G, lengths, steps, eval set)."""


class StudyError(ValueError):
    """A study file that does not validate, or a run folder that belongs to another configuration."""


# --------------------------------------------------------------------------------------------------------------------
# config (study.yaml)


class StudyConfig(StrictModel):
    """One study: which params profile, arms, seeds and shared overrides; where runs and the report go."""

    params: Annotated[str, Field(description="herl params file every command loads.")] = "params.yaml"
    params_profile: Annotated[str, Field(description="Profile of the params file passed as --profile.")] = "cpu"
    arms: Annotated[list[ArmName], Field(min_length=1, description="Arms to run (ARMS).")] = list(ARMS)  # type: ignore[assignment]
    seeds: Annotated[list[int], Field(min_length=1, description="train.seed values; one run per trained arm each.")] = [
        0,
        1,
        2,
    ]
    overrides: Annotated[
        list[str], Field(description="--set section.key=value applied to every command of every arm (the budget).")
    ] = []
    out_dir: Annotated[str, Field(description="Root of the run folders <arm>-s<seed>/ and the prepared data.")] = (
        "runs/study"
    )
    report: Annotated[str, Field(description="Markdown report; .json next to it, plots in the folder of its stem.")] = (
        "reports/study.md"
    )
    experiment: Annotated[str, Field(description="MLflow experiment of the study runs (tracking.experiment).")] = (
        "herl-study"
    )

    @field_validator("seeds", "arms")
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
# planning: one run folder and one command list per arm × seed


def run_name(arm: str, seed: int | None) -> str:
    """``base`` (seed-independent) or ``<arm>-s<seed>``."""
    return arm if arm == "base" else f"{arm}-s{seed}"


def data_dir(study: StudyConfig) -> Path:
    """The study's own prepared data (``herl prepare`` output), so the pipeline's data/prepared is never touched."""
    return Path(study.out_dir) / "data"


def shared_overrides(study: StudyConfig) -> list[str]:
    """``--set`` common to every command: the budget, the study's data folder, its experiment, no model logging."""
    data = data_dir(study)
    sets = [*study.overrides, f"prepare.out_dir={data}", f"train.data={data / 'train.jsonl'}"]
    return [*sets, f"tracking.experiment={study.experiment}", "tracking.log_model=false"]


def run_overrides(study: StudyConfig, arm: str, seed: int | None) -> list[str]:
    """Every ``--set`` of one arm × seed: shared ones, the arm's definition, all outputs under its run folder.

    ``base`` gets a ``train.out_dir`` that is never written, so evaluate falls back to ``model.name_or_path``
    (the untrained model) instead of a pipeline policy.
    """
    run = Path(study.out_dir) / run_name(arm, seed)
    sets = [*shared_overrides(study), *ARMS[arm], f"train.out_dir={run / 'policy'}"]
    sets += [f"evaluate.out_dir={run / 'evaluate'}"]
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
    """The runs in order: base once, then each trained arm per seed (seed-major, so early seeds finish first)."""
    runs = [{"arm": "base", "seed": None}] if "base" in study.arms else []
    runs += [{"arm": a, "seed": s} for s in study.seeds for a in study.arms if a != "base"]
    for run in runs:
        sets = run_overrides(study, run["arm"], run["seed"])
        stages = ["evaluate"] if run["arm"] == "base" else ["train", "evaluate"]
        run["name"] = run_name(run["arm"], run["seed"])
        run["dir"] = str(Path(study.out_dir) / run["name"])
        run["overrides"] = sets
        run["commands"] = [herl_command(study, stage, sets) for stage in stages]
    return runs


def prepare_command(study: StudyConfig) -> list[str]:
    """``herl prepare`` into the study's own data folder (done when its report.json, written last, exists)."""
    return herl_command(study, "prepare", shared_overrides(study))


def eval_metrics_path(run: Mapping[str, Any]) -> Path:
    """The file whose existence marks a finished arm × seed (the evaluate stage writes it last)."""
    return Path(run["dir"]) / "evaluate" / "metrics.json"


def check_equal_budget(configs: Mapping[str, Config]) -> None:
    """Raise ``StudyError`` when trained arms differ in any BUDGET_KEYS value (names the key and the values)."""

    def get(cfg: Config, dotted: str) -> Any:
        section, key = dotted.split(".")
        return getattr(getattr(cfg, section), key)

    for key in BUDGET_KEYS:
        values = {name: get(cfg, key) for name, cfg in configs.items()}
        if len({repr(v) for v in values.values()}) > 1:
            raise StudyError(f"unequal budget: {key} differs across arms: {values}")


def shell_line(argv: Sequence[str]) -> str:
    """The argv as one copy-pasteable shell line."""
    return shlex.join(argv)
