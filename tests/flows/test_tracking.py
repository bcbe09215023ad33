"""flows/tracking.py on a real temp sqlite MLflow store: parent/child runs, lineage tags, flattened params, step
metrics, the experiences table, the reward curve, the model and its registered version, resume re-attach, and the
judge API key never reaching MLflow."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

from flows.tracking import (
    CELL_CHARS,
    PARENT_ENV,
    RUN_ENV,
    TABLE_FILE,
    dvc_tags,
    flatten,
    pipeline_dvc_tags,
    stage_run,
    tracking_uri,
)
from herl_core.config import load_params
from herl_core.records import HindsightRecord, Verdict
from herl_core.resume import resume_point, train_fingerprint

SECRET = "sk-herl-TEST-5ecret-value-0042"

LOCK = {
    "schema": "2.0",
    "stages": {
        "prepare": {
            "cmd": "herl prepare",
            "deps": [{"path": "herl_core/prepare.py", "md5": "aaa111", "size": 10}],
            "outs": [{"path": "data/prepared", "md5": "bbb222.dir", "size": 20, "nfiles": 3}],
        },
        "rollout": {
            "cmd": "herl rollout",
            "deps": [{"path": "data/prepared", "md5": "bbb222.dir", "size": 20, "nfiles": 3}],
            "outs": [{"path": "data/rollout", "md5": "ccc333.dir", "size": 30, "nfiles": 1}],
        },
    },
}


@pytest.fixture
def project(tmp_path, mlflow_uri, monkeypatch, init_repo, request) -> Path:
    """A committed git project with params.yaml (tiny profile, own experiment) and a fake dvc.lock."""
    params = {
        "profile": "tiny",
        "tracking": {"experiment": f"t-{request.node.name}"},
        "train": {"out_dir": "models/policy", "checkpoint_dir": "runs/ckpt", "report_dir": "reports/train"},
        "profiles": {
            "tiny": {
                "model": {"name_or_path": "tiny"},
                "train": {"steps": 2, "prompts_per_step": 4, "mini_batch_prompts": 2},
            }
        },
    }
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    (tmp_path / "dvc.lock").write_text(yaml.safe_dump(LOCK))
    init_repo(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_uri)
    monkeypatch.delenv(PARENT_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def experience(step: int, draft: str = "a draft", passed: bool = False) -> HindsightRecord:
    return HindsightRecord(
        step=step, prompt_id=f"p{step}", draft_index=0, draft=draft, draft_score=0.5, draft_dense=0.5,
        verdicts=[
            Verdict(rubric_id="punctuation:no_comma", description="Do not use commas.", passed=passed),
            Verdict(rubric_id="change_case:english_lowercase", description="All lowercase.", passed=True),
        ],
        hindsight_prompt="[Instruction] ... [Feedback] Do not use commas.", rewrite="a rewrite",
        rewrite_score=1.0, rewrite_dense=1.0, bonus=0.025, shaped_score=0.525, group_best=0.5, selected=True, slot=1,
    )  # fmt: skip


def read_table(client: MlflowClient, run_id: str, dst: Path) -> dict:
    return json.loads(Path(client.download_artifacts(run_id, TABLE_FILE, str(dst))).read_text())


# ------------------------------------------------------------------------------------------------------ pure helpers


def test_flatten_and_tracking_uri(tmp_path, monkeypatch):
    assert flatten({"a": {"b": 1, "c": {"d": "x"}}, "e": [1, 2], "f": None}) == {
        "a.b": "1", "a.c.d": "x", "e": "[1, 2]", "f": "null"
    }  # fmt: skip
    cfg = load_params_text(tmp_path, "tracking: {tracking_uri: 'sqlite:///sub/m.db'}\n")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking_uri(cfg, tmp_path) == f"sqlite:///{tmp_path.resolve()}/sub/m.db"  # relative → project root
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5055")
    assert tracking_uri(cfg, tmp_path) == "http://127.0.0.1:5055"


def load_params_text(root: Path, text: str):
    (root / "params.yaml").write_text(text)
    return load_params(root / "params.yaml")


def test_dvc_tags_per_stage_and_for_the_pipeline(tmp_path):
    assert dvc_tags(tmp_path, "rollout") == {}  # no dvc.lock yet
    (tmp_path / "dvc.lock").write_text(yaml.safe_dump(LOCK))
    assert dvc_tags(tmp_path, "rollout") == {
        "dvc.dep.data/prepared.md5": "bbb222.dir",
        "dvc.out.data/rollout.md5": "ccc333.dir",
    }
    # parent: all outs + only the deps no stage produces (data/prepared is an out, not repeated as a dep)
    assert pipeline_dvc_tags(tmp_path) == {
        "dvc.out.data/prepared.md5": "bbb222.dir",
        "dvc.out.data/rollout.md5": "ccc333.dir",
        "dvc.dep.herl_core/prepare.py.md5": "aaa111",
    }


# ------------------------------------------------------------------------------------------------------ real runs


def test_parent_and_child_runs_carry_lineage_params_and_step_metrics(project, monkeypatch):
    cfg = load_params(project / "params.yaml")
    commit = init_commit(project)
    with stage_run(cfg, "pipeline") as parent:
        monkeypatch.setenv(PARENT_ENV, parent.run_id)
        with stage_run(cfg, "rollout") as child:
            assert os.environ[RUN_ENV] == child.run_id  # the id a trainer can save
            for step, reward in enumerate([0.25, 0.5, 0.75]):
                child.sink.log_metrics({"reward/mean": reward, "note": "text is skipped", "ok": True}, step)
            child.finish({"prompts": 4, "report": {"pass_rate": 0.5}, "name": "x"})
        assert os.environ[RUN_ENV] == parent.run_id  # restored after the child
        parent.finish({})
    client = MlflowClient()
    run = client.get_run(child.run_id)
    tags, params = run.data.tags, run.data.params
    assert run.info.status == "FINISHED" and run.info.run_name == "rollout"
    assert tags["mlflow.parentRunId"] == parent.run_id
    assert tags["mlflow.source.git.commit"] == commit and tags["herl.git.dirty"] == "false"
    assert tags["herl.config_hash"] == cfg.hash() and tags["herl.profile"] == "tiny" and tags["herl.stage"] == "rollout"
    assert tags["dvc.dep.data/prepared.md5"] == "bbb222.dir" and tags["dvc.out.data/rollout.md5"] == "ccc333.dir"
    # params: the resolved config, flattened (tiny profile applied: train.steps 2, model.name_or_path tiny)
    assert params["train.steps"] == "2" and params["model.name_or_path"] == "tiny"
    assert params["model.tiny.hidden_size"] == "64" and params["evaluate.benchmarks"] == '["ifeval", "ifbench"]'
    history = sorted((m.step, m.value) for m in client.get_metric_history(child.run_id, "reward/mean"))
    assert history == [(0, 0.25), (1, 0.5), (2, 0.75)]
    # summary: numbers become metrics (nested keys joined by '/'); strings and bools do not
    assert run.data.metrics["prompts"] == 4.0 and run.data.metrics["report/pass_rate"] == 0.5
    assert "note" not in run.data.metrics and "ok" not in run.data.metrics and "name" not in run.data.metrics
    parent_run = client.get_run(parent.run_id)
    assert "mlflow.parentRunId" not in parent_run.data.tags
    assert parent_run.data.tags["dvc.dep.herl_core/prepare.py.md5"] == "aaa111"
    assert parent_run.data.tags["herl.stage"] == "pipeline"


def init_commit(root: Path) -> str:
    import subprocess

    return subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True).stdout.strip()


def test_experiences_become_one_table_and_jsonl_records(project, tmp_path_factory):
    cfg = load_params(project / "params.yaml")
    long_draft = "x" * (CELL_CHARS + 100)
    with stage_run(cfg, "hindsight") as tracker:
        tracker.sink.log_records("experiences", [experience(0), experience(0, draft=long_draft, passed=True)], 0)
        tracker.sink.log_records("experiences", [experience(1)], 1)
        tracker.finish({"rewrites": 3})
    client = MlflowClient()
    table = read_table(client, tracker.run_id, tmp_path_factory.mktemp("dl"))
    assert table["columns"] == [
        "step", "prompt_id", "draft", "unmet_rubrics", "hindsight_prompt", "rewrite",
        "draft_score", "rewrite_score", "bonus", "selected",
    ]  # fmt: skip
    rows = [dict(zip(table["columns"], r, strict=True)) for r in table["data"]]
    assert [r["step"] for r in rows] == [0, 0, 1]
    assert rows[0]["unmet_rubrics"] == "Do not use commas." and rows[1]["unmet_rubrics"] == ""
    assert rows[1]["draft"] == "x" * CELL_CHARS + " …[100 more chars]"  # cut, and says how much
    assert rows[0]["bonus"] == 0.025 and rows[0]["selected"] is True
    logged = json.loads(client.get_run(tracker.run_id).data.tags["mlflow.loggedArtifacts"])
    assert logged == [{"path": TABLE_FILE, "type": "table"}]  # one table per run (mlflow/mlflow#11874)
    dst = str(tmp_path_factory.mktemp("j"))
    jsonl = Path(client.download_artifacts(tracker.run_id, "records/experiences.jsonl", dst))
    assert len(jsonl.read_text().splitlines()) == 3
    assert not (project / ".herl/mlflow" / tracker.run_id).exists()  # spool removed after a finished non-train run


def tiny_model_folder(folder: Path) -> None:
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8}))
    save_file({"w": torch.ones(2, 2)}, str(folder / "model.safetensors"))


@pytest.fixture(scope="module")
def tiny_policy(tmp_path_factory) -> Path:
    """A real (tiny, random) policy folder as the train stage writes it: safetensors, tokenizer, chat template."""
    from herl_core.config import ModelConfig, TinyModelConfig
    from herl_core.models import load_policy, save_checkpoint_weights

    tiny = TinyModelConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=32)
    model, tok = load_policy(ModelConfig(name_or_path="tiny", tiny=tiny))
    return save_checkpoint_weights(model, tok, tmp_path_factory.mktemp("policy") / "policy")


def test_train_logs_curve_and_the_policy_as_a_logged_model_of_the_run_with_a_registered_version(
    project, tmp_path_factory, tiny_policy, monkeypatch
):
    import shutil

    import mlflow.transformers
    import torch
    from safetensors.torch import load_file

    monkeypatch.delenv("MLFLOW_TRACKING_URI")  # as `herl train` runs by default: the store named in params.yaml
    cfg = load_params(project / "params.yaml")
    shutil.copytree(tiny_policy, project / "models/policy")
    with stage_run(cfg, "train") as tracker:
        for step in range(3):
            tracker.sink.log_metrics(
                {"reward/mean": 0.1 * step, "reward/frac_zero_std": 0.5, "herl/rewrite_success_rate": 0.2}, step
            )
        tracker.finish({"steps": 3, "reward/mean_first": 0.0, "reward/mean_last": 0.2})
    assert "MLFLOW_TRACKING_URI" not in os.environ  # left as it was
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{project / 'mlruns.db'}")
    client = MlflowClient()
    run = client.get_run(tracker.run_id)
    arts = {a.path for a in client.list_artifacts(tracker.run_id)}
    assert {"config.json", "summary.json", "plots"} <= arts and "model" not in arts  # the model is not a run folder
    png = Path(client.download_artifacts(tracker.run_id, "plots/reward_curve.png", str(tmp_path_factory.mktemp("p"))))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the summary (first / last over the steps) is tags, not one-point metric charts beside the curves
    assert run.data.tags["summary.reward/mean_first"] == "0" and run.data.tags["summary.steps"] == "3"
    assert set(run.data.metrics) == {"reward/mean", "reward/frac_zero_std", "herl/rewrite_success_rate"}
    assert run.data.metrics["reward/mean"] == pytest.approx(0.2)  # the runs table's column: the last step
    # the policy is an MLflow logged model, output of the run at its last step (the runs table's Models column)
    (output,) = run.outputs.model_outputs
    assert output.step == 2 and run.data.tags["herl.model_id"] == output.model_id
    model = client.get_logged_model(output.model_id)
    assert model.source_run_id == tracker.run_id and model.status.to_proto() == 2  # READY
    assert model.experiment_id == run.info.experiment_id and model.name == "policy"
    files = {a.path for a in client.list_logged_model_artifacts(output.model_id)}
    assert {"MLmodel", "model", "components", "requirements.txt"} <= files
    # registered under tracking.registered_model with the alias, pointing at the logged model
    version = client.get_model_version_by_alias(cfg.tracking.registered_model, cfg.tracking.model_alias)
    assert version.run_id == tracker.run_id and version.source == f"models:/{output.model_id}"
    assert run.data.tags["herl.model_version"] == f"herl-policy/{version.version}@candidate"
    # the logged model names its registered version (the UI's "Registered models" cell of the model)
    tagged = json.loads(client.get_logged_model(output.model_id).tags["mlflow.modelVersions"])
    assert tagged == [{"name": "herl-policy", "version": version.version}]
    # and it loads back with MLflow's transformers flavor, with the trained weights (safetensors, nothing pickled)
    loaded = mlflow.transformers.load_model("models:/herl-policy@candidate", return_type="components")
    want = load_file(str(tiny_policy / "model.safetensors"))
    got = loaded["model"].state_dict()
    assert want.keys() <= got.keys() and all(torch.equal(got[k], want[k]) for k in want)
    pickles = [p for p in Path(mlflow.artifacts.download_artifacts(f"models:/{output.model_id}")).rglob("*")
               if p.suffix in (".bin", ".pkl", ".pt", ".pth")]  # fmt: skip
    assert pickles == []


def test_a_folder_the_flavor_cannot_load_is_logged_as_files_of_the_model(project):
    cfg = load_params(project / "params.yaml")
    tiny_model_folder(project / "models/policy")  # config.json without a loadable architecture
    with pytest.warns(UserWarning, match="mlflow.transformers failed"):
        with stage_run(cfg, "train") as tracker:
            tracker.finish({"steps": 1})
    client = MlflowClient()
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED" and "herl.model_flavor_error" in run.data.tags
    (output,) = run.outputs.model_outputs
    files = {a.path for a in client.list_logged_model_artifacts(output.model_id)}
    assert files == {"config.json", "model.safetensors"}
    version = client.get_model_version_by_alias(cfg.tracking.registered_model, "candidate")
    assert version.source == f"models:/{output.model_id}"


def test_registry_failure_keeps_the_run_and_its_logged_model(project, tiny_policy):
    import shutil

    cfg = load_params(project / "params.yaml", overrides=["tracking.registered_model=''"])  # empty name: rejected
    shutil.copytree(tiny_policy, project / "models/policy")
    with pytest.warns(UserWarning, match="registering"):
        with stage_run(cfg, "train") as tracker:
            tracker.finish({"steps": 1})
    run = MlflowClient().get_run(tracker.run_id)
    assert run.info.status == "FINISHED" and "herl.register_error" in run.data.tags
    (output,) = run.outputs.model_outputs
    assert "MLmodel" in {a.path for a in MlflowClient().list_logged_model_artifacts(output.model_id)}


def test_the_experiment_carries_the_runs_table_view_herls_links_open(project):
    """The runs table herl links to (``?viewStateShareKey=herl``) shows the Models column and the headline numbers
    (what the parent run carries), as MLflow's UI reads a shared view: JSON in the experiment tag
    ``mlflow.sharedViewState.herl``; it follows evaluate.benchmarks."""
    cfg = load_params(project / "params.yaml", overrides=["evaluate.benchmarks=[ifeval, ifbench]"])
    with stage_run(cfg, "prepare") as tracker:
        pass
    client = MlflowClient()
    exp = client.get_run(tracker.run_id).info.experiment_id
    view = json.loads(client.get_experiment(exp).tags["mlflow.sharedViewState.herl"])
    assert view["selectedColumns"] == [
        "attributes.`Models`", "metrics.`reward/mean`", "metrics.`herl/rewrite_success_rate`",
        "metrics.`ifeval/prompt_strict`", "metrics.`ifeval/inst_strict`", "metrics.`ifbench/prompt_strict`",
        "metrics.`ifbench/inst_strict`", "params.`hindsight.enabled`", "tags.`herl.profile`",
    ]  # fmt: skip
    assert (view["orderByKey"], view["orderByAsc"]) == ("attributes.start_time", False)
    only_ifeval = load_params(project / "params.yaml", overrides=["evaluate.benchmarks=[ifeval]"])
    with stage_run(only_ifeval, "prepare"):
        pass
    view = json.loads(client.get_experiment(exp).tags["mlflow.sharedViewState.herl"])
    assert "metrics.`ifbench/prompt_strict`" not in view["selectedColumns"]
    assert "metrics.`val/reward_mean`" not in view["selectedColumns"]  # validation off (the default)
    validating = load_params(project / "params.yaml", overrides=["train.eval_every=2"])
    with stage_run(validating, "prepare"):
        pass
    view = json.loads(client.get_experiment(exp).tags["mlflow.sharedViewState.herl"])
    assert view["selectedColumns"][:4] == [
        "attributes.`Models`", "metrics.`reward/mean`", "metrics.`herl/rewrite_success_rate`",
        "metrics.`val/reward_mean`",
    ]  # fmt: skip


def test_the_parent_run_carries_trains_last_values_and_the_last_validation(project):
    """The pipeline parent's metrics (its runs-table row): the train child's last reward, zero-std fraction, rewrite
    success and validation reward (validation ran at steps 0 and 2 of 3), evaluate's scores per benchmark."""
    from flows.pipeline import headline_metrics

    cfg = load_params(project / "params.yaml")
    client = MlflowClient()
    exp = client.create_experiment("parent-metrics")
    parent = client.create_run(exp, run_name="pipeline").info.run_id
    child = {"mlflow.parentRunId": parent}
    train = client.create_run(exp, run_name="train", tags=child).info.run_id
    for step, reward, val in ((0, 0.25, 0.125), (1, 0.5, None), (2, 0.75, 0.375)):
        client.log_metric(train, "reward/mean", reward, step=step)
        client.log_metric(train, "reward/frac_zero_std", 1.0 - reward, step=step)
        client.log_metric(train, "actor/loss", 0.5, step=step)
        if val is not None:
            client.log_metric(train, "val/reward_mean", val, step=step)
    evaluate = client.create_run(exp, run_name="evaluate", tags=child).info.run_id
    for key, value in {"ifeval/prompt_strict": 0.5, "ifeval/n_prompts": 4.0, "ifbench/inst_strict": 0.25}.items():
        client.log_metric(evaluate, key, value)
    assert headline_metrics(client, parent, cfg) == {
        "reward/mean": 0.75, "reward/frac_zero_std": 0.25, "val/reward_mean": 0.375,
        "ifeval/prompt_strict": 0.5, "ifbench/inst_strict": 0.25,
    }  # fmt: skip


def test_experiments_open_in_the_model_training_view(project):
    """MLflow 3 shows an experiment in its GenAI view unless it is tagged as a model-training one; an experiment made
    before (untagged) gets the tag, one whose kind a user set keeps it."""
    from flows.tracking import EXPERIMENT_KIND, EXPERIMENT_KIND_TAG, experiment_id

    cfg = load_params(project / "params.yaml")
    with stage_run(cfg, "prepare") as tracker:
        pass
    client = MlflowClient()
    exp = client.get_experiment(client.get_run(tracker.run_id).info.experiment_id)
    assert exp.tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND == "custom_model_development"
    old = client.create_experiment("made-by-hand-before")
    assert EXPERIMENT_KIND_TAG not in client.get_experiment(old).tags
    assert experiment_id(client, "made-by-hand-before", None) == old
    assert client.get_experiment(old).tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND
    chosen = client.create_experiment("genai-by-choice", tags={EXPERIMENT_KIND_TAG: "genai_development"})
    experiment_id(client, "genai-by-choice", None)
    assert client.get_experiment(chosen).tags[EXPERIMENT_KIND_TAG] == "genai_development"


def write_checkpoint(root: Path, step: int, run_id: str, fingerprint: str) -> None:
    """The state file of a checkpoint the trainer wrote under ``fingerprint`` for the run ``run_id``."""
    folder = root / "runs/ckpt" / f"step-{step:06d}"
    folder.mkdir(parents=True)
    extras = {"mlflow_run_id": run_id, "train_fingerprint": fingerprint}
    state = {"trainer": {"step": step, "epoch": 0, "position": 0, "extras": extras}}
    (folder / "trainer_state.json").write_text(json.dumps(state))


def test_resumed_train_reattaches_to_the_crashed_run(project, tmp_path_factory):
    cfg = load_params(project / "params.yaml")
    with pytest.raises(RuntimeError, match="crash"):
        with stage_run(cfg, "train") as first:
            for step in (0, 1):
                first.sink.log_metrics({"reward/mean": 0.5}, step)
                first.sink.log_records("experiences", [experience(step)], step)
            raise RuntimeError("crash in step 1")  # the checkpoint below holds step 0 only: step 1 is redone
    client = MlflowClient()
    assert client.get_run(first.run_id).info.status == "FAILED"
    assert client.get_run(first.run_id).data.tags["herl.error"] == "RuntimeError: crash in step 1"
    write_checkpoint(project, 1, first.run_id, train_fingerprint(cfg))  # 1 step completed: steps >= 1 are redone
    with stage_run(cfg, "train") as second:
        assert second.run_id == first.run_id
        for step in (1, 2):
            second.sink.log_records("experiences", [experience(step)], step)
        second.finish({"steps": 3})
    run = client.get_run(first.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["herl.resumed_at_step"] == "1"
    rows = read_table(client, first.run_id, tmp_path_factory.mktemp("t"))["data"]
    assert [r[0] for r in rows] == [0, 1, 2]  # step 1 of the crashed attempt dropped, not duplicated
    with stage_run(cfg, "train", resume=False) as fresh:
        pass
    assert fresh.run_id != first.run_id


def test_train_metrics_reach_mlflow_once_their_checkpoint_is_written(project):
    """A train step's metrics are held back until a checkpoint covers the step: a kill before that checkpoint makes
    the resume recompute the step, and MLflow (which cannot delete a metric point) then holds it once, with the
    values the resumed run computed."""
    cfg = load_params(project / "params.yaml")
    client = MlflowClient()

    def history(run_id: str) -> list[tuple[int, float]]:
        return sorted((m.step, m.value) for m in client.get_metric_history(run_id, "reward/mean"))

    with pytest.raises(RuntimeError, match="killed"):
        with stage_run(cfg, "train") as first:
            first.sink.log_metrics({"reward/mean": 0.25}, 0)
            assert history(first.run_id) == []  # no checkpoint holds step 0 yet
            write_checkpoint(project, 1, first.run_id, train_fingerprint(cfg))  # the trainer's save after step 0
            first.sink.flush_durable()  # what the train command does after every step
            assert history(first.run_id) == [(0, 0.25)]
            first.sink.log_metrics({"reward/mean": 0.5}, 1)  # step 1 computed; its checkpoint is never written
            raise RuntimeError("killed before checkpoint 2")
    run = client.get_run(first.run_id)
    assert run.info.status == "FAILED" and run.data.tags["herl.unlogged_steps"] == "1"
    assert history(first.run_id) == [(0, 0.25)]
    with stage_run(cfg, "train") as second:  # the resume re-attaches at step 1 and recomputes it
        assert second.run_id == first.run_id
        second.sink.log_metrics({"reward/mean": 0.75}, 1)
        second.sink.log_metrics({"reward/mean": 1.0}, 2)
        second.finish({"steps": 3})  # the stage completed: everything held is sent
    assert history(first.run_id) == [(0, 0.25), (1, 0.75), (2, 1.0)]
    assert client.get_run(first.run_id).data.tags["herl.resumed_at_step"] == "1"


def test_a_checkpoint_of_other_settings_opens_a_new_run(project):
    """The trainer does not continue a checkpoint written under other settings, so the tracker does not re-attach to
    its run: the new experiment gets its own run (its steps 0, 1, ... never land in the old run's history)."""
    cfg = load_params(project / "params.yaml")
    with stage_run(cfg, "train") as first:
        first.sink.log_metrics({"reward/mean": 0.5}, 0)
    write_checkpoint(project, 1, first.run_id, train_fingerprint(cfg))
    changed = load_params(project / "params.yaml", overrides=["hindsight.bonus_alpha=0.1"])
    assert resume_point(changed).checkpoint is None and resume_point(cfg).run_id == first.run_id
    with stage_run(changed, "train") as second:
        second.sink.log_metrics({"reward/mean": 0.25}, 0)
    client = MlflowClient()
    assert second.run_id != first.run_id and "herl.resumed_at_step" not in client.get_run(second.run_id).data.tags
    assert [m.value for m in client.get_metric_history(first.run_id, "reward/mean")] == [0.5]
    # the same settings with more steps (train.steps is resume-neutral) continue the run
    longer = load_params(project / "params.yaml", overrides=["train.steps=5"])
    with stage_run(longer, "train") as third:
        pass
    assert third.run_id == first.run_id


def test_a_skipped_evaluate_is_found_by_the_settings_it_reads(project, monkeypatch):
    """When DVC skips evaluate (nothing it reads changed: here only a probe knob did), the pipeline's parent run still
    gets the metrics of the evaluate run made under those settings (``herl.stage_config_hash``)."""
    from flows.pipeline import evaluate_metrics
    from herl_core.config import STAGE_SECTIONS

    cfg = load_params(project / "params.yaml")
    with stage_run(cfg, "evaluate") as ev:
        ev.finish({"ifeval/prompt_strict": 0.25})
    probe_edit = load_params(project / "params.yaml", overrides=["probe.prompts=3"])
    eval_edit = load_params(project / "params.yaml", overrides=["evaluate.limit=3"])
    tags = MlflowClient().get_run(ev.run_id).data.tags
    assert (
        tags["herl.stage_config_hash"]
        == cfg.hash(STAGE_SECTIONS["evaluate"])
        == probe_edit.hash(STAGE_SECTIONS["evaluate"])
    )
    assert probe_edit.hash() != cfg.hash() and eval_edit.hash(STAGE_SECTIONS["evaluate"]) != tags[
        "herl.stage_config_hash"
    ]  # fmt: skip
    for edited, found in ((probe_edit, {"ifeval/prompt_strict": 0.25}), (eval_edit, {})):
        with stage_run(edited, "pipeline") as parent:  # a pipeline whose evaluate child was skipped by DVC
            assert evaluate_metrics(parent.client, parent.run_id, edited) == found


def test_judge_api_key_never_reaches_mlflow(project, monkeypatch, tmp_path_factory, tiny_policy):
    import shutil

    import mlflow

    monkeypatch.setenv("HERL_JUDGE_API_KEY", SECRET)
    cfg = load_params(project / "params.yaml", overrides=["reward.type=judge"])
    shutil.copytree(tiny_policy, project / "models/policy")
    with stage_run(cfg, "train") as tracker:
        tracker.sink.log_metrics({"reward/mean": 0.5}, 0)
        tracker.sink.log_records("experiences", [experience(0)], 0)
        tracker.finish({"steps": 1}, outputs=["params.yaml"])
    client = MlflowClient()
    run = client.get_run(tracker.run_id)
    (output,) = run.outputs.model_outputs
    model = client.get_logged_model(output.model_id)
    texts = [*run.data.params.items(), *run.data.tags.items(), *run.data.metrics.items(), *model.tags.items()]
    dst = Path(client.download_artifacts(tracker.run_id, "", str(tmp_path_factory.mktemp("all"))))
    files = [p for p in dst.rglob("*") if p.is_file()]
    assert len(files) >= 6  # config, summary, records, table, plot, outputs/params.yaml
    logged = Path(mlflow.artifacts.download_artifacts(f"models:/{output.model_id}", dst_path=str(dst / "model")))
    files += [p for p in logged.rglob("*") if p.is_file()]  # MLmodel, requirements, weights, tokenizer
    assert any(p.name == "MLmodel" for p in files)
    blob = "\n".join(f"{k}={v}" for k, v in texts) + "\n".join(p.read_bytes().decode("latin-1") for p in files)
    assert "reward.judge.api_key_env=HERL_JUDGE_API_KEY" in blob  # the search sees the variable's NAME...
    assert SECRET not in blob  # ...and never its value
