"""Which run a ``herl train`` continues: ONE decision, shared by the trainer and the tracker.

A checkpoint carries the fingerprint of the settings it was written under (``train_fingerprint``) and the id of
the tracking run that wrote it. ``resume_point(cfg)`` reads the newest checkpoint once and answers both questions:

* resume from it only when its fingerprint equals this config's and it is not past ``train.steps``; otherwise start
  fresh (the stale checkpoints are deleted by the train stage), so a changed setting under ``dvc repro`` /
  ``dvc exp run`` never continues the previous run;
* re-attach to the tracking run named in it only in that same case; a fresh start opens a new run, so a second
  experiment's numbers never land in the first one's run.

The fingerprint hashes what a training step depends on: the sections train reads (``TRAIN_SECTIONS``) minus the
fields marked ``RESUME_NEUTRAL`` in herl_core/config.py (run length, paths, threads), the bytes of ``train.data``
(and of ``train.eval_set`` when validation is on: a run's logged ``val/*`` belong to one validation set) and the
herl_core source.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from herl_core.checkpoint import STATE_FILE, latest_checkpoint
from herl_core.config import STAGE_SECTIONS, Config, resume_neutral

TRAIN_SECTIONS = STAGE_SECTIONS["train"]
"""The config sections a training step reads (dvc.yaml's train stage lists exactly these)."""

FINGERPRINT_KEY = "train_fingerprint"
"""``TrainerState.extras`` key of the fingerprint of the settings the checkpoint was written under."""
RUN_ID_KEY = "mlflow_run_id"
"""``TrainerState.extras`` key of the tracking run that wrote the checkpoint."""


@dataclass(frozen=True)
class ResumePoint:
    """Where ``herl train`` starts: ``checkpoint`` None = a fresh start at step 0 in a new tracking run."""

    fingerprint: str
    """Of this config: store it in every checkpoint written from now on."""
    checkpoint: Path | None = None
    """The checkpoint to continue from (the newest one, written under the same fingerprint)."""
    step: int = 0
    """Steps completed in ``checkpoint`` (0 on a fresh start): steps >= it are (re)computed."""
    run_id: str | None = None
    """The tracking run to re-attach to (named in ``checkpoint``); None = open a new one."""


def train_fingerprint(cfg: Config) -> str:
    """Hash of what a training step depends on (module doc); equal fingerprints = the same computation."""
    tree: dict = {}
    for section in TRAIN_SECTIONS:
        values = getattr(cfg, section)
        neutral = resume_neutral(type(values))
        tree[section] = {k: v for k, v in values.model_dump(mode="json").items() if k not in neutral}
    if not cfg.train.eval_every:  # validation off: its other knobs change nothing the run computes or logs
        tree["train"] = {k: v for k, v in tree["train"].items() if not k.startswith("eval_")}
    data = Path(cfg.train.data)
    tree["data_sha256"] = hashlib.sha256(data.read_bytes()).hexdigest() if data.is_file() else None
    if cfg.train.eval_every:  # the validation metrics the run logs depend on the validation prompts
        val = Path(cfg.train.eval_set)
        tree["eval_set_sha256"] = hashlib.sha256(val.read_bytes()).hexdigest() if val.is_file() else None
    code = hashlib.sha256()
    package = Path(__file__).parent
    for source in sorted(package.rglob("*.py")):
        code.update(source.relative_to(package).as_posix().encode() + b"\0" + source.read_bytes())
    tree["code_sha256"] = code.hexdigest()
    return hashlib.sha256(json.dumps(tree, sort_keys=True).encode()).hexdigest()[:16]


def resume_point(cfg: Config, resume: bool = True) -> ResumePoint:
    """The decision for ``cfg`` (paths relative to the working directory, as the trainer writes them):
    continue the newest checkpoint of ``train.checkpoint_dir`` and its tracking run when ``resume`` is on, the
    checkpoint was written under this config's fingerprint and is not past ``train.steps``; else a fresh start."""
    point = ResumePoint(fingerprint=train_fingerprint(cfg))
    found = latest_checkpoint(cfg.train.checkpoint_dir) if resume else None
    if found is None:
        return point
    state = json.loads((found / STATE_FILE).read_text(encoding="utf-8")).get("trainer", {})
    extras = state.get("extras") or {}
    step = int(state.get("step", 0))
    if extras.get(FINGERPRINT_KEY) != point.fingerprint or step > cfg.train.steps:
        return point
    return ResumePoint(point.fingerprint, found, step, extras.get(RUN_ID_KEY) or None)
