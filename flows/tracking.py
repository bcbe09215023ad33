"""MLflow tracking of the stages: one run per stage, children of a pipeline run (docs/tracking.md).

Every CLI stage command wraps its work in ``stage_run(cfg, stage)``::

    with stage_run(cfg, "train") as tracker:
        summary = run_train(cfg, sink=tracker.sink)
        tracker.finish(summary, outputs=[cfg.train.report_dir])

What a run gets (docs/tracking.md):

* params: the validated, resolved config flattened (``section.key``) + ``config.json`` artifact;
* lineage tags on every run: git commit and dirty flag, config hash, profile, stage, Prefect flow-run id, the
  stage's dvc.lock md5s of deps and outs, DVC experiment name/baseline;
* per-step metrics (``log_batch`` with steps; the train stage sends a step's metrics once its checkpoint is written,
  so a resumed run holds every step once), records as ``records/<name>.jsonl``, ONE ``experiences`` table per run
  (mlflow/mlflow#11874: every ``log_table`` appends to a 5000-char tag) and, for the hindsight stage's control, ONE
  ``control_types`` table (the per-constraint-type table of docs/probe.md);
* at ``finish``: the stage's headline numbers as metrics (train: its summary as ``summary.<key>`` tags, its curves
  being its metrics) + ``summary.json``; for ``train`` a reward-curve PNG and the policy as an MLflow logged model
  (transformers flavor) output by the run, with a registered version and alias;
* experiments are tagged for MLflow 3's model-training view (``EXPERIMENT_KIND``) and carry the runs-table view herl's
  links open (``runs_view``: the headline numbers and the Models column as columns).

Rules: ``MlflowClient`` with explicit run ids only (the fluent API's active run is thread-local, mlflow/mlflow#13610),
so tracking is safe under Prefect's thread pool. Nothing from the environment is logged except the named lineage
variables below; the judge API key lives only in the variable named by ``reward.judge.api_key_env``.
Records are spooled to ``.herl/mlflow/<run_id>/`` as they arrive, so a crashed train run that is resumed still logs
the experiences of the steps before the crash.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)  # not "Creating initial MLflow database tables"

from mlflow import MlflowClient  # noqa: E402
from mlflow.entities import LoggedModelOutput, Metric, Param, RunTag  # noqa: E402
from mlflow.exceptions import MlflowException  # noqa: E402
from pydantic import BaseModel  # noqa: E402

from flows.console import RUNS_VIEW_KEY  # noqa: E402
from herl_core.config import STAGE_SECTIONS, Config  # noqa: E402
from herl_core.sink import JsonlSink  # noqa: E402

PARENT_ENV = "HERL_MLFLOW_PARENT_RUN_ID"
RUN_ENV = "HERL_MLFLOW_RUN_ID"
FLOW_RUN_ENV = "HERL_PREFECT_FLOW_RUN_ID"
SPOOL_DIR = ".herl/mlflow"
TABLE_FILE = "experiences.json"
CONTROL_TABLE_FILE = "control_types.json"
CELL_CHARS = 1500
CURVE_KEYS = ("reward/mean", "reward/frac_zero_std", "herl/rewrite_success_rate")


# --------------------------------------------------------------------------------------------------------------------
# where: tracking URI and experiment


def tracking_uri(cfg: Config, root: str | Path = ".") -> str:
    """``MLFLOW_TRACKING_URI`` if set, else ``cfg.tracking.tracking_uri`` with a relative sqlite path made absolute."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or cfg.tracking.tracking_uri
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri[len(prefix) :].startswith("/"):
        uri = prefix + str((Path(root) / uri[len(prefix) :]).resolve())
    return uri


def artifact_location(cfg: Config, uri: str, root: str | Path = ".") -> str | None:
    """Absolute file URI of ``tracking.artifact_root`` for local backends; None (the server decides) otherwise.

    Without it MLflow puts artifacts in ``./mlruns`` relative to the CWD, so runs started from two
    folders would scatter it.
    """
    if not (uri.startswith("sqlite:") or uri.startswith("file:")):
        return None
    return (Path(root) / cfg.tracking.artifact_root).resolve().as_uri()


EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
"""MLflow 3 opens an experiment in its GenAI view ("Traces", "Evaluations") unless the experiment says it is for
model training: this tag value selects the model-training view (runs table, model metrics)."""


RUNS_VIEW_TAG = f"mlflow.sharedViewState.{RUNS_VIEW_KEY}"


def runs_view(cfg: Config) -> dict[str, Any]:
    """The runs table herl's links open (``?viewStateShareKey=herl``): the Models column, the pipeline's headline
    metrics (train's final reward and rewrite success, the last validation reward when ``train.eval_every`` is on,
    each benchmark's strict scores), whether hindsight was on and the profile, newest run first. The MLflow UI reads
    it from the experiment tag ``RUNS_VIEW_TAG``, the form of its own "share view"; a user can keep it ("Override
    saved view") or leave it."""
    metrics = ["reward/mean", "herl/rewrite_success_rate", *(["val/reward_mean"] if cfg.train.eval_every else [])]
    metrics += [f"{b}/{m}" for b in cfg.evaluate.benchmarks for m in ("prompt_strict", "inst_strict")]
    columns = ["attributes.`Models`", *(f"metrics.`{m}`" for m in metrics)]
    columns += ["params.`hindsight.enabled`", "tags.`herl.profile`"]
    return {"selectedColumns": columns, "orderByKey": "attributes.start_time", "orderByAsc": False}


def set_runs_view(client: MlflowClient, experiment: str, cfg: Config) -> None:
    """Store ``runs_view(cfg)`` on the experiment (only when it differs from the stored one)."""
    view = json.dumps(runs_view(cfg))
    if client.get_experiment(experiment).tags.get(RUNS_VIEW_TAG) != view:
        client.set_experiment_tag(experiment, RUNS_VIEW_TAG, view)


def experiment_id(client: MlflowClient, name: str, location: str | None) -> str:
    """Get or create the experiment (a concurrent creator may win the race: then look it up again), marked as a
    model-training experiment (``EXPERIMENT_KIND``) unless someone already chose its kind."""
    found = client.get_experiment_by_name(name)
    if found is None:
        try:
            client.create_experiment(name, artifact_location=location, tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
        except MlflowException:
            pass  # created meanwhile by a concurrent stage
        found = client.get_experiment_by_name(name)
        if found is None:
            raise MlflowException(f"could not create or find the MLflow experiment {name!r}")
    if EXPERIMENT_KIND_TAG not in found.tags:  # an experiment made by an earlier herl, or by hand
        client.set_experiment_tag(found.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    return found.experiment_id


# --------------------------------------------------------------------------------------------------------------------
# what: params and lineage tags


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """``{"a": {"b": 1}, "c": [1, 2]}`` → ``{"a.b": "1", "c": "[1, 2]"}`` (MLflow params are strings)."""
    out: dict[str, str] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value if isinstance(value, str) else json.dumps(value)
    return out


def git_info(root: str | Path) -> dict[str, str]:
    """``mlflow.source.git.commit`` and ``herl.git.dirty`` (tracked files changed; untracked ones do not count)."""

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if commit is None:
        return {"mlflow.source.git.commit": "unknown", "herl.git.dirty": "unknown"}
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"mlflow.source.git.commit": commit, "herl.git.dirty": str(bool(status)).lower()}


def read_lock(root: str | Path) -> dict[str, Any]:
    """The ``stages`` mapping of ``<root>/dvc.lock`` ({} when there is no lock yet)."""
    import yaml

    path = Path(root) / "dvc.lock"
    if not path.is_file():
        return {}
    return (yaml.safe_load(path.read_text(encoding="utf-8")) or {}).get("stages", {}) or {}


def dvc_tags(root: str | Path, stage: str) -> dict[str, str]:
    """``dvc.dep.<path>.md5`` / ``dvc.out.<path>.md5`` of one stage in dvc.lock (``md5.dir`` for folders)."""
    entry = read_lock(root).get(stage) or {}
    tags = {}
    for kind in ("deps", "outs"):
        for item in entry.get(kind) or []:
            if item.get("md5"):
                tags[f"dvc.{kind[:-1]}.{item['path']}.md5"] = str(item["md5"])
    return tags


def pipeline_dvc_tags(root: str | Path) -> dict[str, str]:
    """For the parent run: every stage's outs, and the deps that no stage produces (code, raw data)."""
    stages = read_lock(root)
    outs = {item["path"]: item.get("md5") for e in stages.values() for item in (e.get("outs") or [])}
    tags = {f"dvc.out.{p}.md5": str(m) for p, m in outs.items() if m}
    for e in stages.values():
        for item in e.get("deps") or []:
            if item["path"] not in outs and item.get("md5"):
                tags[f"dvc.dep.{item['path']}.md5"] = str(item["md5"])
    return tags


def prefect_flow_run_id() -> str | None:
    """``HERL_PREFECT_FLOW_RUN_ID`` if set, else the current Prefect flow run (only if prefect is already loaded)."""
    if os.environ.get(FLOW_RUN_ENV):
        return os.environ[FLOW_RUN_ENV]
    if "prefect" not in sys.modules:  # not inside a flow; importing prefect would cost a second for nothing
        return None
    from prefect.runtime import flow_run

    return flow_run.id


def lineage_tags(cfg: Config, stage: str, root: str | Path) -> dict[str, str]:
    """The tags every run carries: where its code, data and settings came from (lineage)."""
    tags = {
        **git_info(root),
        "herl.config_hash": cfg.hash(),
        **({"herl.stage_config_hash": cfg.hash(STAGE_SECTIONS[stage])} if stage in STAGE_SECTIONS else {}),
        "herl.profile": str(cfg.profile),
        "herl.stage": stage,
        **(dvc_tags(root, stage) if stage != "pipeline" else pipeline_dvc_tags(root)),
    }
    flow_run = prefect_flow_run_id()
    if flow_run:
        tags["prefect.flow_run_id"] = str(flow_run)
    for env, tag in (("DVC_EXP_NAME", "dvc.exp_name"), ("DVC_EXP_BASELINE_REV", "dvc.baseline_rev")):
        if os.environ.get(env):
            tags[tag] = os.environ[env]
    return tags


def set_tags(client: MlflowClient, run_id: str, tags: dict[str, str]) -> None:
    client.log_batch(run_id, tags=[RunTag(k, v[:5000]) for k, v in tags.items()])


# --------------------------------------------------------------------------------------------------------------------
# the sink the trainer writes to


class MlflowSink:
    """``herl_core.sink.MetricsSink`` over one MLflow run: metrics batched, records spooled until ``finish``.

    ``durable`` (the train stage): a function giving the number of steps a resume would NOT recompute (the step
    count of the newest checkpoint). A step's metrics are held back until that count passes the step, then sent:
    a kill before the checkpoint makes the resumed run recompute the step, and MLflow, which cannot delete a metric
    point, would otherwise hold the step twice. ``flush_durable`` sends what has become durable (the train command
    calls it after every step, i.e. after that step's checkpoint); ``flush`` sends everything (the run finished).
    Without ``durable`` metrics are sent at once."""

    def __init__(self, client: MlflowClient, run_id: str, spool: Path, durable: Callable[[], int] | None = None):
        self.client, self.run_id = client, run_id
        self.spool = JsonlSink(spool)
        self.durable = durable
        self.pending: list[tuple[int, list[Metric]]] = []

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        rows = [
            Metric(k, float(v), now, step)
            for k, v in metrics.items()
            if isinstance(v, int | float) and not isinstance(v, bool)
        ]
        if self.durable is None:
            self._send(rows)
            return
        self.pending.append((step, rows))
        self.flush_durable()

    def flush_durable(self) -> None:
        """Send the held metrics of the steps a resume would not recompute."""
        if self.durable is not None and self.pending:
            self.flush(below=self.durable())

    def flush(self, below: int | None = None) -> None:
        """Send the held metrics of the steps < ``below`` (all of them when None)."""
        ready = [rows for step, rows in self.pending if below is None or step < below]
        self.pending = [(step, rows) for step, rows in self.pending if not (below is None or step < below)]
        self._send([m for rows in ready for m in rows])

    def _send(self, rows: list[Metric]) -> None:
        for i in range(0, len(rows), 1000):  # log_batch takes at most 1000 metrics
            self.client.log_batch(self.run_id, metrics=rows[i : i + 1000])

    def log_records(self, name: str, records: Sequence[BaseModel], step: int) -> None:
        rows = []
        for r in records:
            row = r.model_dump(mode="json")
            row["step"] = step if row.get("step") is None else row["step"]
            rows.append(row)
        self.spool._append(name, rows)


def _cell(text: Any) -> Any:
    if isinstance(text, str) and len(text) > CELL_CHARS:
        return text[:CELL_CHARS] + f" …[{len(text) - CELL_CHARS} more chars]"
    return text


def experiences_table(rows: list[dict]) -> dict[str, list]:
    """Columns of the MLflow ``experiences`` table from HindsightRecord rows (long text cut to CELL_CHARS)."""
    columns = ["step", "prompt_id", "draft", "unmet_rubrics", "hindsight_prompt", "rewrite"]
    columns += ["draft_score", "rewrite_score", "bonus", "selected"]
    table: dict[str, list] = {c: [] for c in columns}
    for row in rows:
        verdicts = row.get("verdicts") or []
        unmet = [v.get("description") or v.get("rubric_id") for v in verdicts if v.get("passed") is False]
        values = {**row, "unmet_rubrics": "; ".join(unmet)}
        for c in columns:
            table[c].append(_cell(values.get(c)))
    return table


def records_table(rows: list[dict]) -> dict[str, list]:
    """Columns of a table of flat records (the keys of the first row, in order)."""
    return {c: [_cell(row.get(c)) for row in rows] for c in (rows[0] if rows else {})}


TABLES = {
    "experiences": (TABLE_FILE, experiences_table, "herl.table_rows"),
    "control_types": (CONTROL_TABLE_FILE, records_table, "herl.table_rows.control_types"),
}
"""Spooled record streams that also become an MLflow table: name → (table artifact, columns, tag counting its rows)."""


# --------------------------------------------------------------------------------------------------------------------
# one stage run


def _numbers(tree: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """Numeric leaves of a (nested) summary, keys joined with '/'; bools and strings are left to the JSON artifact."""
    out: dict[str, float] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_numbers(value, f"{prefix}{key}/"))
        elif isinstance(value, int | float) and not isinstance(value, bool):
            out[f"{prefix}{key}"] = float(value)
    return out


class StageTracker:
    """One MLflow run of one stage. ``sink`` goes to the trainer; ``finish`` logs the summary and the outputs."""

    def __init__(self, client: MlflowClient, run_id: str, cfg: Config, stage: str, root: Path):
        self.client, self.run_id, self.cfg, self.stage, self.root = client, run_id, cfg, stage, root
        self.spool_dir = root / SPOOL_DIR / run_id
        durable = (lambda: checkpointed_steps(cfg.train.checkpoint_dir)) if stage == "train" else None
        self.sink = MlflowSink(client, run_id, self.spool_dir, durable=durable)
        self.finished = False

    # ------------------------------------------------------------------------------------------------ public
    def finish(self, summary: dict, outputs: Sequence[str | Path] = (), metrics: dict[str, Any] | None = None) -> None:
        """``summary.json``, the run's result numbers, records + experiences table, outputs; for train: curve and
        model.

        Result numbers: ``metrics`` (the stage commands give ``herl_core.stages.headline``; default: every number of
        ``summary``) as metrics, except for ``train``: its per-step metrics already are its curves (the runs table
        shows each one's last step), so its summary (first / last / mean over the steps) goes to tags
        ``summary.<key>`` instead of one-point charts."""
        self.sink.flush()  # the stage completed: no step of it will be recomputed
        if self.stage == "train":
            tags = {f"summary.{k}": f"{v:.6g}" for k, v in _numbers(summary).items()}
            set_tags(self.client, self.run_id, tags)
        else:
            now = int(time.time() * 1000)
            numbers = _numbers(summary if metrics is None else metrics)
            self.sink._send([Metric(k, v, now, 0) for k, v in numbers.items()])
        self.client.log_dict(self.run_id, summary, "summary.json")
        self.log_records(table=True)
        for out in outputs:
            self._log_output(self.root / out)
        if self.stage == "train":
            self._log_curve()
            if self.cfg.tracking.log_model:
                self._log_model(step=max(int(summary.get("steps", 1)) - 1, 0))
        if self.stage != "train":  # train keeps its spool: a later resume of this run appends to it
            shutil.rmtree(self.spool_dir, ignore_errors=True)
        self.finished = True

    def log_records(self, table: bool) -> None:
        """Spooled records → ``records/<name>.jsonl``; with ``table``, new rows of each stream in TABLES → its MLflow
        table."""
        for path in sorted(self.spool_dir.glob("*.jsonl")):
            self.client.log_artifact(self.run_id, str(path), "records")
        if not table:
            return
        for name, (artifact, columns, tag) in TABLES.items():
            path = self.spool_dir / f"{name}.jsonl"
            if not path.is_file():
                continue
            rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
            done = int(self.client.get_run(self.run_id).data.tags.get(tag, 0))
            if rows[done:]:  # log_table appends to an existing table: send only rows it does not hold yet
                self.client.log_table(self.run_id, columns(rows[done:]), artifact)
                self.client.set_tag(self.run_id, tag, str(len(rows)))

    # ------------------------------------------------------------------------------------------------ parts
    def _log_output(self, path: Path) -> None:
        if path.is_dir():
            self.client.log_artifacts(self.run_id, str(path), f"outputs/{path.name}")
        elif path.is_file():
            self.client.log_artifact(self.run_id, str(path), "outputs")
        else:
            self.client.set_tag(self.run_id, f"herl.missing_output.{path.name}", str(path))

    def _log_curve(self) -> None:
        """``plots/reward_curve.png``: the per-step history of CURVE_KEYS, read back from MLflow (resume-proof)."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        history = {k: self.client.get_metric_history(self.run_id, k) for k in CURVE_KEYS}
        history = {k: sorted((m.step, m.value) for m in v) for k, v in history.items() if v}
        if not history:
            return
        fig, axes = plt.subplots(len(history), 1, figsize=(6, 2.2 * len(history)), sharex=True, squeeze=False)
        for ax, (key, points) in zip(axes[:, 0], history.items(), strict=True):
            ax.plot([s for s, _ in points], [v for _, v in points], marker="o")
            ax.set_ylabel(key, fontsize=8)
            ax.grid(alpha=0.3)
        axes[-1, 0].set_xlabel("step")
        fig.suptitle(f"herl train ({self.cfg.profile}, config {self.cfg.hash()})", fontsize=9)
        fig.tight_layout()
        with tempfile.TemporaryDirectory() as tmp:
            fig.savefig(Path(tmp) / "reward_curve.png", dpi=100)
            self.client.log_artifact(self.run_id, str(Path(tmp) / "reward_curve.png"), "plots")
        plt.close(fig)

    def _log_model(self, step: int) -> None:
        """The policy folder as an MLflow logged model of this run (output of the run at ``step``, so the runs table's
        Models column and the model page link them), registered as a new version of ``tracking.registered_model``
        with the alias ``tracking.model_alias``. The model is logged with MLflow's transformers flavor
        (``mlflow.transformers.load_model("models:/herl-policy@candidate")`` gives a text-generation pipeline);
        weights stay safetensors, nothing is pickled. When the flavor cannot wrap it, the folder's files are logged as
        the model (tag ``herl.model_flavor_error``)."""
        folder = self.root / self.cfg.train.out_dir
        if not folder.is_dir():
            self.client.set_tag(self.run_id, "herl.register_error", f"no model folder at {folder}")
            return
        experiment = self.client.get_run(self.run_id).info.experiment_id
        tags = {"herl.config_hash": self.cfg.hash(), "herl.profile": str(self.cfg.profile), "herl.stage": "train"}
        model = self.client.create_logged_model(experiment, name="policy", source_run_id=self.run_id, tags=tags)
        try:
            with tempfile.TemporaryDirectory() as tmp:
                save_transformers_model(folder, Path(tmp) / "model", model, self.run_id, self.cfg)
                self.client.log_model_artifacts(model.model_id, str(Path(tmp) / "model"))
        except Exception as exc:  # a model the flavor cannot load or wrap: keep its files as the model
            warnings.warn(
                f"logging the policy with mlflow.transformers failed ({exc}); logging its files", stacklevel=2
            )
            self.client.set_tag(self.run_id, "herl.model_flavor_error", str(exc)[:1000])
            self.client.log_model_artifacts(model.model_id, str(folder))
        self.client.finalize_logged_model(model.model_id, "READY")
        self.client.log_outputs(self.run_id, [LoggedModelOutput(model.model_id, step)])
        self.client.set_tag(self.run_id, "herl.model_id", model.model_id)
        self._register(model.model_id)

    def _register(self, model_id: str) -> None:
        name, alias = self.cfg.tracking.registered_model, self.cfg.tracking.model_alias
        try:
            try:
                self.client.create_registered_model(name)
            except MlflowException as exc:
                if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
            tags = {"herl.config_hash": self.cfg.hash(), "herl.profile": str(self.cfg.profile)}
            # MLflow's registry resolves a models:/ source with the default client: point it at this store
            with default_tracking_uri(self.client.tracking_uri):
                version = self.client.create_model_version(
                    name, f"models:/{model_id}", run_id=self.run_id, tags=tags, model_id=model_id
                )
            self.client.set_registered_model_alias(name, alias, version.version)
            self.client.set_tag(self.run_id, "herl.model_version", f"{name}/{version.version}@{alias}")
            link_model_version(self.client, model_id, name, version.version)
        except Exception as exc:  # the run's data is already logged; registry trouble must not lose it
            warnings.warn(f"registering {name} failed: {exc}", stacklevel=2)
            self.client.set_tag(self.run_id, "herl.register_error", str(exc)[:1000])


MODEL_VERSIONS_TAG = "mlflow.modelVersions"
"""The logged model's tag that the MLflow UI reads for its "Registered models" cell (the run page's Model attributes
table, the experiment's Models tab). ``mlflow.register_model`` sets it; ``MlflowClient.create_model_version`` does
not."""


def link_model_version(client: MlflowClient, model_id: str, name: str, version: str | int) -> None:
    """Add ``name`` version ``version`` to the logged model's ``MODEL_VERSIONS_TAG`` (a JSON list, as MLflow's
    ``register_model`` writes it)."""
    tagged = client.get_logged_model(model_id).tags.get(MODEL_VERSIONS_TAG)
    versions = json.loads(tagged) if tagged else []
    entry = {"name": name, "version": version}
    if entry not in versions:
        client.set_logged_model_tags(model_id, {MODEL_VERSIONS_TAG: json.dumps([*versions, entry])})


@contextmanager
def default_tracking_uri(uri: str) -> Iterator[None]:
    """``MLFLOW_TRACKING_URI`` = ``uri`` for the block (for what MLflow resolves with a default ``MlflowClient()``),
    then as it was."""
    previous = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = uri
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = previous


def save_transformers_model(folder: Path, out: Path, model, run_id: str, cfg: Config) -> None:
    """``folder`` (an HF causal-LM folder) saved as an MLflow transformers model (task text-generation) in ``out``,
    for the logged model ``model``. The pip requirements are this environment's versions (given, not inferred: no
    model load in a subprocess). MLflow's notes about the missing hub model card and licence are silenced: the
    policy is a local folder."""
    import logging
    from importlib.metadata import version

    import mlflow.transformers
    from mlflow.models import Model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    weights = AutoModelForCausalLM.from_pretrained(
        folder, dtype="auto", use_safetensors=True, trust_remote_code=cfg.model.trust_remote_code
    )
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=cfg.model.trust_remote_code)
    requirements = [f"{pkg}=={version(pkg)}" for pkg in ("torch", "transformers", "tokenizers", "safetensors")]
    meta = Model(
        artifact_path=model.artifact_location, model_uuid=model.model_id, run_id=run_id, model_id=model.model_id
    )
    quiet = logging.getLogger("mlflow.transformers")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        mlflow.transformers.save_model(
            {"model": weights, "tokenizer": tokenizer}, str(out), task="text-generation", mlflow_model=meta,
            pip_requirements=requirements,
        )  # fmt: skip
    finally:
        quiet.setLevel(level)


def checkpointed_steps(checkpoint_dir: str | Path) -> int:
    """Steps completed in the newest checkpoint of ``checkpoint_dir`` (``step-000003`` → 3; 0 without one): a
    resume recomputes the steps from there on."""
    from herl_core.checkpoint import latest_checkpoint  # imports torch: only for the train stage

    found = latest_checkpoint(checkpoint_dir)
    return int(found.name.split("-", 1)[1]) if found is not None else 0


def resume_target(client: MlflowClient, cfg: Config) -> tuple[str | None, int]:
    """(run id, resume step) of the train run this ``herl train`` continues, (None, 0) for a new run.

    The decision is ``herl_core.resume.resume_point``, the one the trainer makes: a checkpoint written under other
    settings is not continued, so its run is not re-attached either. A run that is gone from this store (another
    store, purged or deleted) is not re-attached; the trainer still resumes its checkpoint."""
    from herl_core.resume import resume_point  # imports torch: only for the train stage

    point = resume_point(cfg)
    if point.run_id is None:
        return None, 0
    try:
        run = client.get_run(point.run_id)
    except MlflowException:  # another tracking store, or the run was purged
        return None, 0
    if run.info.lifecycle_stage != "active":
        return None, 0
    return point.run_id, point.step


def _log_params(client: MlflowClient, run_id: str, cfg: Config) -> None:
    """Flattened config as params; on a re-attached run, changed values are named in a tag (params are immutable)."""
    params = flatten(cfg.model_dump(mode="json"))
    have = client.get_run(run_id).data.params
    new = [Param(k, v[:6000]) for k, v in params.items() if k not in have]
    for i in range(0, len(new), 100):
        client.log_batch(run_id, params=new[i : i + 100])
    changed = sorted(k for k, v in params.items() if k in have and have[k] != v[:6000])
    if changed:
        client.set_tag(run_id, "herl.params_changed_on_resume", ",".join(changed)[:5000])
    client.log_dict(run_id, cfg.model_dump(mode="json"), "config.json")


def _open_run(client: MlflowClient, uri: str, cfg: Config, stage: str, root: Path, resume: bool) -> tuple[str, int]:
    run_id, step = resume_target(client, cfg) if stage == "train" and resume else (None, 0)
    if run_id is not None:
        client.update_run(run_id, status="RUNNING")
        client.set_tag(run_id, "herl.resumed_at_step", str(step))
    else:
        exp = experiment_id(client, cfg.tracking.experiment, artifact_location(cfg, uri, root))
        set_runs_view(client, exp, cfg)
        run_id = client.create_run(exp, run_name=stage).info.run_id
    tags = lineage_tags(cfg, stage, root)
    if os.environ.get(PARENT_ENV):
        tags["mlflow.parentRunId"] = os.environ[PARENT_ENV]
    set_tags(client, run_id, tags)
    _log_params(client, run_id, cfg)
    return run_id, step


@contextmanager
def stage_run(
    cfg: Config, stage: str, params_path: str | Path = "params.yaml", *, resume: bool = True
) -> Iterator[StageTracker]:
    """An MLflow run for one stage (child of ``$HERL_MLFLOW_PARENT_RUN_ID`` when set), ended when the block ends.

    ``train`` re-attaches to the run named in the newest checkpoint when the trainer will continue that checkpoint
    (``resume_target``: same settings, not past ``train.steps``) unless ``resume=False``. While the block runs,
    ``$HERL_MLFLOW_RUN_ID`` holds the run id (for the trainer to save). An exception marks the run FAILED (records
    so far are logged; the train spool is kept for the resume).
    """
    root = Path(params_path).resolve().parent
    uri = tracking_uri(cfg, root)
    client = MlflowClient(tracking_uri=uri)
    run_id, step = _open_run(client, uri, cfg, stage, root, resume)
    tracker = StageTracker(client, run_id, cfg, stage, root)
    if step:
        tracker.sink.spool.truncate_after(step - 1)  # steps >= step are recomputed by the resumed trainer
    previous = os.environ.get(RUN_ENV)
    os.environ[RUN_ENV] = run_id
    try:
        yield tracker
        if not tracker.finished:
            tracker.finish({})
        client.set_terminated(run_id, "FINISHED")
    except BaseException as exc:
        tracker.log_records(table=False)
        held = sorted({step for step, _ in tracker.sink.pending})
        if held:  # steps after the last checkpoint: a resume recomputes and logs them (reports/train has them)
            client.set_tag(run_id, "herl.unlogged_steps", ",".join(map(str, held)))
        client.set_tag(run_id, "herl.error", f"{type(exc).__name__}: {exc}"[:1000])
        client.set_terminated(run_id, "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
        raise
    finally:
        if previous is None:
            os.environ.pop(RUN_ENV, None)
        else:
            os.environ[RUN_ENV] = previous
