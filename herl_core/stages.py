"""Stage entry points: read inputs, validate, call one herl_core module, write outputs atomically. No math here.

Stage names are the same everywhere: ``prepare``, ``rollout``, ``hindsight``, ``train``, ``evaluate`` (the CLI
subcommands, flows/, dvc.yaml and the MLflow child runs). Each function returns its summary dict and never leaves a
half-written output; each stage folder holds ``metrics.json``, its headline numbers (``headline``: the stage's DVC
metric), beside the detailed summary. Outputs (docs/pipeline.md):

* prepare   → ``prepare.out_dir``/{train,val,ifeval,ifbench}.jsonl, report.json, metrics.json
* rollout   → ``probe.rollout_dir``/rollouts.jsonl (RolloutRecord), summary.json, metrics.json    (spec §3.2-3.3)
* hindsight → ``probe.hindsight_dir``/experiences.jsonl (HindsightRecord), merges.jsonl, summary.json, metrics.json
  (spec §3.4-3.9), and with ``probe.control`` control.jsonl, control.json, control_types.csv (docs/probe.md)
* train     → ``train.out_dir`` (policy), ``train.report_dir``/*.jsonl, steps.csv (the DVC plots), val.csv (with
  validation), summary.json, metrics.json (spec §3.15); with validation on, val_outcomes.jsonl (per prompt and
  point) and validation_final.json (the trained policy)
* evaluate  → ``evaluate.out_dir``/<benchmark>/{metrics,per_type}.json, samples.jsonl, metrics.json (flat, the
  headline itself)  (spec §3.14)

The rollout and hindsight stages run the functions of one training step once (the readiness probe,
herl_core.probe; sized and placed by the ``probe`` section), with the seeds of step 0
(``call_seed(train.seed, 0, phase)``); they are not inputs of train.
Departure: ``run_train`` resumes only from a checkpoint written under the same training settings; otherwise it
starts fresh and deletes the stale checkpoints, so a changed parameter under ``dvc repro`` / ``dvc exp run`` never
continues the previous run. The decision (and the tracking run it continues) is ``herl_core.resume.resume_point``.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from herl_core.config import Config, LoraConfig, ModelConfig
from herl_core.io import DataError, read_jsonl, write_json_atomic, write_jsonl_atomic, write_text_atomic
from herl_core.records import PromptRecord, RolloutRecord
from herl_core.sink import JsonlSink, MetricsSink, MultiSink, NullSink

STAGES = ("prepare", "rollout", "hindsight", "train", "evaluate")
VALIDATION_FINAL = "validation_final.json"
"""``train.report_dir``/validation_final.json: ``val/*`` of the trained policy (herl_core/validate.py)."""


def load_prompts(
    path: str | Path, validate_constraints: bool = True, allow_ifbench: bool = False
) -> list[PromptRecord]:
    """Read a prompts JSONL (PromptRecord per line); constraint ids and kwargs are checked against the registries.
    ``allow_ifbench``: accept IFBench-only constraint ids (refused by default: IFBench is a held-out benchmark, and
    training on its constraints contaminates its scores; ``train.allow_ifbench_constraints``)."""
    if not Path(path).is_file():
        raise DataError(f"{path}: file not found (write it with `herl prepare`, or run the whole `herl pipeline`)")
    rows = read_jsonl(path, PromptRecord)
    if validate_constraints:
        from herl_core.rewards.constraints import validate_rubric

        for lineno, row in enumerate(rows, start=1):
            for k, rubric in enumerate(row.rubrics):
                if rubric.kind != "constraint":
                    continue
                try:
                    validate_rubric(rubric, row.prompt, allow_ifbench=allow_ifbench)
                except ValueError as exc:
                    raise DataError(f"{path}:{lineno}: field 'rubrics.{k}': {exc}") from exc
    return rows


def check_prompt_lengths(path: str | Path, prompts: list[PromptRecord], tokenizer, rollout) -> None:
    """``DataError`` naming ``path``, the line and the id of every prompt whose encoded form (the prompt format the
    rollout uses, system prompt included) is longer than ``rollout.max_prompt_tokens`` (spec §3.1: such prompts are
    rejected). ``prompts[i]`` is line i + 1 of ``path`` (``load_prompts`` refuses empty lines)."""
    from herl_core.models import encode_prompt

    limit, long = rollout.max_prompt_tokens, []
    for lineno, row in enumerate(prompts, start=1):
        n = len(encode_prompt(tokenizer, row.prompt, rollout.system_prompt))
        if n > limit:
            long.append(f"{path}:{lineno}: field 'prompt': prompt {row.id!r} is {n} tokens once encoded, longer than "
                        f"rollout.max_prompt_tokens ({limit})")  # fmt: skip
    if long:
        more = f"\n  … and {len(long) - 10} more" if len(long) > 10 else ""
        advice = "\n  shorten these prompts or raise rollout.max_prompt_tokens"
        raise DataError("\n  ".join(long[:10]) + more + advice)


def check_inputs(cfg: Config, stages: list[str] | tuple[str, ...]) -> None:
    """Validate what ``stages`` (run in this order) read from outside, before any tracking run is opened, so that bad
    input writes nothing (not even a FAILED run): the model sources (``check_model_source``), the training prompts
    (``load_prompts``) and their encoded lengths (``check_prompt_lengths``), train's validation prompts
    (``train.eval_set``, when ``train.eval_every`` is on), the rollouts the hindsight stage reads,
    the benchmark files evaluate scores. What an earlier stage of the list writes is not checked (the pipeline's
    prepare writes ``train.data``, its train the policy evaluate scores). Raises ``DataError`` / ``ModelSourceError``.
    """
    from herl_core.models import check_model_source, load_tokenizer

    made: set[str] = set()
    checked: dict[str, ModelConfig] = {}

    def model(model_cfg: ModelConfig) -> ModelConfig:
        if model_cfg.name_or_path not in checked:
            check_model_source(model_cfg)
            checked[model_cfg.name_or_path] = model_cfg
        return model_cfg

    prepared = "prepare" in stages and Path(cfg.train.data).parent == Path(cfg.prepare.out_dir)
    val_prepared = "prepare" in stages and Path(cfg.train.eval_set).parent == Path(cfg.prepare.out_dir)
    for stage in stages:
        if stage in ("rollout", "hindsight", "train"):
            model_cfg = model(cfg.model if stage == "train" else policy_config(cfg, cfg.probe.policy))
            if not prepared:
                prompts = load_prompts(cfg.train.data, allow_ifbench=cfg.train.allow_ifbench_constraints)
                used = prompts if stage == "train" else prompts[: cfg.probe.prompts]
                check_prompt_lengths(cfg.train.data, used, load_tokenizer(model_cfg), cfg.rollout)
            if stage == "train" and cfg.train.eval_every and not val_prepared:
                val = load_val_prompts(cfg)[: cfg.train.eval_prompts]
                check_prompt_lengths(cfg.train.eval_set, val, load_tokenizer(model_cfg), cfg.rollout)
            if stage == "hindsight" and "rollout" not in made:
                hindsight_inputs(cfg)  # the rollout rows: schema, prompt ids known, sample indices consecutive
        elif stage == "evaluate":
            if not ("train" in made and cfg.evaluate.policy is None):
                model(eval_policy(cfg)[0])
            if "prepare" not in made:
                for bench in cfg.evaluate.benchmarks:
                    load_prompts(Path(cfg.prepare.out_dir) / f"{bench}.jsonl", validate_constraints=False)
        made.add(stage)


HEADLINE_FILE = "metrics.json"
"""Each stage's headline numbers in its output folder: its DVC metric (``dvc metrics show``, ``dvc exp show``)."""

HEADLINE_KEYS: dict[str, tuple[str, ...]] = {
    "prepare": ("train/prompts", "train/constraints", "val/prompts", "ifeval/prompts", "ifbench/prompts",
                "dropped_overlapping_instructions", "disjoint"),
    "rollout": ("prompts", "samples", "reward/mean", "reward/frac_zero_std", "reward/failed_calls", "pass_at_G",
                "failed_group_frac", "truncated_frac"),
    "hindsight": ("groups", "herl/failed_groups", "herl/rewrites", "herl/rewrite_success_rate",
                  "herl/over_prev_best_rate", "herl/bonus_mean", "herl/rewrite_fully_correct_rate",
                  "control/drafts", "control/rewrite_beats", "control/resample_beats", "control/difference_lo",
                  "control/difference_hi"),
    "train": ("steps", "reward/mean_first", "reward/mean", "reward/frac_zero_std_first", "reward/frac_zero_std",
              "herl/rewrite_success_rate_first", "herl/rewrite_success_rate", "herl/bonus_mean", "actor/loss",
              "val/reward_mean_first", "val/reward_mean", "perf/step_s_mean"),
}  # fmt: skip
"""The headline numbers of each stage (evaluate: ``EVAL_HEADLINE`` per benchmark). A name means the same thing in
every stage that has it: train's unsuffixed ``reward/mean`` etc. are the last step's values (``_first``: step 0's),
the numbers a run ends with, as MLflow's runs table shows them for the train run."""

EVAL_HEADLINE = ("prompt_strict", "inst_strict", "prompt_loose", "inst_loose", "truncated_frac")
"""Per benchmark in evaluate's metrics.json (``<benchmark>/<key>``): the four scores and, beside them, the share of
answers cut at ``evaluate.max_new_tokens`` (a score over truncated answers understates the model). The prompt and
instruction counts (the scores' denominators) are in ``<benchmark>/metrics.json``."""


def headline(stage: str, summary: dict) -> dict:
    """About a dozen numbers that say how ``stage`` went (``HEADLINE_KEYS``): its ``metrics.json``, its MLflow run's
    metrics and its console summary. The details (per constraint type, histograms, first/last/mean over steps) stay
    in the stage's summary file."""
    flat = dict(summary)
    if stage == "prepare":
        for name, split in summary["splits"].items():
            flat.update({f"{name}/prompts": split["prompts"], f"{name}/constraints": split["constraints"]})
    elif stage == "hindsight":  # the control's verdict numbers (probe.control; the whole row: control.json)
        flat.update({f"control/{k}": v for k, v in (summary.get("control") or {}).items()})
    elif stage == "train":  # the last step's values under the per-step names; step 0's as _first
        for key in (
            "reward/mean",
            "reward/frac_zero_std",
            "herl/rewrite_success_rate",
            "herl/bonus_mean",
            "actor/loss",
            "val/reward_mean",
        ):
            flat[key] = summary.get(f"{key}_last")
        if "final/val/reward_mean" in summary:  # the last validation is the trained policy's (VALIDATION_FINAL)
            flat["val/reward_mean"] = summary["final/val/reward_mean"]
    elif stage == "evaluate":
        keep = [k for k in summary if k.partition("/")[2] in EVAL_HEADLINE]
        return {k: summary[k] for k in ("policy", "policy_fallback", *keep) if k in summary}
    return {k: flat[k] for k in HEADLINE_KEYS[stage] if flat.get(k) is not None}


STEP_TABLE, VAL_TABLE = "steps.csv", "val.csv"
"""The train stage's per-step tables in ``train.report_dir`` (DVC plots read CSV, JSON, YAML and TSV, not JSON lines):
every step with every metric (a ``val/*`` cell is empty on a step that did not validate), and the validation steps
only with their ``val/*`` metrics (written when ``train.eval_every`` is on), so that their curves are unbroken lines."""


def write_step_tables(report_dir: Path) -> None:
    """``report_dir``/steps.jsonl as ``STEP_TABLE`` and ``VAL_TABLE`` (``step`` first, then every metric in order of
    first appearance). ``VAL_TABLE`` ends with the trained policy's point (``VALIDATION_FINAL``, at step
    ``train.steps``) when there is one. Without validation points no ``VAL_TABLE`` is left behind (an earlier run's is
    removed)."""
    rows = _read_history(report_dir / "steps.jsonl")
    write_text_atomic(report_dir / STEP_TABLE, _csv(rows))
    val = [{k: v for k, v in row.items() if k == "step" or k.startswith("val/")} for row in rows]
    val = [row for row in val if len(row) > 1]
    final = report_dir / VALIDATION_FINAL
    if val and final.is_file():
        val.append({k: v for k, v in json.loads(final.read_text()).items() if k == "step" or k.startswith("val/")})
    if val:
        write_text_atomic(report_dir / VAL_TABLE, _csv(val))
    else:
        (report_dir / VAL_TABLE).unlink(missing_ok=True)


def _csv(rows: list[dict]) -> str:
    import csv
    import io

    columns = list(dict.fromkeys(["step", *(k for row in rows for k in row)]))
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return text.getvalue()


def load_val_prompts(cfg: Config) -> list[PromptRecord]:
    """The validation prompts of the train stage (``train.eval_set``; the trainer keeps the first
    ``train.eval_prompts``), none when ``train.eval_every`` is 0. Any constraint id is accepted (IFBench's too):
    validation never trains on them."""
    if not cfg.train.eval_every:
        return []
    return load_prompts(cfg.train.eval_set, allow_ifbench=True)


def summarise(history: list[dict]) -> dict[str, float]:
    """First / last / mean over the steps of the main per-step metrics (validation metrics over the steps that
    validated): the train stage's summary.json (its ``metrics.json`` is ``headline("train", ...)`` of it)."""
    if not history:
        return {}
    keys = ["reward/mean", "reward/frac_zero_std", "herl/rewrite_success_rate", "herl/bonus_mean", "actor/loss",
            "val/reward_mean", "val/all_met_frac", "val/greedy/reward_mean", "val/greedy/all_met_frac"]  # fmt: skip
    out: dict[str, float] = {"steps": float(len(history))}
    for k in keys:
        vals = [h[k] for h in history if k in h]
        if vals:
            out[f"{k}_first"], out[f"{k}_last"] = vals[0], vals[-1]
            out[f"{k}_mean"] = sum(vals) / len(vals)
    out["perf/step_s_mean"] = sum(h["perf/step_s"] for h in history) / len(history)
    return out


def run_train(
    cfg: Config,
    *,
    resume: bool = True,
    sink: MetricsSink | None = None,
    on_step: Callable[[int, dict], None] | None = None,
    trainer_kwargs: dict | None = None,
    checkpoint_extras: dict | None = None,
) -> dict:
    """The ``train`` stage: the online HeRL loop; writes the policy folder, per-step logs and a summary.

    Outputs: ``train.out_dir`` (HF safetensors policy), ``train.report_dir``/{steps,experiences,merges,
    rollouts}.jsonl and summary.json. Resume checkpoints live in ``train.checkpoint_dir`` (``resume_point``
    decides whether to continue one); ``checkpoint_extras`` (the tracking run id, for re-attaching on resume) and
    the fingerprint are stored in every checkpoint written from now on.
    """
    from herl_core.distributed import DataParallel
    from herl_core.resume import FINGERPRINT_KEY, resume_point
    from herl_core.train import Trainer

    kwargs = dict(trainer_kwargs or {})
    dp = kwargs.pop("dp", None) or DataParallel.from_env(cfg.train.parallel)
    prompts = load_prompts(cfg.train.data, allow_ifbench=cfg.train.allow_ifbench_constraints)
    val_prompts = load_val_prompts(cfg)
    report = JsonlSink(cfg.train.report_dir) if dp.is_main else None  # rank 0 writes reports and tracks
    sinks = [x for x in (report, sink if dp.is_main else None) if x is not None]
    trainer = Trainer(cfg, prompts, sink=MultiSink(*sinks), dp=dp, val_prompts=val_prompts, **kwargs)
    check_prompt_lengths(cfg.train.data, prompts, trainer.tokenizer, cfg.rollout)  # before anything is written
    check_prompt_lengths(cfg.train.eval_set, trainer.val_prompts, trainer.tokenizer, cfg.rollout)
    point = resume_point(cfg, resume)  # the same decision the tracker made when it chose the run
    resumed = point.checkpoint is not None and trainer.resume(cfg.train.checkpoint_dir)
    with dp.main_first() as main:  # every rank has decided before rank 0 drops anything
        if main and resumed:
            report.truncate_after(trainer.state.step - 1)
        elif main:
            _drop_checkpoints(cfg.train.checkpoint_dir)
            report.reset()
    trainer.state.extras.update({**(checkpoint_extras or {}), FINGERPRINT_KEY: point.fingerprint})
    history = _read_history(Path(cfg.train.report_dir) / "steps.jsonl")
    history += trainer.train(on_step=on_step)
    trainer.save(cfg.train.checkpoint_dir, keep=cfg.train.keep_checkpoints)
    final = trainer.final_validation()  # val/* of the trained policy (validation on), at step train.steps
    if final and sink is not None and dp.is_main:
        sink.log_metrics(final, trainer.state.step)
    summary = {**summarise(history), **{f"final/{k}": v for k, v in final.items()}, "config_hash": cfg.hash()}
    trainer.save_policy(cfg.train.out_dir)  # in model.dtype; FSDP: gathered onto rank 0 (every rank takes part)
    with dp.main_first() as main:
        if main:
            report_dir = Path(cfg.train.report_dir)
            if final:
                write_json_atomic(report_dir / VALIDATION_FINAL, {"step": trainer.state.step, **final})
            else:  # no stale final point of an earlier run beside this run's tables
                (report_dir / VALIDATION_FINAL).unlink(missing_ok=True)
            write_step_tables(report_dir)
            write_json_atomic(report_dir / "summary.json", summary)
            write_json_atomic(report_dir / HEADLINE_FILE, headline("train", summary))
    return summary


def _read_history(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _drop_checkpoints(root: str) -> None:
    from herl_core.checkpoint import list_checkpoints

    for folder in list_checkpoints(root):
        shutil.rmtree(folder)


# --------------------------------------------------------------------------------------------------------------------
# prepare, rollout, hindsight, evaluate


def run_prepare(cfg: Config, sink: MetricsSink | None = None) -> dict:
    """The ``prepare`` stage: training prompts (``prepare.train_source`` or ``prepare.hub_dataset``, a local
    .json/.jsonl/.parquet file or a hub id) with seeded constraints, and the held-out IFEval/IFBench sets.
    Returns the data report (also ``prepare.out_dir``/report.json)."""
    from herl_core.prepare import run_prepare as prepare_data

    report = prepare_data(cfg.prepare)
    write_json_atomic(Path(cfg.prepare.out_dir) / HEADLINE_FILE, headline("prepare", report))
    return report


def policy_config(cfg: Config, policy: str | None) -> ModelConfig:
    """``cfg.model`` pointed at a checkpoint folder when ``policy`` is given."""
    if policy is None:
        return cfg.model
    if not Path(policy).is_dir():
        raise DataError(f"{policy}: policy folder not found")
    # a policy folder holds merged weights (LoRA already folded in): load it plain
    return cfg.model.model_copy(update={"name_or_path": policy, "lora": LoraConfig()})


def run_rollout(cfg: Config, sink: MetricsSink | None = None) -> dict:
    """The ``rollout`` stage: G = ``rollout.n`` samples for each of the first ``probe.prompts`` prompts of
    ``train.data`` from ``probe.policy`` (else ``model``), scored; writes ``probe.rollout_dir``/rollouts.jsonl and
    summary.json."""
    from herl_core.models import load_policy
    from herl_core.probe import rollout_summary
    from herl_core.rewards import make_reward
    from herl_core.rollout import make_engine
    from herl_core.rollout.groups import call_seed, rollout_records, sample_groups

    prompts = load_prompts(cfg.train.data, allow_ifbench=cfg.train.allow_ifbench_constraints)[: cfg.probe.prompts]
    model, tok = load_policy(policy_config(cfg, cfg.probe.policy))
    check_prompt_lengths(cfg.train.data, prompts, tok, cfg.rollout)
    engine = make_engine(cfg.rollout.engine, model, tok, seed=cfg.train.seed)
    seed = call_seed(cfg.train.seed, 0, 0)  # the seed of training step 0's rollout
    groups = sample_groups(prompts, engine, make_reward(cfg.reward), tok, cfg.rollout, seed)
    rows = rollout_records(groups, step=None)
    (sink or NullSink()).log_records("rollouts", rows, 0)
    out = Path(cfg.probe.rollout_dir)
    write_jsonl_atomic(out / "rollouts.jsonl", rows)
    summary = {**rollout_summary(rows), "policy": cfg.probe.policy or cfg.model.name_or_path}
    write_json_atomic(out / "summary.json", summary)
    write_json_atomic(out / HEADLINE_FILE, headline("rollout", summary))
    return summary


def run_hindsight(cfg: Config, sink: MetricsSink | None = None) -> dict:
    """The ``hindsight`` stage (the readiness probe): the hindsight step of spec §3.4-3.9 once, on the groups of the
    first ``probe.prompts`` prompts of ``probe.rollout_dir``/rollouts.jsonl, by the policy that wrote them
    (``probe.policy``); writes ``probe.hindsight_dir``/experiences.jsonl, merges.jsonl and summary.json.

    With ``probe.control`` (herl_core.control, docs/probe.md) it also draws fresh samples from the original prompts
    at the rewrites' token budget and writes control.jsonl (per draft), control.json (table, budget, verdict) and
    control_types.csv (the table); the summary gains ``control`` (the verdict and the overall row). Everything is
    computed before the first file is written."""

    from herl_core.hindsight.step import hindsight_step, rewrite_sampling
    from herl_core.models import load_policy
    from herl_core.probe import hindsight_summary
    from herl_core.rewards import make_reward
    from herl_core.rollout import make_engine
    from herl_core.rollout.groups import call_seed, groups_from_rollouts

    source = Path(cfg.probe.rollout_dir) / "rollouts.jsonl"
    rows, prompts = hindsight_inputs(cfg)
    model, tok = load_policy(policy_config(cfg, cfg.probe.policy))
    check_prompt_lengths(cfg.train.data, prompts[: cfg.probe.prompts], tok, cfg.rollout)
    groups = groups_from_rollouts(prompts, rows, tok, cfg.rollout, source=str(source))[: cfg.probe.prompts]
    before = [replace(g, samples=[s.copy() for s in g.samples]) for g in groups]  # the merge edits groups in place
    engine = make_engine(cfg.rollout.engine, model, tok, seed=cfg.train.seed)
    reward = make_reward(cfg.reward)
    seed = cfg.train.seed
    out = hindsight_step(
        groups, engine, reward, tok, cfg.hindsight, cfg.rollout, (seed, 0), seed=call_seed(seed, 0, 1),
    )  # fmt: skip
    summary = hindsight_summary(out.experiences, out.metrics, groups=len(groups))
    control = None
    if cfg.probe.control:
        from herl_core.control import CONTROL_PHASE, control_records, control_summary

        records = control_records(
            before, out.jobs, engine, reward, tok, cfg.hindsight, cfg.rollout,
            temperature=cfg.probe.control_temperature, seed=call_seed(seed, 0, CONTROL_PHASE),
        )  # fmt: skip
        probed = {g.record.id for g in groups}
        report, table = control_summary(
            records,
            [r for r in rows if r.prompt_id in probed],
            samples=cfg.hindsight.rewrite_samples,
            max_new_tokens=rewrite_sampling(cfg.hindsight, cfg.rollout, None).max_new_tokens,
            model=cfg.probe.policy or cfg.model.name_or_path,
        )
        control = (records, report, table)
        summary["control"] = {k: report[k] for k in ("verdict", "drafts", "compared", "unscorable")}
        summary["control"] |= {k: v for k, v in report["overall"].items() if k != "type"}
    sink = sink or NullSink()
    sink.log_records("experiences", out.experiences, 0)
    sink.log_records("merges", out.merges, 0)
    folder = Path(cfg.probe.hindsight_dir)
    write_jsonl_atomic(folder / "experiences.jsonl", out.experiences)
    write_jsonl_atomic(folder / "merges.jsonl", out.merges)
    if control is not None:
        records, report, table = control
        sink.log_records("control", records, 0)
        sink.log_records("control_types", table, 0)
        write_jsonl_atomic(folder / "control.jsonl", records)
        write_json_atomic(folder / "control.json", report)
        write_text_atomic(folder / "control_types.csv", table_csv(table))
    else:
        for name in CONTROL_FILES:  # no stale control from an earlier run beside this run's outputs
            (folder / name).unlink(missing_ok=True)
    write_json_atomic(folder / "summary.json", summary)
    write_json_atomic(folder / HEADLINE_FILE, headline("hindsight", summary))
    return summary


CONTROL_FILES = ("control.jsonl", "control.json", "control_types.csv")


def hindsight_inputs(cfg: Config) -> tuple[list[RolloutRecord], list[PromptRecord]]:
    """The hindsight stage's inputs, validated: the rollout rows (schema, prompt ids known, sample indices
    consecutive) and the training prompts. Raises ``DataError`` naming the file, line and field."""
    from herl_core.rollout.groups import check_rollout_rows

    source = Path(cfg.probe.rollout_dir) / "rollouts.jsonl"
    if not source.is_file():
        raise DataError(f"{source}: file not found (write it with `herl rollout`)")
    rows = read_jsonl(source, RolloutRecord, unique_field=None)
    prompts = load_prompts(cfg.train.data, allow_ifbench=cfg.train.allow_ifbench_constraints)
    check_rollout_rows(prompts, rows, str(source))
    return rows, prompts


def table_csv(rows: list) -> str:
    """Records as CSV text: a header of their field names, one line per record (None = empty cell)."""
    import csv
    import io

    buf = io.StringIO()
    fields = list(type(rows[0]).model_fields) if rows else []
    writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow(r.model_dump())
    return buf.getvalue()


def eval_policy(cfg: Config) -> tuple[ModelConfig, str, bool]:
    """(model config, policy name, fallback?): ``evaluate.policy``, else ``train.out_dir`` when it holds a trained
    policy, else the untrained ``model.name_or_path`` (fallback = True, reported in the summary)."""
    if cfg.evaluate.policy is not None:
        return policy_config(cfg, cfg.evaluate.policy), cfg.evaluate.policy, False
    if (Path(cfg.train.out_dir) / "config.json").is_file():
        return policy_config(cfg, cfg.train.out_dir), cfg.train.out_dir, False
    return cfg.model, cfg.model.name_or_path, True


def run_evaluate(
    cfg: Config, sink: MetricsSink | None = None, on_batch: Callable[[str, int, int, int], None] | None = None
) -> dict:
    """The ``evaluate`` stage: greedy (``evaluate.temperature``) chat-template answers of the policy, at most
    ``evaluate.max_new_tokens`` each, on each of ``evaluate.benchmarks`` (``prepare.out_dir``/<benchmark>.jsonl, first
    ``evaluate.limit``), official IF metrics and the truncation rate, ``evaluate.self_improve_rounds`` of test-time
    hindsight revision. Prompts are built as lm-eval builds them (``herl_core.evaluate.encode_eval_prompt``). Writes
    the headline metrics.json (``headline``: each benchmark's scores and truncation rate); returns every benchmark's
    flat metrics (counts, truncation, the cap) with the policy used.

    ``on_batch(what, batch, batches, prompts)`` is called after every generation batch of ``evaluate.batch_size``
    prompts (``what``: "ifeval", "ifeval to 512 tokens", "ifeval revision 1", ...); answering batch by batch gives
    the answers of one call (``generate_answers``)."""
    from herl_core.evaluate import evaluate_policy, generate_answers, write_eval
    from herl_core.models import load_policy
    from herl_core.rollout import make_engine

    e = cfg.evaluate
    model_cfg, policy, fallback = eval_policy(cfg)
    model, tok = load_policy(model_cfg)
    engine = make_engine(cfg.rollout.engine.model_copy(update={"generation_batch_size": e.batch_size}), model, tok)

    def answer(texts: list[str], chat: bool, what: str) -> list:
        return generate_answers(
            engine, tok, texts, e.max_new_tokens, temperature=e.temperature, seed=cfg.train.seed,
            system_prompt=cfg.rollout.system_prompt, chat=chat, first_pass_tokens=e.first_pass_tokens,
            batch_size=e.batch_size, on_batch=on_batch, what=what,
        )  # fmt: skip

    metrics: dict = {"policy": policy, "policy_fallback": fallback, "max_new_tokens": e.max_new_tokens}
    for bench in e.benchmarks:
        records = load_prompts(Path(cfg.prepare.out_dir) / f"{bench}.jsonl", validate_constraints=False)[: e.limit]
        # revise runs once per round while a prompt still fails; once none does, no later round calls it either
        rounds = iter(range(1, e.self_improve_rounds + 1))
        result = evaluate_policy(
            records,
            generate=lambda texts, bench=bench: answer(texts, chat=True, what=bench),
            rounds=e.self_improve_rounds,
            revise=lambda texts, bench=bench, rounds=rounds: answer(
                texts, chat=cfg.hindsight.hindsight_chat_template, what=f"{bench} revision {next(rounds)}"
            ),
        )
        write_eval(result, Path(e.out_dir) / bench)
        metrics.update({f"{bench}/{k}": v for k, v in result.metrics.items() if not isinstance(v, (list, dict))})
    write_json_atomic(Path(e.out_dir) / HEADLINE_FILE, headline("evaluate", metrics))
    return metrics
