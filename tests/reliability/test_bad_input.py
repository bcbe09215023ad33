"""Every input is validated at load; errors name the file, the line and the field; nothing is written.

Inputs: the prompts JSONL (a corpus of malformed files in tests/reliability/malformed/, plus a 50 MB line generated
in tmp), params.yaml (unknown nested keys, wrong types, invalid YAML → exit code 2), model sources that cannot load
(folders that are not models, never unpickled; broken weights, JSON, shards, tokenizers; GGUF files that are missing,
not GGUF or damaged: ``MODEL_CASES``, built in tmp from the tiny model), and the rollout / hindsight JSONL artifacts.
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
    # a raw NUL byte: "Say hi" ends at column 30, the NUL is column 31
    "nul_byte.jsonl": (
        2,
        "invalid JSON at column 31: raw control character U+0000 (NUL) inside a string; write it escaped, as \\u0000",
    ),
    # training on the held-out benchmark's constraints contaminates its evaluation
    "ifbench_constraint.jsonl": (
        2,
        "field 'rubrics.1': constraint 'count:numbers' is an IFBench instruction id: IFBench is held out for "
        "evaluation, and training on its constraints contaminates its scores (train.allow_ifbench_constraints: true "
        "trains on it anyway)",
    ),
}


# files that load_prompts accepts but a stage refuses once the prompts are encoded: file → (line, prompt id)
TOO_LONG = {"prompt_too_long.jsonl": (2, "long")}
SHORT_PROMPTS = "  n: 4\n  max_prompt_tokens: 64\n"  # the workspace's rollout section with a 64-token limit


def test_the_corpus_is_complete():
    # every file in the corpus has an expectation, and every expectation a file (plus empty.jsonl, tested below)
    assert sorted(p.name for p in CORPUS.glob("*.jsonl")) == sorted([*MALFORMED, *TOO_LONG, "empty.jsonl"])


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


@pytest.mark.parametrize("name", ["non_utf8.jsonl", "nul_byte.jsonl", "ifbench_constraint.jsonl"])
def test_run_train_on_bad_prompts_writes_nothing(tmp_path, herl, name):
    line, what = MALFORMED[name]
    ws = herl.make_workspace(tmp_path / "ws")
    path = ws / "data" / "prompts.jsonl"
    path.write_bytes((CORPUS / name).read_bytes())
    with pytest.raises(DataError) as err:
        run_train(_cfg(ws, prompts_per_step=2, mini_batch_prompts=2))
    assert str(err.value).startswith(f"{path}:{line}: {what}"), str(err.value)
    assert _outputs(ws) == [] and os.listdir(ws / "data") == ["prompts.jsonl"]


def _too_long_message(path: Path, name: str) -> str:
    """What the refusal of ``name`` says: the file, the line, the prompt id and its encoded length (counted here with
    the tokenizer the tiny model uses and its chat template, as the rollout encodes it)."""
    from herl_core.config import ModelConfig
    from herl_core.models import encode_prompt, load_tokenizer

    line, prompt_id = TOO_LONG[name]
    row = json.loads((CORPUS / name).read_text().splitlines()[line - 1])
    n = len(encode_prompt(load_tokenizer(ModelConfig(name_or_path="tiny")), row["prompt"]))
    assert n > 64 and row["id"] == prompt_id
    return (
        f"{path}:{line}: field 'prompt': prompt {prompt_id!r} is {n} tokens once encoded, longer than "
        "rollout.max_prompt_tokens (64)"
    )


@pytest.mark.parametrize("name", sorted(TOO_LONG))
def test_an_over_long_prompt_is_refused_by_file_and_line_before_anything_is_written(tmp_path, herl, name):
    from herl_core.stages import check_inputs

    ws = herl.make_workspace(tmp_path / "ws")
    path = ws / "data" / "prompts.jsonl"
    path.write_bytes((CORPUS / name).read_bytes())
    cfg = _cfg(ws, prompts_per_step=2, mini_batch_prompts=2)
    cfg = cfg.model_copy(update={"rollout": cfg.rollout.model_copy(update={"max_prompt_tokens": 64})})
    expected = _too_long_message(path, name)
    for stages in (["train"], ["rollout"], ["hindsight"]):  # the check the commands run before MLflow
        with pytest.raises(DataError) as err:
            check_inputs(cfg, stages)
        assert str(err.value).startswith(expected), str(err.value)
    with pytest.raises(DataError) as err:  # and the train stage itself
        run_train(cfg)
    assert str(err.value).startswith(expected) and "rollout.max_prompt_tokens" in str(err.value)
    assert _outputs(ws) == [] and os.listdir(ws / "data") == ["prompts.jsonl"]


def test_an_over_long_validation_prompt_is_refused_by_its_file_and_line_before_anything_is_written(tmp_path, herl):
    """With validation on (``train.eval_every``), the validation prompts are checked as the training prompts are: an
    over-long one would otherwise stop the run at its first validation point, after the run was opened."""
    from herl_core.stages import check_inputs

    name = "prompt_too_long.jsonl"
    ws = herl.make_workspace(tmp_path / "ws")  # its data/prompts.jsonl: 4 short prompts
    val = ws / "data" / "val.jsonl"
    val.write_bytes((CORPUS / name).read_bytes())
    cfg = _cfg(ws, prompts_per_step=2, mini_batch_prompts=2, eval_every=1, eval_set=str(val))
    cfg = cfg.model_copy(update={"rollout": cfg.rollout.model_copy(update={"max_prompt_tokens": 64})})
    expected = _too_long_message(val, name)
    check_inputs(cfg.model_copy(update={"train": cfg.train.model_copy(update={"eval_prompts": 1})}), ["train"])
    for run in (lambda: check_inputs(cfg, ["train"]), lambda: run_train(cfg)):  # the command's check, the stage
        with pytest.raises(DataError) as err:
            run()
        assert str(err.value).startswith(expected), str(err.value)
    assert _outputs(ws) == [] and sorted(os.listdir(ws / "data")) == ["prompts.jsonl", "val.jsonl"]


@pytest.mark.integration
@pytest.mark.parametrize("stage", ["train", "rollout"])
def test_herl_on_an_over_long_prompt_exits_1_and_writes_nothing_not_even_a_failed_run(tmp_path, herl, stage):
    name = "prompt_too_long.jsonl"
    ws = herl.make_workspace(tmp_path / "ws", params=herl.params.replace("  n: 4\n", SHORT_PROMPTS, 1))
    (ws / "data" / "prompts.jsonl").write_bytes((CORPUS / name).read_bytes())
    proc = herl.run(ws, stage, "--params", "params.yaml")
    assert proc.returncode == 1, proc.stderr[-3000:]
    message = " ".join(proc.stderr.split())
    assert _too_long_message(Path("data/prompts.jsonl"), name) in message, message[-2000:]
    assert "Traceback" not in proc.stderr
    assert _outputs(ws) == [] and os.listdir(ws / "data") == ["prompts.jsonl"]
    assert not list(ws.glob("mlruns*")) and not (ws / "mlartifacts").exists()  # not even a FAILED MLflow run


def test_ifbench_constraints_load_when_the_user_opts_in(tmp_path, herl):
    ws = herl.make_workspace(tmp_path / "ws")
    path = ws / "data" / "prompts.jsonl"
    path.write_bytes((CORPUS / "ifbench_constraint.jsonl").read_bytes())
    rows = load_prompts(path, allow_ifbench=True)
    assert any(r.id.startswith("count:") for row in rows for r in row.rubrics)


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


# params files of the corpus (malformed/params/) → what the message says; each file's comment says what is wrong
MALFORMED_PARAMS = {
    # the value's own line, not the profile's section header
    "base_value_under_a_profile.yaml": "params.yaml:8: hindsight.bonus_alpha: Input should be greater than or equal "
    "to 0 (got -3)",
    # the profile's line, and which profile set it over which base line
    "profile_overrides_the_base.yaml": "params.yaml:11: hindsight.bonus_alpha: Input should be greater than or equal "
    "to 0 (got -3); set in profile 'tiny', over the base value at line 6",
    "threshold_above_1.yaml": "params.yaml:6: hindsight.threshold: Input should be less than or equal to 1 (got 2)",
    "duplicate_key.yaml": "params.yaml:8: train.steps: duplicate key (first at line 6; YAML would keep only the last "
    "value)",
    "duplicate_key_in_a_profile.yaml": "params.yaml:11: profiles.tiny.rollout: duplicate key (first at line 7; YAML "
    "would keep only the last value)",
}


def test_the_params_corpus_is_complete():
    assert sorted(p.name for p in (CORPUS / "params").glob("*.yaml")) == sorted(MALFORMED_PARAMS)


@pytest.mark.parametrize("name", sorted(MALFORMED_PARAMS))
def test_malformed_params_exit_2_naming_the_line_of_the_value(tmp_path, monkeypatch, herl, name):
    from typer.testing import CliRunner

    from flows.cli import app

    ws = herl.make_workspace(tmp_path / "ws", params=(CORPUS / "params" / name).read_text())
    monkeypatch.chdir(ws)
    result = CliRunner().invoke(app, ["train", "--params", "params.yaml"])
    assert result.exit_code == 2, result.output
    assert MALFORMED_PARAMS[name] in " ".join(result.output.split()), result.output
    assert _outputs(ws) == [] and not list(ws.glob("mlruns*"))


@pytest.mark.parametrize("profile", ["tiny", "cpu"])
def test_a_bad_base_value_of_the_project_params_is_reported_at_its_line_under_every_profile(tmp_path, profile):
    """The project's own params.yaml: a value written in the base section is reported at its line whichever profile
    is active (not at the profile's `hindsight:` header)."""
    from herl_core.config import ConfigError, load_params

    text = (Path(__file__).resolve().parents[2] / "params.yaml").read_text()
    assert text.count("  bonus_alpha: 0.05\n") == 1
    line = text[: text.index("  bonus_alpha: 0.05\n")].count("\n") + 1
    path = tmp_path / "params.yaml"
    path.write_text(text.replace("  bonus_alpha: 0.05\n", "  bonus_alpha: -3\n"))
    with pytest.raises(ConfigError) as err:
        load_params(path, profile=profile)
    expected = f"{path}:{line}: hindsight.bonus_alpha: Input should be greater than or equal to 0 (got -3)"
    assert expected in str(err.value)
    assert "set in profile" not in str(err.value)


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
# model sources that cannot load: one error naming the folder and the file, before anything is written


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> Path:
    """The tiny model (2 layers, width 32) saved as a herl checkpoint folder: config.json, model.safetensors (its
    header ~2 KB), generation_config.json, tokenizer.json, tokenizer_config.json, chat_template.jinja."""
    from herl_core.config import ModelConfig, TinyModelConfig
    from herl_core.models import load_policy, save_checkpoint_weights

    tiny = TinyModelConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=32)
    model, tok = load_policy(ModelConfig(name_or_path="tiny", tiny=tiny))
    return save_checkpoint_weights(model, tok, tmp_path_factory.mktemp("tiny") / "policy")


def _truncate(n: int):
    def cut(folder: Path) -> None:
        weights = folder / "model.safetensors"
        data = weights.read_bytes()
        weights.write_bytes(data[:n])

    return cut


def _header_bytes(folder: Path) -> int:
    """8 + the header length the file's first 8 bytes give (little-endian, the safetensors layout)."""
    return 8 + int.from_bytes((folder / "model.safetensors").read_bytes()[:8], "little")


def _sharded(folder: Path) -> None:
    weights = folder / "model.safetensors"
    weights.rename(folder / "model-00001-of-00002.safetensors")
    index = {"weight_map": {"model.embed_tokens.weight": "model-00001-of-00002.safetensors",
                            "model.norm.weight": "model-00002-of-00002.safetensors"}}  # fmt: skip
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))


def _smollm2_gguf_head(n: int):
    def write(path: Path) -> None:
        from herl_core.models import GGUF_FILE, gguf_dir

        with open(gguf_dir() / GGUF_FILE, "rb") as fh:
            path.write_bytes(fh.read(n))

    return write


# case → (what to do to a copy of the tiny folder, or "file" / ("gguf", make the file) for the source to name instead;
# the message, with {folder} / {gguf} / {size} / {cut} / {header} / {v} filled in; model settings besides the source)
MODEL_CASES = {
    # the user's case: model.safetensors cut to 1000 bytes, inside its header
    "weights_cut_to_1000_bytes": (_truncate(1000), "model.name_or_path: {folder}/model.safetensors is truncated: "
                                                   "1,000 bytes, but its header alone takes {header:,}", {}),
    "weights_cut_in_the_tensors": (_truncate(-1000), "model.name_or_path: {folder}/model.safetensors is truncated: "
                                                     "{cut:,} bytes, but its header describes {size:,}", {}),
    "weights_empty": (_truncate(0), "model.name_or_path: {folder}/model.safetensors is empty or truncated (0 bytes; a "
                                    "safetensors file starts with 8 bytes giving its header length)", {}),
    "weights_not_safetensors": (lambda f: (f / "model.safetensors").write_text("version https://git-lfs...\n"),
                                "model.name_or_path: {folder}/model.safetensors is not a safetensors file (its first "
                                "8 bytes are not a header length)", {}),
    "config_trailing_comma": (lambda f: (f / "config.json").write_text('{\n  "model_type": "llama",\n}\n'),
                              "model.name_or_path: {folder}/config.json: invalid JSON at line 3, column 1: expected a "
                              "property name in double quotes, found '}}'", {}),
    "tokenizer_json_cut": (lambda f: (f / "tokenizer.json").write_text('{"version": "1.0", "model": {'),
                           "model.name_or_path: {folder}/tokenizer.json: invalid JSON at line 1, column 30: expected "
                           "a property name in double quotes, found the end of the line", {}),
    "shard_missing": (_sharded, "model.name_or_path: {folder}/model.safetensors.index.json names weight files that "
                                "are missing: ['model-00002-of-00002.safetensors']", {}),
    "no_tokenizer": (lambda f: [(f / n).unlink() for n in ("tokenizer.json", "tokenizer_config.json")],
                     "model.name_or_path: {folder} has no tokenizer (none of tokenizer.json, tokenizer.model, "
                     "vocab.json, tokenizer_config.json)", {}),
    "no_chat_template_but_chat": (lambda f: (f / "chat_template.jinja").unlink(),
                                  "model.prompt_format: 'chat', but the tokenizer of {folder} has no chat template. "
                                  "Set model.prompt_format: plain", {"prompt_format": "chat"}),
    "a_file_not_a_folder": ("file", "model.name_or_path: {folder}/config.json is a file, not a model folder: give the "
                                    "folder that holds config.json and the weights, or a .gguf file", {}),
    "gguf_missing": (("gguf", None), "model.name_or_path: GGUF file {gguf} does not exist", {}),
    "gguf_not_gguf": (("gguf", lambda p: p.write_text("<html>404</html>")),
                      "model.name_or_path: {gguf} is not a GGUF file (it starts with b'<htm'; a GGUF file starts with "
                      "b'GGUF')", {}),
    "gguf_cut_to_1000_bytes": (("gguf", _smollm2_gguf_head(1000)),
                               "model.name_or_path: transformers {v} could not convert the GGUF file {gguf} (1,000 "
                               "bytes): ", {}),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(MODEL_CASES))
def test_a_broken_model_source_is_one_clear_error_and_nothing_is_written(tmp_path, herl, tiny_folder, case):
    import shutil

    import transformers

    from herl_core.models import ModelSourceError, check_model_source

    how, message, settings = MODEL_CASES[case]
    ws = herl.make_workspace(tmp_path / "ws")
    folder = ws / "policy"
    shutil.copytree(tiny_folder, folder)
    size = (folder / "model.safetensors").stat().st_size
    values = {"folder": folder, "gguf": ws / "model.gguf", "size": size, "cut": size - 1000,
              "header": _header_bytes(folder), "v": transformers.__version__}  # fmt: skip
    source = folder
    if how == "file":
        source = folder / "config.json"
    elif isinstance(how, tuple):
        source = ws / "model.gguf"
        if how[1] is not None:
            how[1](source)
    else:
        how(folder)
    expected = message.format(**values)
    cfg = _cfg(ws, prompts_per_step=2, mini_batch_prompts=2)
    update = {"name_or_path": str(source), "cache_dir": str(tmp_path / "cache"), **settings}
    cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update=update)})
    with pytest.raises(ModelSourceError) as err:  # the check a stage runs before it opens anything
        check_model_source(cfg.model)
    assert str(err.value).startswith(expected), str(err.value)
    with pytest.raises(ModelSourceError) as err:  # and the train stage itself
        run_train(cfg)
    assert str(err.value).startswith(expected) and len(str(err.value).splitlines()) == 1, str(err.value)
    assert _outputs(ws) == []
    cache = tmp_path / "cache" / "gguf"  # no conversion, whole or half
    assert not cache.exists() or [p.name for p in cache.iterdir() if not p.name.endswith(".lock")] in ([], [".sha256"])


def _broken_folder(ws: Path, tiny_folder: Path, case: str) -> tuple[Path, str]:
    """An empty folder or the tiny model with its weights cut to 1000 bytes, and what the error says."""
    import shutil

    folder = ws / "policy"
    if case == "empty":
        folder.mkdir()
        return folder, f"model.name_or_path: {folder} is not a model folder (no config.json)"
    shutil.copytree(tiny_folder, folder)
    _truncate(1000)(folder)
    return folder, f"model.name_or_path: {folder}/model.safetensors is truncated: 1,000 bytes"


@pytest.mark.integration
@pytest.mark.parametrize("case", ["empty", "weights_cut_to_1000_bytes"])
def test_herl_train_on_a_broken_model_folder_exits_1_and_opens_no_mlflow_run(tmp_path, herl, tiny_folder, case):
    ws = herl.make_workspace(tmp_path / "ws")
    folder, expected = _broken_folder(ws, tiny_folder, case)
    (ws / "params.yaml").write_text(herl.params.replace("name_or_path: tiny", f"name_or_path: {folder}", 1))
    proc = herl.run(ws, "train", "--params", "params.yaml")
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert expected in " ".join(proc.stderr.split()) and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert _outputs(ws) == [] and not list(ws.glob("mlruns*")) and not (ws / "mlartifacts").exists()


@pytest.mark.parametrize("case", ["empty", "weights_cut_to_1000_bytes"])
def test_herl_pipeline_on_a_broken_model_folder_exits_1_before_the_parent_run(
    tmp_path, monkeypatch, herl, tiny_folder, case
):
    """The pipeline checks what its stages read from outside before it opens the MLflow parent run (and before it
    starts a Prefect server): a broken model folder leaves no FAILED parent run behind."""
    from typer.testing import CliRunner

    from flows.cli import app

    ws = herl.make_workspace(tmp_path / "ws")
    folder, expected = _broken_folder(ws, tiny_folder, case)
    (ws / "params.yaml").write_text(herl.params.replace("name_or_path: tiny", f"name_or_path: {folder}", 1))
    monkeypatch.chdir(ws)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{ws / 'mlruns.db'}")
    result = CliRunner().invoke(app, ["pipeline", "--params", "params.yaml"])
    assert result.exit_code == 1, result.output
    assert expected in " ".join(result.output.split()), result.output
    assert _outputs(ws) == [] and not list(ws.glob("mlruns*")) and not (ws / "mlartifacts").exists()


def test_the_tiny_folder_itself_passes_the_check(tiny_folder):
    from herl_core.config import ModelConfig
    from herl_core.models import check_model_source

    assert check_model_source(ModelConfig(name_or_path=str(tiny_folder))) == tiny_folder


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


# the hindsight stage (and its control) on a bad rollouts file: an error naming the line, and nothing written

GOOD_ROLLOUT = {**ROLLOUT, "step": None}


@pytest.mark.parametrize(
    "rows, line, what",
    [
        ([GOOD_ROLLOUT, {**GOOD_ROLLOUT, "prompt_id": "nope", "sample_index": 0}], 2,
         "field 'prompt_id': 'nope' is not in the prompt file"),
        ([GOOD_ROLLOUT, {**GOOD_ROLLOUT, "sample_index": 2}], 2,
         "field 'sample_index': expected 1 for prompt 'p1'"),
        ([GOOD_ROLLOUT, {**GOOD_ROLLOUT, "n_tokens": -1}], 2, "field 'n_tokens': Input should be greater"),
    ],
)  # fmt: skip
def test_herl_hindsight_on_bad_rollouts_exits_1_and_writes_nothing(tmp_path, herl, monkeypatch, rows, line, what):
    from typer.testing import CliRunner

    from flows.cli import app

    ws = herl.make_workspace(tmp_path / "ws")
    rollouts = ws / "data" / "rollout" / "rollouts.jsonl"
    rollouts.parent.mkdir(parents=True)
    rollouts.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    monkeypatch.chdir(ws)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{ws / 'mlruns.db'}")
    result = CliRunner().invoke(app, ["hindsight", "--set", "probe.control=true"])
    assert result.exit_code == 1, result.output
    message = " ".join(result.output.split())  # rich may wrap long lines
    assert f"data/rollout/rollouts.jsonl:{line}: {what}" in message, message
    assert sorted(os.listdir(ws / "data")) == ["prompts.jsonl", "rollout"] and os.listdir(ws / "data/rollout") == [
        "rollouts.jsonl"
    ]
    assert not list(ws.glob("mlruns*")) and not (ws / "mlartifacts").exists()  # not even a FAILED MLflow run
