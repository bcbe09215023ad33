"""Resume checkpoints: HF safetensors weights + optimizer + RNG + step + data cursor, written atomically.

Layout of ``<checkpoint_dir>/step-000042/``::

    config.json, model.safetensors, tokenizer files   # loads with AutoModelForCausalLM.from_pretrained
    optimizer.safetensors                              # AdamW moments and step counts, keyed "<param idx>.<name>"
    trainer_state.json                                 # step, data cursor, RNG states, param groups, extras,
                                                       # the fp16 loss scaler's state (fp16 compute only)
    adapter/adapter_config.json, adapter_model.safetensors   # LoRA runs only: the adapters, peft layout

A LoRA model (``model.lora.enabled``) writes ``model.safetensors`` merged (a plain model, as every checkpoint) plus its
adapters; resume loads the adapters into the live peft model (its base weights come from ``load_policy``) and checks
that the merged weights then equal the checkpoint's, so a changed base model is an error, not a silent mix.
The adapters sit in a subfolder: an ``adapter_config.json`` at the top would make ``from_pretrained`` load them.

Weights and optimizer state are the master ones (``train.master_dtype``, fp32 by default; herl_core/precision.py),
so a run computing in bf16 resumes exactly; only the final policy folder is written in the compute dtype.

Nothing is pickled: tensors go to safetensors, everything else to JSON. A folder appears whole or not at all
(temp folder + rename), so a crash mid-save leaves the previous checkpoint as the latest.

A save killed midway leaves its temp folders in the root: ``.step-000003.<pid>.<random>.tmp`` and, when the kill hit
the weight write, the nested ``..step-000003.<pid>.<random>.tmp.<pid>.<random>.tmp`` (hundreds of MB for SmolLM2).
``sweep_leftovers`` removes every stale one (their writer is gone: ``herl_core.io.is_stale_temp``), whatever step it
was for; it runs at resume (``Trainer.resume``) and before and after every save, so a completed run leaves none.
"""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from herl_core.io import atomic_dir, sweep_stale_temps
from herl_core.models import is_lora, merged_state_dict, save_checkpoint_weights

STATE_FILE = "trainer_state.json"
ADAPTER_DIR = "adapter"
ADAPTER_FILE = "adapter_model.safetensors"


@dataclass
class TrainerState:
    """What, besides weights and optimizer, a resumed run needs to continue exactly."""

    step: int = 0
    epoch: int = 0
    position: int = 0
    consecutive_nonfinite: int = 0
    nonfinite_total: int = 0
    extras: dict = field(default_factory=dict)
    """Free-form (e.g. the MLflow run id to re-attach to)."""


def _optimizer_tensors(
    optimizer: torch.optim.Optimizer, sd: dict | None = None
) -> tuple[dict[str, torch.Tensor], list[dict]]:
    sd = sd if sd is not None else optimizer.state_dict()
    tensors = {}
    for idx, state in sd["state"].items():
        for name, value in state.items():
            t = value if torch.is_tensor(value) else torch.tensor(value)
            tensors[f"{idx}.{name}"] = t.detach().cpu().contiguous()
    return tensors, sd["param_groups"]


def save_checkpoint(
    root: str | Path,
    model,
    tokenizer,
    optimizer: torch.optim.Optimizer,
    state: TrainerState,
    keep: int = 1,
    *,
    weights: dict[str, torch.Tensor] | None = None,
    optimizer_state: dict | None = None,
    scaler=None,
) -> Path:
    """Write ``<root>/step-<state.step>`` atomically and delete all but the newest ``keep`` checkpoints.
    ``weights`` / ``optimizer_state``: whole state dicts to write instead of the live model's / optimizer's (an
    FSDP-sharded model's, gathered by ``DataParallel.full_model_state`` / ``full_optimizer_state``). ``scaler``: the
    fp16 run's ``torch.amp.GradScaler``, whose scale and growth counter are stored too."""
    root = Path(root)
    target = root / f"step-{state.step:06d}"
    sweep_leftovers(root)  # a killed save's temp folders go before a new one takes the disk space
    with atomic_dir(target) as tmp:
        save_checkpoint_weights(model, tokenizer, tmp, state_dict=weights)
        if is_lora(model):
            save_adapter(model, tmp / ADAPTER_DIR)
        tensors, groups = _optimizer_tensors(optimizer, optimizer_state)
        save_file(tensors, str(tmp / "optimizer.safetensors"))
        save_file({"torch": torch.get_rng_state()}, str(tmp / "rng.safetensors"))
        py_state = random.getstate()
        payload = {
            "trainer": asdict(state),
            "param_groups": groups,
            "python_random": [py_state[0], list(py_state[1]), py_state[2]],
        }
        if scaler is not None:
            payload["grad_scaler"] = {k: float(v) for k, v in scaler.state_dict().items()}
        (tmp / STATE_FILE).write_text(json.dumps(payload, indent=2), encoding="utf-8")
    for old in list_checkpoints(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    sweep_leftovers(root)
    return target


def sweep_leftovers(root: str | Path) -> list[Path]:
    """Remove the temp folders that killed saves left in the checkpoint root (never those of a live writer:
    ``herl_core.io.is_stale_temp``); returns what was removed."""
    return sweep_stale_temps(root)


def list_checkpoints(root: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first (a folder counts only if it holds its state file)."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step-*") if p.is_dir() and (p / STATE_FILE).is_file())


def latest_checkpoint(root: str | Path) -> Path | None:
    found = list_checkpoints(root)
    return found[-1] if found else None


def save_adapter(model, folder: Path) -> None:
    """The LoRA adapters of a peft model in peft's layout (``PeftModel.from_pretrained(base, folder)`` loads them)."""
    from peft import get_peft_model_state_dict

    folder.mkdir(parents=True, exist_ok=True)
    model.peft_config[model.active_adapter].save_pretrained(str(folder))
    state = get_peft_model_state_dict(model, save_embedding_layers=False)  # "auto" would query the hub
    save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(folder / ADAPTER_FILE))


def load_adapter(model, folder: str | Path) -> None:
    """Restore the adapters of ``<folder>/adapter`` into a live peft model, then check the merged weights against
    ``<folder>/model.safetensors`` (dtype-aware ``torch.testing.assert_close`` tolerances)."""
    from peft import set_peft_model_state_dict

    folder = Path(folder)
    if not (folder / ADAPTER_DIR / ADAPTER_FILE).is_file():
        raise ValueError(f"{folder}: not a LoRA checkpoint (no {ADAPTER_DIR}/{ADAPTER_FILE}) but model.lora is on")
    result = set_peft_model_state_dict(model, load_file(str(folder / ADAPTER_DIR / ADAPTER_FILE)))
    missing = [k for k in result.missing_keys if ".lora_" in k]
    if missing or result.unexpected_keys:
        raise ValueError(f"{folder}: adapters do not match the model (missing {missing}, "
                         f"unexpected {result.unexpected_keys})")  # fmt: skip
    saved, merged = load_file(str(folder / "model.safetensors")), merged_state_dict(model)
    for key, value in saved.items():
        try:
            torch.testing.assert_close(merged[key].detach().cpu(), value)
        except (KeyError, AssertionError) as exc:
            raise ValueError(f"{folder}: base model differs from the checkpoint's at {key}") from exc


def load_weights(model, folder: str | Path) -> None:
    """Load ``model.safetensors`` into a live model (adapters only for a LoRA model); only tied weights may be
    missing."""
    if is_lora(model):
        return load_adapter(model, folder)
    if (Path(folder) / ADAPTER_DIR).is_dir():
        raise ValueError(f"{folder}: a LoRA checkpoint, but model.lora is off")
    state = load_file(str(Path(folder) / "model.safetensors"))
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if getattr(model.config, "tie_word_embeddings", False) else set()
    if unexpected or set(missing) - tied:
        raise ValueError(f"{folder}: checkpoint does not match the model (missing {missing}, unexpected {unexpected})")


def read_weights(folder: str | Path) -> dict[str, torch.Tensor]:
    """The checkpoint's whole model state dict (``model.safetensors``)."""
    return load_file(str(Path(folder) / "model.safetensors"))


def read_optimizer_state(folder: str | Path) -> dict:
    """The checkpoint's optimizer state dict in torch's layout (``state`` keyed by parameter index)."""
    folder = Path(folder)
    payload = json.loads((folder / STATE_FILE).read_text(encoding="utf-8"))
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in load_file(str(folder / "optimizer.safetensors")).items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    return {"state": state, "param_groups": payload["param_groups"]}


def restore_rng(folder: str | Path) -> TrainerState:
    """Restore the torch and Python RNG states; return the trainer state."""
    folder = Path(folder)
    payload = json.loads((folder / STATE_FILE).read_text(encoding="utf-8"))
    torch.set_rng_state(load_file(str(folder / "rng.safetensors"))["torch"])
    v, inner, gauss = payload["python_random"]
    random.setstate((v, tuple(inner), gauss))
    return TrainerState(**payload["trainer"])


def restore_scaler(folder: str | Path, scaler) -> None:
    """Load the loss scaler's state saved in ``folder`` into ``scaler`` (fp16 runs); a no-op when ``scaler`` is None.
    A checkpoint without one (written by a run that had no scaler) is an error: it was not trained in fp16."""
    if scaler is None:
        return
    payload = json.loads((Path(folder) / STATE_FILE).read_text(encoding="utf-8"))
    if "grad_scaler" not in payload:
        raise ValueError(f"{folder}: no loss-scaler state in the checkpoint, but model.dtype float16 needs one")
    state = payload["grad_scaler"]
    scaler.load_state_dict(
        {k: int(v) if k == "_growth_tracker" or k == "growth_interval" else v for k, v in state.items()}
    )


def load_checkpoint(folder: str | Path, model, optimizer: torch.optim.Optimizer) -> TrainerState:
    """Restore weights, optimizer, RNG states; return the trainer state."""
    load_weights(model, folder)
    optimizer.load_state_dict(read_optimizer_state(folder))
    return restore_rng(folder)
