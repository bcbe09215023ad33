"""Issue 5 item 3: every input is validated at load; errors name the file, the line and the field; nothing is written.

Inputs: the prompts JSONL (a corpus of malformed files in tests/reliability/malformed/, plus a 50 MB line generated
in tmp), params.yaml (unknown nested keys, wrong types, invalid YAML → exit code 2), model folders that are not
models (never unpickled), and the rollout / hindsight JSONL artifacts.
"""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import pytest

from herl_core.config import Config
from herl_core.io import MAX_LINE_BYTES, DataError, read_jsonl
from herl_core.records import HindsightRecord, RolloutRecord
from herl_core.stages import load_prompts, run_train

CORPUS = Path(__file__).parent / "malformed"

# file → (line, what the message must say after "<file>:<line>: "); every case is a separate file in CORPUS
MALFORMED = {
    "empty_line.jsonl": (2, "empty line"),
    "whitespace_line.jsonl": (3, "empty line"),
    "prompt_wrong_type.jsonl": (2, "field 'prompt': Input should be a valid string"),
    "prompt_empty.jsonl": (1, "field 'prompt': String should have at least 1 character"),
    "rubrics_wrong_type.jsonl": (1, "field 'rubrics': Input should be a valid list"),
    "rubrics_empty.jsonl": (1, "field 'rubrics': List should have at least 1 item"),
    "kwargs_wrong_type.jsonl": (2, "field 'rubrics.0.kwargs': Input should be a valid dictionary"),
    "weight_wrong_type.jsonl": (1, "field 'rubrics.0.weight': Input should be a valid number"),
    "unknown_field.jsonl": (1, "field 'answer': Extra inputs are not permitted"),
    "missing_id.jsonl": (1, "field 'id': Field required"),
    "unknown_constraint.jsonl": (3, "field 'rubrics.1': unknown constraint id 'punctuation:no_semicolon'"),
    "kwargs_unknown_name.jsonl": (1, "field 'rubrics.0': constraint 'keywords:existence': bad kwargs ['words']"),
    "kwargs_bad_value.jsonl": (
        1,
        "field 'rubrics.0': constraint 'length_constraints:number_words': the checker rejects",
    ),
    "kwargs_missing.jsonl": (2, "field 'rubrics.0': constraint 'keywords:existence': kwarg 'keywords' is missing"),
    "kwargs_replaced.jsonl": (1, "field 'rubrics.0': constraint 'keywords:letter_frequency': invalid letter='#'"),
    "duplicate_ids.jsonl": (3, "field 'id': duplicate value 'p1' (first on line 1)"),
    "duplicate_rubric_ids.jsonl": (1, "field 'rubrics': Value error, duplicate rubric ids ['punctuation:no_comma']"),
    "truncated.jsonl": (2, "invalid JSON"),
    "not_an_object.jsonl": (2, "expected a JSON object, got list"),
    "non_utf8.jsonl": (2, "not UTF-8"),
}


def test_the_corpus_is_complete():
    # every file in the corpus has an expectation, and every expectation a file (plus empty.jsonl, tested below)
    assert sorted(p.name for p in CORPUS.glob("*.jsonl")) == sorted([*MALFORMED, "empty.jsonl"])


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_malformed_prompts_name_file_line_and_field(name):
    line, what = MALFORMED[name]
    path = CORPUS / name
    with pytest.raises(DataError) as err:
        load_prompts(path)
    assert str(err.value).startswith(f"{path}:{line}: {what}"), str(err.value)


def test_empty_file(tmp_path):
    with pytest.raises(DataError, match=r"empty\.jsonl: empty file \(expected at least one record\)"):
        load_prompts(CORPUS / "empty.jsonl")


def test_a_50mb_line_is_refused_without_parsing_it(tmp_path):
    path = tmp_path / "huge.jsonl"
    good = (CORPUS / "duplicate_ids.jsonl").read_text().splitlines()[0]
    with path.open("w", encoding="utf-8") as fh:
        fh.write(good + "\n")
        fh.write('{"id": "big", "prompt": "' + "x" * (50 * 1024 * 1024) + '", "rubrics": []}\n')
    assert path.stat().st_size > 50 * 1024 * 1024 > MAX_LINE_BYTES  # 50 MB line vs the 16 MB limit
    with pytest.raises(DataError) as err:
        load_prompts(path)
    assert str(err.value) == f"{path}:2: line longer than {MAX_LINE_BYTES} bytes"


# --------------------------------------------------------------------------------------------------------------------
# the train stage on bad input: an error, and no output folder created


def _outputs(ws: Path) -> list[str]:
    return sorted(p for p in ("models", "reports", "runs") if (ws / p).exists())


@pytest.mark.integration
def test_herl_train_on_bad_prompts_exits_1_and_writes_nothing(tmp_path, herl):
    name, (line, what) = "unknown_constraint.jsonl", MALFORMED["unknown_constraint.jsonl"]
    ws = herl.make_workspace(tmp_path / "ws")
    (ws / "data" / "prompts.jsonl").write_bytes((CORPUS / name).read_bytes())
    proc = herl.run(ws, "train", "--params", "params.yaml")
    assert proc.returncode == 1, proc.stderr[-3000:]
    message = " ".join(proc.stderr.split())  # rich may wrap long lines
    assert f"data/prompts.jsonl:{line}: {what}" in message, message[-2000:]
    assert "Traceback" not in proc.stderr
    assert _outputs(ws) == [] and os.listdir(ws / "data") == ["prompts.jsonl"]
    assert not list(ws.glob("mlruns*")) and not (ws / "mlartifacts").exists()  # not even a FAILED MLflow run


def test_run_train_on_non_utf8_prompts_writes_nothing(tmp_path, herl):
    ws = herl.make_workspace(tmp_path / "ws")
    (ws / "data" / "prompts.jsonl").write_bytes((CORPUS / "non_utf8.jsonl").read_bytes())
    with pytest.raises(DataError, match=r"prompts.jsonl:2: not UTF-8"):
        run_train(_cfg(ws, prompts_per_step=2, mini_batch_prompts=2))
    assert _outputs(ws) == []


def _cfg(ws: Path, **train) -> Config:
    return Config.model_validate(
        {
            "model": {"name_or_path": "tiny"},
            "train": {
                "data": str(ws / "data/prompts.jsonl"), "out_dir": str(ws / "models/policy"),
                "checkpoint_dir": str(ws / "runs/ckpt"), "report_dir": str(ws / "reports/train"), **train,
            },
        }
    )  # fmt: skip


def test_too_few_prompts_for_a_step_is_an_error_before_anything_is_written(tmp_path, herl):
    ws = herl.make_workspace(tmp_path / "ws")  # 4 prompts
    with pytest.raises(ValueError, match=r"train.prompts_per_step \(5\) exceeds the 4 training prompts"):
        run_train(_cfg(ws, prompts_per_step=5, mini_batch_prompts=5))
    assert _outputs(ws) == []


# --------------------------------------------------------------------------------------------------------------------
# params.yaml

PARAMS_CASES = {
    # unknown nested key: line 6 holds "stpes"
    "unknown_nested_key": (
        "profile: tiny\nmodel:\n  name_or_path: tiny\ntrain:\n  steps: 2\n  stpes: 3\nprofiles:\n  tiny: {}\n",
        "params.yaml:6: train.stpes: Extra inputs are not permitted (got 3)",
    ),
    # wrong type: line 5 holds "steps: many"
    "wrong_type": (
        "profile: tiny\nmodel:\n  name_or_path: tiny\ntrain:\n  steps: many\nprofiles:\n  tiny: {}\n",
        "params.yaml:5: train.steps: Input should be a valid integer",
    ),
    # a misspelt key inside a profile is reported at its line in the profile (line 7)
    "unknown_key_in_profile": (
        "profile: tiny\nmodel:\n  name_or_path: tiny\nprofiles:\n  tiny:\n    rollout:\n      nn: 4\n",
        "params.yaml:7: rollout.nn: Extra inputs are not permitted (got 4)",
    ),
    # a tab cannot indent YAML: the parser stops on line 3
    "invalid_yaml": (
        "train:\n  steps: 2\n\tlr: 0.001\n",
        "params.yaml:3: invalid YAML: found character '\\t' that cannot start any token",
    ),
    # an unknown profile is named with the known ones
    "unknown_profile": (
        "profile: huge\nprofiles:\n  tiny: {}\n",
        "params.yaml: unknown profile 'huge'; known: ['tiny']",
    ),
}


@pytest.mark.parametrize("case", sorted(PARAMS_CASES))
def test_bad_params_exit_2_with_file_line_field(tmp_path, monkeypatch, herl, case):
    from typer.testing import CliRunner

    from flows.cli import app

    text, expected = PARAMS_CASES[case]
    ws = herl.make_workspace(tmp_path / "ws", params=text)
    monkeypatch.chdir(ws)
    result = CliRunner().invoke(app, ["train", "--params", "params.yaml"])
    assert result.exit_code == 2, result.output
    assert expected in " ".join(result.output.split()), result.output
    assert _outputs(ws) == []


@pytest.mark.integration
def test_herl_train_with_unknown_key_exits_2_as_a_process(tmp_path, herl):
    text, expected = PARAMS_CASES["unknown_nested_key"]
    ws = herl.make_workspace(tmp_path / "ws", params=text)
    proc = herl.run(ws, "train", "--params", "params.yaml")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert expected in " ".join(proc.stderr.split()) and "Traceback" not in proc.stderr
    assert _outputs(ws) == []


# --------------------------------------------------------------------------------------------------------------------
# model folders that are not models; pickle is never loaded


class Boom:
    """Unpickling this creates a sentinel file: proof that a pickle was loaded."""

    sentinel = ""

    def __reduce__(self):
        return (open, (self.sentinel, "w"))


@pytest.fixture
def no_torch_load(monkeypatch):
    import torch

    def refuse(*args, **kwargs):
        raise AssertionError(f"torch.load called on {args[:1]}: a pickle would be loaded")

    monkeypatch.setattr(torch, "load", refuse)


def _config_json(folder: Path) -> None:
    from transformers import LlamaConfig

    sizes = {"hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2}
    LlamaConfig(vocab_size=32, **sizes).save_pretrained(folder)


@pytest.mark.parametrize(
    "kind, message",
    [
        ("empty", "is not a model folder (no config.json)"),
        ("config_only", "has no safetensors weights (expected model.safetensors)"),
        ("pickle_only", "has no safetensors weights (expected model.safetensors; found ['pytorch_model.bin'], but "
                        "pickle files are never loaded)"),
    ],
)  # fmt: skip
def test_a_folder_that_is_not_a_model_is_a_clear_error_and_never_unpickled(tmp_path, no_torch_load, kind, message):
    from herl_core.config import ModelConfig
    from herl_core.models import ModelSourceError, load_policy

    folder = tmp_path / "model"
    folder.mkdir()
    sentinel = tmp_path / "unpickled"
    if kind != "empty":
        _config_json(folder)
    if kind == "pickle_only":
        Boom.sentinel = str(sentinel)
        (folder / "pytorch_model.bin").write_bytes(pickle.dumps(Boom()))
    with pytest.raises(ModelSourceError) as err:
        load_policy(ModelConfig(name_or_path=str(folder)))
    assert str(err.value) == f"model.name_or_path: {folder} {message}"
    assert not sentinel.exists()


def test_train_with_a_pickle_model_folder_writes_nothing(tmp_path, herl, no_torch_load):
    from herl_core.models import ModelSourceError

    ws = herl.make_workspace(tmp_path / "ws")
    folder = ws / "pickled"
    folder.mkdir()
    _config_json(folder)
    Boom.sentinel = str(tmp_path / "unpickled")
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps(Boom()))
    cfg = _cfg(ws, prompts_per_step=2, mini_batch_prompts=2)
    cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"name_or_path": str(folder)})})
    with pytest.raises(ModelSourceError, match="pickle files are never loaded"):
        run_train(cfg)
    assert not Path(Boom.sentinel).exists() and _outputs(ws) == []


# --------------------------------------------------------------------------------------------------------------------
# rollout / hindsight artifacts

REWARD = {"score": 0.5, "dense": 0.5, "verdicts": [{"rubric_id": "a", "description": "d", "passed": True}]}
ROLLOUT = {"prompt_id": "p1", "sample_index": 0, "response": "hi", "reward": REWARD, "n_tokens": 2, "step": 0}
HINDSIGHT = {
    "step": 0, "prompt_id": "p1", "draft_index": 0, "draft": "hi", "draft_score": 0.0, "draft_dense": 0.0,
    "verdicts": [{"rubric_id": "a", "description": "d", "passed": False}], "hindsight_prompt": "h", "rewrite": "HI",
    "rewrite_score": 1.0, "rewrite_dense": 1.0, "bonus": 0.05, "shaped_score": 0.05, "group_best": 0.0,
    "selected": True, "slot": 1,
}  # fmt: skip
MAYBE = {"rubric_id": "b", "description": "e", "passed": "maybe"}


@pytest.mark.parametrize(
    "model, good, bad, what",
    [
        (RolloutRecord, ROLLOUT, {**ROLLOUT, "sample_index": -1}, "field 'sample_index': Input should be greater"),
        (RolloutRecord, ROLLOUT, {**ROLLOUT, "reward": {**REWARD, "failed": True}},
         "field 'reward': Value error, a failed reward must have score=None"),
        (RolloutRecord, ROLLOUT, {**ROLLOUT, "reward": {**REWARD, "score": None}},
         "field 'reward': Value error, a reward that did not fail needs a score"),
        (RolloutRecord, ROLLOUT, {**ROLLOUT, "n_tokens": "2 tokens"},
         "field 'n_tokens': Input should be a valid integer"),
        (HindsightRecord, HINDSIGHT, {k: v for k, v in HINDSIGHT.items() if k != "rewrite"},
         "field 'rewrite': Field required"),
        (HindsightRecord, HINDSIGHT, {**HINDSIGHT, "verdicts": [*HINDSIGHT["verdicts"], {**MAYBE}]},
         "field 'verdicts.1.passed': Input should be a valid boolean"),
        (HindsightRecord, HINDSIGHT, {**HINDSIGHT, "bonus": "NaN-ish"},
         "field 'bonus': Input should be a valid number"),
    ],
)  # fmt: skip
def test_bad_rollout_and_hindsight_rows_name_line_and_field(tmp_path, model, good, bad, what):
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps(good) + "\n" + json.dumps(good) + "\n", encoding="utf-8")
    assert len(read_jsonl(path, model, unique_field=None)) == 2  # the good rows load
    path.write_text(path.read_text() + json.dumps(bad) + "\n", encoding="utf-8")
    with pytest.raises(DataError) as err:
        read_jsonl(path, model, unique_field=None)
    assert str(err.value).startswith(f"{path}:3: {what}"), str(err.value)
