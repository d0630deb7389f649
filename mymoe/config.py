"""Typed configuration: model, MoE, parallelism, training and data settings.

A config is a YAML file with one section per dataclass below, overridden from the command line with
dotted names (``--model.num_hidden_layers=4``, ``--train.lr 3e-4``). MoE fields may be written flat
under ``model`` as Hugging Face configs do (``--model.n_routed_experts=16`` lands in ``model.moe``).
Every check of a bad value lives in ``validate`` and runs before anything is built, on every rank alike.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import hashlib
import json
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml


class ConfigError(ValueError):
    """A bad configuration value; the message names the field and the fix."""


# The allowed values of the enum-like fields: the code that acts on them reads these too
# (typing.get_args), and validation checks every field so annotated.
ScoringFunc = Literal["softmax", "sigmoid", "identity"]  # identity: the raw logits rank the experts
DropPolicy = Literal["probs", "position"]  # mymoe.model.moe.overflow.priority_order
OverflowPolicy = Literal["drop", "spill", "null_expert"]  # mymoe.model.moe.overflow.place_assignments
AttentionType = Literal["gqa", "mla"]
# clamped: GPT-OSS; gelu: the plain two-layer FFN w1 -> GELU -> w2, no gate matrix (GPT-2, BERT)
ExpertActivation = Literal["swiglu", "clamped_swiglu", "gelu"]
HiddenAct = Literal["silu", "gelu"]  # the dense FFN: "silu" is SwiGLU, "gelu" the plain two-layer FFN
NormType = Literal["rmsnorm", "layernorm"]
QKNorm = Literal["head", "full"]  # per head (Qwen3) or over the whole projection (OLMoE)
DispatcherName = Literal["alltoall", "alltoall_dedup", "allgather"]  # mymoe.parallel.parallelize.DISPATCHERS
Backend = Literal["auto", "gloo", "nccl", "mpi"]
Precision = Literal["auto", "fp32", "bf16"]
RevivalInit = Literal["live", "fresh"]  # mymoe.train.revival
FSDPDtype = Literal["fp32", "bf16"]  # FSDP2 MixedPrecisionPolicy: bf16 compute / reduction on GPU

# Field metadata: the field changes the shape or meaning of the weights, so a checkpoint saved with another
# value is refused at resume (mymoe.checkpoint.manager). `when` names the setting under which it matters.
ARCHITECTURE = {"architecture": True}
MLA_ARCHITECTURE = {"architecture": True, "when": ("attention_type", "mla")}

ROPE_SCALING_TYPES = ("linear", "dynamic", "yarn")
# weights LoRA can adapt, by the last part of their module name (mymoe.peft)
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate", "experts", "shared_experts")


@dataclass
class MoEConfig:
    n_routed_experts: int = field(default=8, metadata=ARCHITECTURE)
    num_experts_per_tok: int = field(default=2, metadata=ARCHITECTURE)
    moe_intermediate_size: int = field(default=256, metadata=ARCHITECTURE)
    n_shared_experts: int = field(default=0, metadata=ARCHITECTURE)
    # default: n_shared_experts * moe_intermediate_size
    shared_expert_intermediate_size: Optional[int] = field(default=None, metadata=ARCHITECTURE)
    # Qwen2-MoE style sigmoid gate on the shared expert output
    shared_expert_gate: bool = field(default=False, metadata=ARCHITECTURE)

    # "softmax" (Mixtral, Qwen), "sigmoid" (DeepSeek-V3) or "identity" (the raw logits)
    scoring_func: ScoringFunc = field(default="softmax", metadata=ARCHITECTURE)
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0
    n_group: int = 1  # group-limited routing: experts split into n_group groups ...
    topk_group: int = 1  # ... and only the best topk_group groups may be chosen

    router_jitter_noise: float = 0.0  # multiplicative jitter on the router input, training only
    router_noise_std: float = 0.0  # Gaussian noisy top-k on the logits, training only

    capacity_factor: Optional[float] = None  # None = dropless
    eval_capacity_factor: Optional[float] = None  # None = same as capacity_factor
    min_capacity: int = 4
    drop_policy: DropPolicy = "probs"  # "probs": keep the highest-weight assignments; "position": first come
    overflow_policy: OverflowPolicy = "drop"  # "drop", "spill" (to the next-best expert with room) or "null_expert"
    min_tokens_per_sequence_kept: int = 0  # first choices of this many tokens per sequence never dropped

    # Switch/GShard load-balancing loss; 0.001 (Mixtral's and Qwen's too). In benchmarks/quality.py (8k vocab,
    # 1M tokens) better balance cost held-out perplexity: 206.3 at 0.001 (least-used expert 0.08 of a fair
    # share), 213.5 at 0.01 (0.59), 221.0 with no aux loss and bias_update_rate 1e-3 (0.74); at its 2k-vocab
    # default 75.8 (0.05), 77.1 (0.54) and 79.8 (0.88), the dense model of equal active parameters 83.9
    router_aux_loss_coef: float = 0.001
    seq_aux_loss_coef: float = 0.0  # DeepSeek sequence-level balance loss
    router_z_loss_coef: float = 0.0
    bias_update_rate: float = 0.0  # aux-loss-free balancing; 0 disables the selection bias
    # GPT-OSS's experts, all off by default: a bias on the router's logits, biases on the experts'
    # projections, and "clamped_swiglu": (clamp(up, +-limit) + 1) * g * sigmoid(alpha * g), g = min(gate, limit)
    router_bias: bool = field(default=False, metadata=ARCHITECTURE)
    expert_mlp_bias: bool = field(default=False, metadata=ARCHITECTURE)
    expert_activation: ExpertActivation = field(default="swiglu", metadata=ARCHITECTURE)
    swiglu_alpha: float = 1.702
    swiglu_limit: float = 7.0
    # training dynamics driven by the step the trainer passes to the model (mymoe/model/moe/dynamics.py);
    # all off by default. Warm-up: over the first moe_warmup_steps the layer output moves linearly from its
    # dense path (the shared expert, or a dense SwiGLU of the routed experts' active width) to the MoE path.
    moe_warmup_steps: int = field(default=0, metadata=ARCHITECTURE)
    # capacity in tokens per expert (of one rank's micro-batch, like capacity_factor's count) grows linearly
    # from min to max over capacity_growth_steps (capacity mode)
    min_expert_capacity: Optional[int] = None
    max_expert_capacity: Optional[int] = None
    capacity_growth_steps: int = 0
    aux_loss_ramp_steps: int = 0  # the aux loss is scaled by min(1, step / aux_loss_ramp_steps)
    router_reset_interval: int = 0  # every this many steps the routers are re-initialised (0: never)
    # a dense SwiGLU mixed with the MoE output by a learned weight: (1 - g) * dense + g * moe, g = sigmoid(w)
    flexible_ffn: bool = field(default=False, metadata=ARCHITECTURE)
    # a learned per-token score decides which assignments keep their slots at capacity
    token_importance: bool = field(default=False, metadata=ARCHITECTURE)
    # for benchmarks only (Megatron-Core's moe_router_force_load_balancing): every token's top-k choice is
    # replaced by a balanced assignment, each expert getting the same number of assignments, so speed can be
    # measured without the imbalance of an untrained router; the combine weights stay the router's
    # probabilities of the assigned experts, so the router still gets gradients
    force_balanced_routing: bool = False

    @property
    def dropless(self) -> bool:
        return self.capacity_factor is None


@dataclass
class ModelConfig:
    vocab_size: int = field(default=32000, metadata=ARCHITECTURE)
    hidden_size: int = field(default=256, metadata=ARCHITECTURE)
    # dense FFN width (first_k_dense_replace layers)
    intermediate_size: int = field(default=1024, metadata=ARCHITECTURE)
    num_hidden_layers: int = field(default=4, metadata=ARCHITECTURE)
    num_attention_heads: int = field(default=4, metadata=ARCHITECTURE)
    # None = num_attention_heads (plain multi-head)
    num_key_value_heads: Optional[int] = field(default=None, metadata=ARCHITECTURE)
    # None = hidden_size // num_attention_heads
    head_dim: Optional[int] = field(default=None, metadata=ARCHITECTURE)
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float = field(default=10000.0, metadata=ARCHITECTURE)
    rope_scaling: Optional[dict] = None  # {"type": linear|dynamic|yarn, "factor": f, ...}
    tie_word_embeddings: bool = field(default=False, metadata=ARCHITECTURE)
    first_k_dense_replace: int = field(default=0, metadata=ARCHITECTURE)
    gradient_checkpointing: bool = False
    initializer_range: float = 0.02
    # attention: "gqa" (grouped-query, the fields above) or "mla" (DeepSeek multi-head latent attention,
    # the fields below; num_key_value_heads and head_dim are then unused)
    attention_type: AttentionType = field(default="gqa", metadata=ARCHITECTURE)
    # options of grouped-query attention, all off by default (Hugging Face names)
    # biases on the q, k, v and o projections (Llama, Qwen3-MoE, GPT-OSS)
    attention_bias: bool = field(default=False, metadata=ARCHITECTURE)
    qkv_bias: bool = field(default=False, metadata=ARCHITECTURE)  # biases on q, k and v only (Qwen2-MoE)
    # RMSNorm of queries and keys before rotary: "head" per head (Qwen3), "full" over the whole projection (OLMoE)
    qk_norm: Optional[QKNorm] = field(default=None, metadata=ARCHITECTURE)
    # clamp queries, keys and values to [-clip_qkv, clip_qkv] (OLMoE)
    clip_qkv: Optional[float] = field(default=None, metadata=ARCHITECTURE)
    # softmax scale of the scores; None: 1 / sqrt(head_dim)
    attention_multiplier: Optional[float] = field(default=None, metadata=ARCHITECTURE)
    # Granite's scalings (1.0: none): embeddings times embedding_multiplier, each block's attention and
    # MLP output times residual_multiplier before its residual add, logits divided by logits_scaling
    embedding_multiplier: float = field(default=1.0, metadata=ARCHITECTURE)
    residual_multiplier: float = field(default=1.0, metadata=ARCHITECTURE)
    logits_scaling: float = field(default=1.0, metadata=ARCHITECTURE)
    # GPT-OSS attention: a learned per-head logit that joins each softmax (a "sink" taking probability
    # mass, contributing no value), and layers attending only to the last sliding_window positions
    attention_sinks: bool = field(default=False, metadata=ARCHITECTURE)
    sliding_window: Optional[int] = field(default=None, metadata=ARCHITECTURE)
    # per layer "full_attention" or "sliding_attention"; None: all sliding when sliding_window is set
    layer_types: Optional[list] = field(default=None, metadata=ARCHITECTURE)
    # None: queries projected directly, no low-rank bottleneck
    q_lora_rank: Optional[int] = field(default=None, metadata=MLA_ARCHITECTURE)
    kv_lora_rank: int = field(default=512, metadata=MLA_ARCHITECTURE)
    qk_nope_head_dim: int = field(default=128, metadata=MLA_ARCHITECTURE)
    qk_rope_head_dim: int = field(default=64, metadata=MLA_ARCHITECTURE)
    v_head_dim: int = field(default=128, metadata=MLA_ARCHITECTURE)
    # multi-token prediction (DeepSeek-V3): 1 adds a head predicting token t+2, trained with this weight
    num_nextn_predict_layers: int = field(default=0, metadata=ARCHITECTURE)
    mtp_loss_weight: float = 0.3
    # the MoE-layer tutorial's options, all off by default: the dense layers' FFN ("gelu": w1 -> GELU ->
    # w2, the routed and shared experts follow moe.expert_activation), LayerNorm with a bias (eps
    # rms_norm_eps, as Phi-MoE) for the block and final norms, and dropout: in the attention softmax, on
    # the attention and FFN outputs before each residual add, and inside every FFN between its two linears
    hidden_act: HiddenAct = field(default="silu", metadata=ARCHITECTURE)
    norm_type: NormType = field(default="rmsnorm", metadata=ARCHITECTURE)
    attention_dropout: float = 0.0
    hidden_dropout: float = 0.0
    expert_dropout: float = 0.0
    # false: bidirectional (encoder) attention; labels[t] is then the target at position t itself (masked LM)
    is_causal: bool = field(default=True, metadata=ARCHITECTURE)
    # a second output head over the final hidden state, predicting the same next token (TinySeek's fc2
    # "candidate prediction"), trained with this weight; generation's dual_head strategy reads it
    candidate_head: bool = field(default=False, metadata=ARCHITECTURE)
    candidate_loss_weight: float = 1.0
    moe: MoEConfig = field(default_factory=MoEConfig)

    @property
    def rope_head_dim(self) -> int:
        """Width of the rotated part of each query and key head."""
        return self.qk_rope_head_dim if self.attention_type == "mla" else self.head_dim

    def __post_init__(self):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None and self.num_attention_heads > 0:
            self.head_dim = self.hidden_size // self.num_attention_heads


@dataclass
class ParallelConfig:
    expert_parallel_size: int = 1
    backend: Backend = "auto"  # "auto": nccl on CUDA, gloo on CPU
    timeout_seconds: float = 600.0
    # "alltoall"; "alltoall_dedup" sends a token to a rank once however many of its experts live there;
    # "allgather" for small groups on fast links
    dispatcher: DispatcherName = "alltoall"
    # fully sharded data parallelism (FSDP2, mymoe/parallel/fsdp.py): dense parameters, gradients and
    # optimizer state split over every rank, experts over their expert-data-parallel ranks
    fsdp: bool = False
    fsdp_reshard_after_forward: bool = True  # free each block's gathered parameters after its forward
    fsdp_prefetch: int = 0  # blocks whose all-gather is issued ahead of time (0: FSDP2's implicit order)
    fsdp_param_dtype: FSDPDtype = "fp32"  # "bf16": compute in bf16 with fp32 master weights (GPU)
    fsdp_reduce_dtype: FSDPDtype = "fp32"  # dtype of the gradient reduce-scatter
    fsdp_cpu_offload: bool = False  # keep sharded parameters, gradients and optimizer state in CPU memory
    # expert replication (mymoe/parallel/replication.py): extra expert slots per expert-parallel rank holding
    # copies of busy experts, re-planned from the measured loads every replication_interval steps
    redundant_experts: int = 0
    replication_interval: int = 100
    # the all-to-all dispatchers pipeline their exchange in this many chunks: the experts compute chunk i
    # while chunk i+1 travels (1: one exchange, overlapped only with the shared experts; 0: no overlap,
    # blocking all-to-alls; on gloo/CPU, where transfers and GEMMs share the cores, see benchmarks/moe_ep.py)
    a2a_chunks: int = 1


@dataclass
class TrainConfig:
    seed: int = 1234
    micro_batch_size: int = 8
    gradient_accumulation_steps: int = 1
    max_steps: int = 100
    max_tokens: Optional[int] = None  # hard stop by tokens seen (global), whichever comes first
    lr: float = 3e-4
    min_lr: float = 3e-5
    warmup_steps: int = 10
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    grad_clip: float = 1.0
    aux_loss_ramp_steps: int = 0  # aux coefficients rise linearly from 0 over this many steps
    precision: Precision = "auto"  # "auto" (bf16 autocast on CUDA, fp32 on CPU), "fp32", "bf16"
    eval_interval: int = 50
    eval_steps: int = 5
    log_interval: int = 1
    out_dir: str = "runs/default"
    checkpoint_interval: int = 0  # 0: only at the end
    keep_last: int = 3
    async_save: bool = False
    resume: bool = True
    # fine-tuning: start from these weights (checkpoints folder, consolidated .safetensors or Hugging Face
    # folder) when out_dir has no checkpoint to resume from
    init_from: Optional[str] = None
    dead_expert_window: int = 20  # steps an expert may stay idle or saturated before a warning
    max_nonfinite_steps: int = 3  # steps in a row with a nan/inf loss or gradient norm (skipped) before a stop
    # a single process stopped by a signal abandons a step still running this long after it (torchrun and
    # SLURM kill at 30 s); 0 waits for the step boundary
    stop_timeout_seconds: float = 20.0
    # dead-expert revival (mymoe/train/revival.py), off by default: at the end of each window of
    # revival_window steps, an expert whose tokens over it are under revival_threshold x its fair share is
    # re-initialised: "live" a noisy copy (revival_noise x each tensor's std) of a busy expert, "fresh" anew
    revive_dead_experts: bool = False
    revival_window: int = 100
    revival_threshold: float = 0.01
    revival_init: RevivalInit = "live"
    revival_noise: float = 0.01
    # per-step checks and log lines: router probabilities finite, loads and drops per MoE layer, the first
    # module whose output is not finite (mymoe/train/debug.py); slow (reads the device every step)
    debug: bool = False
    # torch.compile (inductor) each block's attention, norms, dense MLP, router and shared experts
    # (mymoe/train/compile.py); the routed experts and their dispatch stay eager
    compile: bool = False


@dataclass
class DataConfig:
    train_prefixes: list = field(default_factory=list)
    train_weights: Optional[list] = None
    valid_prefixes: list = field(default_factory=list)
    seq_len: int = 128
    tokenizer: Optional[str] = None  # sentencepiece .model, tokenizer.json or HF folder: generation, checks


@dataclass
class PEFTConfig:
    """Parameter-efficient fine-tuning (mymoe.peft); any adapter freezes every base parameter."""

    lora_rank: int = 0  # 0: no LoRA
    lora_alpha: float = 16.0
    lora_targets: list = field(default_factory=lambda: ["q_proj", "v_proj"])
    prefix_length: int = 0  # 0: no prefix tuning

    @property
    def enabled(self) -> bool:
        return self.lora_rank > 0 or self.prefix_length > 0


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    peft: PEFTConfig = field(default_factory=PEFTConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def hash(self) -> str:
        """Stable digest so ranks can agree they were started with the same config."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------------
# building from dicts, YAML and dotted overrides


@functools.lru_cache(maxsize=None)
def _field_types(cls) -> dict:
    """(cached: resolving the string annotations was 0.07 s of each checkpoint load's architecture check;
    callers only read the dict)"""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _nested_dataclass_fields(cls) -> dict:
    return {name: t for name, t in _field_types(cls).items() if dataclasses.is_dataclass(t)}


def _unwrap_optional(tp):
    args = typing.get_args(tp)
    if typing.get_origin(tp) is typing.Union and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return rest[0] if len(rest) == 1 else tp, True
    return tp, False


def _coerce(value: Any, tp, where: str):
    """Turn a YAML or command-line value into the field's type, or say why it cannot be."""
    tp, optional = _unwrap_optional(tp)
    if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
        if optional:
            return None
        raise ConfigError(f"{where}=None is not allowed: give a value of type {getattr(tp, '__name__', tp)}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
            return value.lower() in ("true", "1", "yes", "on")
        raise ConfigError(f"{where}={value!r} is not a boolean: use true or false")
    if tp in (int, float):
        if isinstance(value, bool):
            raise ConfigError(f"{where}={value!r} must be a number")
        try:
            number = float(value) if isinstance(value, str) else value
            if tp is int:
                if float(number) != int(float(number)):
                    raise ValueError
                return int(float(number))
            return float(number)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}={value!r} must be {'an integer' if tp is int else 'a number'}") from None
    if tp is str or typing.get_origin(tp) is Literal:  # a Literal's values are checked by validate
        if isinstance(value, (list, dict)):
            raise ConfigError(
                f"{where}={value!r} must be a single value (a path or a name), not a {type(value).__name__}"
            )
        return str(value)
    if tp in (list, dict) or typing.get_origin(tp) in (list, dict):
        if isinstance(value, str):
            try:
                value = yaml.safe_load(value)
            except yaml.YAMLError as e:
                raise ConfigError(f"{where}={value!r} is not valid YAML: {e}") from None
        base = typing.get_origin(tp) or tp
        if base is list and isinstance(value, (str, int, float)):
            value = [value]
        if not isinstance(value, base):
            raise ConfigError(f"{where}={value!r} must be a {base.__name__}")
        return value
    return value


def _build(cls, values: dict, where: str):
    if not isinstance(values, dict):
        raise ConfigError(f"section '{where}' must be a mapping of keys to values, got {type(values).__name__}")
    if cls is ModelConfig:
        values = resolve_seed_aliases(values, where)
    types = _field_types(cls)
    nested = _nested_dataclass_fields(cls)
    kwargs: dict = {}
    nested_values: dict = {name: {} for name in nested}
    for key, value in values.items():
        if key in nested:
            if not isinstance(value or {}, dict):
                raise ConfigError(
                    f"{where}.{key}={value!r}: '{key}' is a section, so it takes keys and values "
                    f"(e.g. {key}: {{{next(iter(_field_types(nested[key])))}: ...}}), not a single value"
                )
            nested_values[key].update(value or {})
        elif key in types:
            kwargs[key] = _coerce(value, types[key], f"{where}.{key}")
        else:
            owners = [name for name, sub in nested.items() if key in _field_types(sub)]
            if len(owners) == 1:  # Hugging Face style: MoE keys written flat under `model`
                nested_values[owners[0]][key] = value
            else:
                known = list(types) + _nested_keys(nested) + (list(SEED_ALIASES) if cls is ModelConfig else [])
                raise ConfigError(_unknown_key_message(key, where, known))
    for name, sub in nested.items():
        kwargs[name] = _build(sub, nested_values[name], f"{where}.{name}")
    return cls(**kwargs)


# ---------------------------------------------------------------------------------------------------
# seed-004's Hugging Face-style names (docs/seed_api.md): accepted under `model` or `model.moe`, in YAML,
# dotted overrides and MoEModelConfig keywords, and turned into our fields before anything is built

DEFAULT_BIAS_UPDATE_RATE = 1e-3  # DeepSeek-V3's bias update speed (gamma) when balancing is switched on by name


def _balancing_rate(given: dict) -> float:
    return given.get("moe.bias_update_rate") or DEFAULT_BIAS_UPDATE_RATE


def _overflow_policy(use_null_expert: bool, given: dict) -> str:
    if use_null_expert:
        return "null_expert"
    # false: any other policy given stands, and null_expert given alongside is a conflict
    policy = given.get("moe.overflow_policy", "drop")
    return "drop" if policy == "null_expert" else policy


def _topk_method(method: str, given: dict) -> dict:
    if method == "noaux_tc":  # DeepSeek-V3: sigmoid scores, a balancing bias for selection, groups as configured
        return {"moe.scoring_func": "sigmoid", "moe.bias_update_rate": _balancing_rate(given)}
    if method in ("greedy", "group_limited_greedy"):  # plain top-k; group-limited whenever n_group > 1
        return {}
    raise ConfigError(
        f"model.topk_method={method!r} is unknown: use 'noaux_tc', 'greedy' or 'group_limited_greedy' "
        f"(the group limit itself is set by n_group and topk_group)"
    )


# alias: (its type, what it sets: alias value and the target fields given alongside -> {target: value});
# a target "moe.x" is a field of MoEConfig, a bare "x" one of ModelConfig
SEED_ALIASES = {
    "expert_capacity_factor": (Optional[float], lambda value, given: {"moe.capacity_factor": value}),
    "aux_loss_coef": (float, lambda value, given: {"moe.router_aux_loss_coef": value}),
    "router_scaling_factor": (float, lambda value, given: {"moe.routed_scaling_factor": value}),
    "use_null_expert": (bool, lambda value, given: {"moe.overflow_policy": _overflow_policy(value, given)}),
    "use_bias_balancing": (
        bool,
        lambda value, given: {"moe.bias_update_rate": _balancing_rate(given) if value else 0.0},
    ),
    # a dense model: every layer takes the dense FFN
    "use_moe": (
        bool,
        lambda value, given: (
            {} if value else {"first_k_dense_replace": given.get("num_hidden_layers", ModelConfig.num_hidden_layers)}
        ),
    ),
    "topk_method": (str, _topk_method),
}


def resolve_seed_aliases(values: dict, where: str = "model") -> dict:
    """A model section with seed-004's names -> the same section in ours; an alias and the field it
    sets may both be given only when they agree."""
    moe_values = values.get("moe") or {}
    found = {name: (where, values[name]) for name in SEED_ALIASES if name in values}
    if not isinstance(moe_values, dict):
        if not found:
            return values  # _build says what a section takes
        raise ConfigError(f"{where}.moe={moe_values!r}: 'moe' is a section, so it takes keys and values")
    for name in SEED_ALIASES:
        if name in moe_values:
            if name in found:
                raise ConfigError(f"{where}.{name} is given both under {where} and {where}.moe: give it once")
            found[name] = (f"{where}.moe", moe_values[name])
    if not found:
        return values
    values = {key: value for key, value in values.items() if key not in SEED_ALIASES}
    values["moe"] = {key: value for key, value in moe_values.items() if key not in SEED_ALIASES}
    moe_fields = {f.name for f in dataclasses.fields(MoEConfig)}
    given = {key: value for key, value in values.items() if key != "moe"}
    given.update({f"moe.{key}": value for key, value in values.items() if key in moe_fields})
    given.update({f"moe.{key}": value for key, value in values["moe"].items()})
    settings: dict = {}
    for name, (section, value) in found.items():
        alias_type, translate = SEED_ALIASES[name]
        for target, target_value in translate(_coerce(value, alias_type, f"{section}.{name}"), given).items():
            if target in given and given[target] != target_value:
                raise ConfigError(
                    f"{section}.{name}={value!r} sets {where}.{target}={target_value!r}, but {where}.{target}="
                    f"{given[target]!r} is given too: drop one of them"
                )
            if target in settings and settings[target] != target_value:
                raise ConfigError(
                    f"{section}.{name}={value!r} sets {where}.{target}={target_value!r}, which another alias "
                    f"sets to {settings[target]!r}: drop one of them"
                )
            settings[target] = target_value
    for target, target_value in settings.items():
        section_values = values["moe"] if target.startswith("moe.") else values
        section_values[target.removeprefix("moe.")] = target_value
    return values


def _nested_keys(nested: dict) -> list:
    return [k for sub in nested.values() for k in _field_types(sub)]


def _unknown_key_message(key: str, where: str, known: list) -> str:
    import difflib

    close = difflib.get_close_matches(key, known, n=3)
    hint = f" Did you mean {', '.join(close)}?" if close else f" Known keys: {', '.join(sorted(known))}."
    return f"unknown key '{key}' in '{where}'.{hint}"


SECTIONS = ("model", "parallel", "train", "data", "peft")


def config_from_dict(values: dict) -> Config:
    values = dict(values or {})
    if "moe" in values:  # a top-level moe section is accepted as model.moe
        values.setdefault("model", {})
        values["model"] = {**values["model"], "moe": {**values["model"].get("moe", {}), **values.pop("moe")}}
    return _build(Config, values, "config")


def apply_overrides(values: dict, overrides: list[str]) -> dict:
    """Apply ``--section.key=value`` or ``--section.key value`` overrides to a raw config dict."""
    values = json.loads(json.dumps(values or {}))  # deep copy of plain data
    pending = list(overrides)
    while pending:
        item = pending.pop(0)
        if not item.startswith("--"):
            raise ConfigError(f"override {item!r} must look like --section.key=value (e.g. --train.lr=3e-4)")
        item = item[2:]
        if "=" in item:
            path, raw = item.split("=", 1)
        elif pending and not pending[0].startswith("--"):
            path, raw = item, pending.pop(0)
        else:
            raise ConfigError(f"override --{item} has no value: write --{item}=VALUE")
        keys = path.split(".")
        if len(keys) < 2 or keys[0] not in SECTIONS + ("moe",):
            raise ConfigError(f"override --{path}: the first part must be one of {', '.join(SECTIONS)}")
        node = values
        for key in keys[:-1]:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override --{path}: '{key}' is not a section")
        node[keys[-1]] = yaml.safe_load(raw) if raw.strip() else raw
    return values


def load_config(path: Optional[str] = None, overrides: Optional[list[str]] = None) -> Config:
    values: dict = {}
    if path is not None:
        p = Path(path)
        if not p.exists():
            raise ConfigError(f"config file {path} does not exist (see configs/ for the shipped ones)")
        try:
            values = yaml.safe_load(p.read_text()) or {}
        except (yaml.YAMLError, UnicodeDecodeError) as error:
            where = getattr(error, "problem_mark", None)
            at = f" at line {where.line + 1}, column {where.column + 1}" if where is not None else ""
            problem = getattr(error, "problem", None) or type(error).__name__
            raise ConfigError(
                f"{path} is not a YAML config{at} ({problem}): fix the file, or start from one in configs/"
            ) from None
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: the top level must be a mapping with sections {', '.join(SECTIONS)}")
    config = config_from_dict(apply_overrides(values, overrides or []))
    validate(config)
    return config


# ---------------------------------------------------------------------------------------------------
# validation


def _divisors(n: int) -> str:
    return ", ".join(str(d) for d in range(1, n + 1) if n % d == 0)


def _literal_values(tp) -> Optional[tuple]:
    tp, _ = _unwrap_optional(tp)
    return typing.get_args(tp) if typing.get_origin(tp) is Literal else None


def _one_of(values: tuple) -> str:
    quoted = [repr(value) for value in values]
    return quoted[0] if len(quoted) == 1 else ", ".join(quoted[:-1]) + " or " + quoted[-1]


def check_choices(section, where: str) -> None:
    """Every field of `section` typed as a Literal holds one of its values."""
    for name, tp in _field_types(type(section)).items():
        allowed = _literal_values(tp)
        value = getattr(section, name)
        if allowed is not None and value not in allowed and not (value is None and _unwrap_optional(tp)[1]):
            options = _one_of(allowed)
            raise ConfigError(
                f"{where}.{name}={value!r} must be " + ("null, " if _unwrap_optional(tp)[1] else "") + options
            )


def _check_positive(where: str, section, names: tuple) -> None:
    for name in names:
        value = getattr(section, name)
        if value <= 0:
            raise ConfigError(f"{where}.{name}={value} must be a positive integer")


def _check_non_negative(where: str, section, names: tuple) -> None:
    for name in names:
        value = getattr(section, name)
        if value < 0:
            raise ConfigError(f"{where}.{name}={value} must be >= 0")


def validate_model(m: ModelConfig) -> None:
    _check_positive(
        "model",
        m,
        (
            "vocab_size",
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "max_position_embeddings",
        ),
    )
    check_choices(m, "model")
    # an explicit head_dim (Qwen3, GPT-OSS) decouples the heads' width from hidden_size
    if m.hidden_size % m.num_attention_heads and m.head_dim == m.hidden_size // m.num_attention_heads:
        raise ConfigError(
            f"model.num_attention_heads={m.num_attention_heads} must divide model.hidden_size={m.hidden_size} "
            f"(try one of {_divisors(m.hidden_size) if m.hidden_size <= 4096 else 'its divisors'}, or set "
            f"model.head_dim)"
        )
    if m.num_attention_heads % m.num_key_value_heads:
        raise ConfigError(
            f"model.num_key_value_heads={m.num_key_value_heads} must divide model.num_attention_heads="
            f"{m.num_attention_heads} (try {_divisors(m.num_attention_heads)})"
        )
    if m.clip_qkv is not None and m.clip_qkv <= 0:
        raise ConfigError(f"model.clip_qkv={m.clip_qkv} must be positive (or null for no clamping)")
    for name in ("embedding_multiplier", "residual_multiplier", "logits_scaling"):
        if getattr(m, name) <= 0:
            raise ConfigError(f"model.{name}={getattr(m, name)} must be positive (1.0: no scaling)")
    if m.attention_multiplier is not None and m.attention_multiplier <= 0:
        raise ConfigError(
            f"model.attention_multiplier={m.attention_multiplier} must be positive (or null for 1 / sqrt(head_dim))"
        )
    scaled = [
        name for name in ("embedding_multiplier", "residual_multiplier", "logits_scaling") if getattr(m, name) != 1
    ]
    if scaled and m.num_nextn_predict_layers:
        raise ConfigError(
            f"model.{scaled[0]}={getattr(m, scaled[0])} with num_nextn_predict_layers: the multi-token "
            f"prediction head does not apply Granite's scalings; use one or the other"
        )
    if m.sliding_window is not None and m.sliding_window <= 0:
        raise ConfigError(f"model.sliding_window={m.sliding_window} must be a positive number of positions (or null)")
    if m.layer_types is not None:
        bad = [kind for kind in m.layer_types if kind not in ("full_attention", "sliding_attention")]
        if bad or len(m.layer_types) != m.num_hidden_layers:
            raise ConfigError(
                f"model.layer_types={m.layer_types} must list 'full_attention' or 'sliding_attention' "
                f"for each of the {m.num_hidden_layers} layers"
            )
        if "sliding_attention" in m.layer_types and m.sliding_window is None:
            raise ConfigError(
                "model.layer_types has sliding_attention layers but model.sliding_window is null: set the window"
            )
    gqa_options = [
        name
        for name in (
            "attention_bias",
            "qkv_bias",
            "qk_norm",
            "clip_qkv",
            "attention_multiplier",
            "attention_sinks",
            "sliding_window",
        )
        if getattr(m, name)
    ]
    if m.attention_type == "mla" and gqa_options:
        raise ConfigError(
            f"model.{gqa_options[0]}={getattr(m, gqa_options[0])!r} is an option of grouped-query "
            f"attention: set it to its default (false or null) with attention_type=mla"
        )
    if m.attention_type == "mla":
        for name in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
            if getattr(m, name) <= 0:
                raise ConfigError(f"model.{name}={getattr(m, name)} must be a positive integer for attention_type=mla")
        if m.q_lora_rank is not None and m.q_lora_rank <= 0:
            raise ConfigError(
                f"model.q_lora_rank={m.q_lora_rank} must be positive, or null for a direct query projection"
            )
    if m.num_nextn_predict_layers not in (0, 1):
        raise ConfigError(
            f"model.num_nextn_predict_layers={m.num_nextn_predict_layers}: only 0 or 1 "
            f"multi-token prediction module is supported"
        )
    _check_non_negative("model", m, ("mtp_loss_weight",))
    if m.rope_head_dim % 2:
        name = "qk_rope_head_dim" if m.attention_type == "mla" else "head_dim"
        raise ConfigError(f"model.{name}={m.rope_head_dim} must be even for rotary embeddings")
    if not 0 <= m.first_k_dense_replace <= m.num_hidden_layers:
        raise ConfigError(
            f"model.first_k_dense_replace={m.first_k_dense_replace} must be between 0 and "
            f"model.num_hidden_layers={m.num_hidden_layers}"
        )
    if m.rope_scaling is not None:
        validate_rope_scaling(m.rope_scaling)
    validate_tutorial_options(m)
    validate_moe(m.moe)


def validate_tutorial_options(m: ModelConfig) -> None:
    """Dropout rates, the candidate head's weight, and what bidirectional attention cannot go with."""
    for name in ("attention_dropout", "hidden_dropout", "expert_dropout"):
        if not 0 <= getattr(m, name) < 1:
            raise ConfigError(f"model.{name}={getattr(m, name)} must be in [0, 1) (0.0: no dropout, 0.1 is usual)")
    _check_non_negative("model", m, ("candidate_loss_weight",))
    if m.is_causal:
        return
    causal_only = {
        "num_nextn_predict_layers": "multi-token prediction predicts token t+2 from a causal prefix",
        "sliding_window": "the sliding window looks back only",
        "attention_sinks": "the sink attention here is written for causal masks",
    }
    for name, why in causal_only.items():
        if getattr(m, name):
            raise ConfigError(
                f"model.{name}={getattr(m, name)!r} with model.is_causal=false: {why}; set it to its "
                f"default (0, null or false) or keep is_causal=true"
            )


def check_encoder_training(config: Config) -> None:
    """The trainer's reader gives next-token labels, which a bidirectional model sees in its own input."""
    if not config.model.is_causal and config.data.train_prefixes:
        raise ConfigError(
            "model.is_causal=false with data.train_prefixes: the trainer's labels are the next tokens "
            "(labels[t] = input_ids[t + 1]), which bidirectional attention sees, so the loss would teach "
            "copying; train an encoder from your own loop with masked-LM labels (docs/tutorial_options.md), "
            "or keep is_causal=true"
        )


def validate_moe(moe: MoEConfig) -> None:
    _check_positive(
        "model.moe", moe, ("n_routed_experts", "num_experts_per_tok", "moe_intermediate_size", "n_group", "topk_group")
    )
    check_choices(moe, "model.moe")
    if moe.swiglu_limit <= 0:
        raise ConfigError(f"model.moe.swiglu_limit={moe.swiglu_limit} must be positive")
    if moe.num_experts_per_tok > moe.n_routed_experts:
        raise ConfigError(
            f"model.moe.num_experts_per_tok={moe.num_experts_per_tok} is larger than "
            f"model.moe.n_routed_experts={moe.n_routed_experts}: lower top-k or add experts"
        )
    if moe.n_routed_experts % moe.n_group:
        raise ConfigError(
            f"model.moe.n_group={moe.n_group} must divide model.moe.n_routed_experts="
            f"{moe.n_routed_experts} (try {_divisors(moe.n_routed_experts)})"
        )
    if moe.topk_group > moe.n_group:
        raise ConfigError(f"model.moe.topk_group={moe.topk_group} is larger than model.moe.n_group={moe.n_group}")
    if moe.n_group > 1 and moe.topk_group * (moe.n_routed_experts // moe.n_group) < moe.num_experts_per_tok:
        raise ConfigError(
            f"model.moe.topk_group={moe.topk_group} groups of {moe.n_routed_experts // moe.n_group} "
            f"experts hold fewer than num_experts_per_tok={moe.num_experts_per_tok}: raise topk_group"
        )
    for name in ("capacity_factor", "eval_capacity_factor"):
        value = getattr(moe, name)
        if value is not None and value <= 0:
            raise ConfigError(f"model.moe.{name}={value} must be positive (or null for dropless)")
    _check_non_negative(
        "model.moe",
        moe,
        (
            "min_capacity",
            "router_jitter_noise",
            "router_noise_std",
            "router_aux_loss_coef",
            "seq_aux_loss_coef",
            "router_z_loss_coef",
            "bias_update_rate",
            "n_shared_experts",
        ),
    )
    if moe.min_tokens_per_sequence_kept < 0:
        raise ConfigError(
            f"model.moe.min_tokens_per_sequence_kept={moe.min_tokens_per_sequence_kept} must be "
            f">= 0 (0 protects no token)"
        )
    validate_dynamics(moe)


def validate_dynamics(moe: MoEConfig) -> None:
    """The step-driven schedules of mymoe/model/moe/dynamics.py."""
    _check_non_negative(
        "model.moe", moe, ("moe_warmup_steps", "capacity_growth_steps", "aux_loss_ramp_steps", "router_reset_interval")
    )
    bounds = (moe.min_expert_capacity, moe.max_expert_capacity)
    if moe.token_importance and (moe.dropless or moe.drop_policy != "probs"):
        raise ConfigError(
            f"model.moe.token_importance=true orders the assignments that keep their slots at capacity, but "
            f"capacity_factor={moe.capacity_factor} and drop_policy={moe.drop_policy!r}: it needs a capacity "
            f"factor (e.g. 1.25) and drop_policy=probs"
        )
    if bounds == (None, None):
        if moe.capacity_growth_steps:
            raise ConfigError(
                f"model.moe.capacity_growth_steps={moe.capacity_growth_steps} has no capacity to grow: set "
                f"model.moe.min_expert_capacity and model.moe.max_expert_capacity, or drop it"
            )
        return
    if None in bounds:
        raise ConfigError(
            f"model.moe.min_expert_capacity={bounds[0]} and max_expert_capacity={bounds[1]}: set both "
            f"(tokens per expert at the start and the end of capacity_growth_steps) or neither"
        )
    if moe.dropless:
        raise ConfigError(
            f"model.moe.min_expert_capacity={bounds[0]}, max_expert_capacity={bounds[1]} need capacity mode, "
            f"but capacity_factor is null (dropless): set model.moe.capacity_factor (e.g. 1.25), or drop them"
        )
    if not 1 <= bounds[0] <= bounds[1]:
        raise ConfigError(
            f"model.moe.min_expert_capacity={bounds[0]} and max_expert_capacity={bounds[1]} need "
            f"1 <= min <= max (tokens per expert)"
        )
    if bounds[0] < bounds[1] and moe.capacity_growth_steps == 0:
        raise ConfigError(
            f"model.moe.capacity_growth_steps=0 cannot grow capacity from {bounds[0]} to {bounds[1]}: "
            f"set it to the number of steps the growth takes"
        )


def validate_parallel(par: ParallelConfig, num_experts: int, world_size: Optional[int]) -> None:
    _check_positive("parallel", par, ("expert_parallel_size",))
    _check_non_negative("parallel", par, ("a2a_chunks",))
    check_choices(par, "parallel")
    if par.timeout_seconds <= 0:
        raise ConfigError(f"parallel.timeout_seconds={par.timeout_seconds} must be positive")
    if num_experts % par.expert_parallel_size:
        raise ConfigError(
            f"parallel.expert_parallel_size={par.expert_parallel_size} must divide "
            f"model.moe.n_routed_experts={num_experts} (try {_divisors(num_experts)})"
        )
    if world_size is not None and world_size % par.expert_parallel_size:
        raise ConfigError(
            f"parallel.expert_parallel_size={par.expert_parallel_size} must divide the world size "
            f"{world_size} (try {_divisors(world_size)}, or launch a multiple of it processes)"
        )
    _validate_fsdp(par)
    _validate_replication(par)


def _validate_replication(par: ParallelConfig) -> None:
    if par.redundant_experts < 0 or par.replication_interval <= 0:
        raise ConfigError(
            f"parallel.redundant_experts={par.redundant_experts} must be >= 0 (0: no copies) and "
            f"parallel.replication_interval={par.replication_interval} >= 1 step"
        )
    if par.redundant_experts == 0:
        return
    if par.expert_parallel_size < 2:
        raise ConfigError(
            f"parallel.redundant_experts={par.redundant_experts} copies experts between expert-parallel ranks: "
            f"set parallel.expert_parallel_size >= 2, or parallel.redundant_experts=0"
        )
    if par.dispatcher != "alltoall" or par.fsdp:
        raise ConfigError(
            f"parallel.redundant_experts={par.redundant_experts} works with parallel.dispatcher=alltoall and "
            f"the replicated layout (got dispatcher={par.dispatcher}, fsdp={par.fsdp}): set those, or "
            f"parallel.redundant_experts=0"
        )


def validate_peft(peft: PEFTConfig, attention_type: str) -> None:
    if peft.lora_rank < 0 or peft.prefix_length < 0:
        raise ConfigError(
            f"peft.lora_rank={peft.lora_rank} and peft.prefix_length={peft.prefix_length} must be >= 0 (0 disables)"
        )
    unknown = [t for t in peft.lora_targets if t not in LORA_TARGETS]
    if peft.lora_rank and unknown:
        raise ConfigError(f"peft.lora_targets has unknown {unknown}: choose from {', '.join(LORA_TARGETS)}")
    if peft.prefix_length and attention_type != "gqa":
        raise ConfigError(
            "peft.prefix_length needs model.attention_type=gqa (prefix tuning of latent attention "
            "is not supported); use LoRA instead"
        )


def validate_train(tr: TrainConfig) -> None:
    _check_positive("train", tr, ("micro_batch_size", "gradient_accumulation_steps"))
    check_choices(tr, "train")
    if tr.lr <= 0 or tr.min_lr < 0 or tr.min_lr > tr.lr:
        raise ConfigError(f"train.lr={tr.lr} and train.min_lr={tr.min_lr} need 0 <= min_lr <= lr, lr > 0")
    if tr.log_interval <= 0:
        raise ConfigError(f"train.log_interval={tr.log_interval} must be a positive integer (1 logs every step)")
    if tr.eval_steps <= 0:
        raise ConfigError(
            f"train.eval_steps={tr.eval_steps} must be a positive integer "
            f"(set train.eval_interval=0 to skip evaluation)"
        )
    if tr.eval_interval < 0 or tr.checkpoint_interval < 0:
        raise ConfigError("train.eval_interval and train.checkpoint_interval must be >= 0 (0: never / only at the end)")
    if tr.max_tokens is not None and tr.max_tokens <= 0:
        raise ConfigError(f"train.max_tokens={tr.max_tokens} must be positive (or null for no token limit)")
    if tr.warmup_steps < 0 or tr.max_steps < 0 or tr.grad_clip < 0:
        raise ConfigError("train.warmup_steps, train.max_steps and train.grad_clip must be >= 0")
    if tr.revival_window <= 0 or not 0 < tr.revival_threshold <= 1 or tr.revival_noise < 0:
        raise ConfigError(
            f"train.revival_window={tr.revival_window}, train.revival_threshold={tr.revival_threshold} and "
            f"train.revival_noise={tr.revival_noise} need window >= 1 step, 0 < threshold <= 1 (a share of the "
            f"fair load) and noise >= 0"
        )


def validate_data(data: DataConfig) -> None:
    _check_positive("data", data, ("seq_len",))
    if data.train_weights is not None and len(data.train_weights) != len(data.train_prefixes):
        raise ConfigError(
            f"data.train_weights has {len(data.train_weights)} entries but data.train_prefixes "
            f"has {len(data.train_prefixes)}: give one weight per prefix"
        )


def validate(config: Config, world_size: Optional[int] = None) -> Config:
    """Raise ConfigError naming the first bad field and its fix. Pure: no I/O, no collectives.

    Each section is checked by its own function; the checks that join two sections (experts per rank,
    prefix tuning under latent attention) live with the section that has the choice.
    """
    validate_model(config.model)
    validate_parallel(config.parallel, config.model.moe.n_routed_experts, world_size)
    validate_peft(config.peft, config.model.attention_type)
    validate_train(config.train)
    if config.parallel.redundant_experts and config.peft.enabled:
        raise ConfigError(
            "parallel.redundant_experts copies expert weights without their LoRA adapters: set "
            "parallel.redundant_experts=0 for adapter training"
        )
    if config.train.revive_dead_experts and config.peft.enabled:
        raise ConfigError(
            "train.revive_dead_experts=true re-initialises base expert weights, which peft (LoRA / prefix "
            "tuning) keeps frozen: set train.revive_dead_experts=false for adapter training"
        )
    validate_data(config.data)
    check_encoder_training(config)
    validate_dynamics_with_training(config)
    check_values(config)
    return config


def validate_dynamics_with_training(config: Config) -> None:
    """The step-driven MoE schedules against the training settings they meet."""
    moe, train = config.model.moe, config.train
    if moe.aux_loss_ramp_steps and train.aux_loss_ramp_steps:
        raise ConfigError(
            f"model.moe.aux_loss_ramp_steps={moe.aux_loss_ramp_steps} and train.aux_loss_ramp_steps="
            f"{train.aux_loss_ramp_steps} would both ramp the aux loss: set one of them to 0"
        )
    if moe.router_reset_interval and config.peft.enabled:
        raise ConfigError(
            f"model.moe.router_reset_interval={moe.router_reset_interval} re-initialises the routers, which "
            f"fine-tuning with adapters (peft) keeps frozen: set router_reset_interval=0"
        )
    if moe.router_reset_interval and config.parallel.fsdp:
        raise ConfigError(
            f"model.moe.router_reset_interval={moe.router_reset_interval} re-initialises whole router "
            f"weights, which FSDP shards: set parallel.fsdp=false or router_reset_interval=0"
        )


def _validate_fsdp(par: ParallelConfig) -> None:
    if par.fsdp_prefetch < 0:
        raise ConfigError(f"parallel.fsdp_prefetch={par.fsdp_prefetch} must be >= 0 (0: FSDP2's implicit prefetch)")


def architecture_fields(cls=None, prefix: str = "") -> list[tuple[str, Optional[tuple]]]:
    """(dotted name under `model`, the (field, value) setting under which it matters or None) of every
    field marked ARCHITECTURE: what a checkpoint must agree on to be loaded."""
    cls = ModelConfig if cls is None else cls
    found = []
    for f in dataclasses.fields(cls):
        nested = _nested_dataclass_fields(cls)
        if f.name in nested:
            found += architecture_fields(nested[f.name], f"{prefix}{f.name}.")
        elif f.metadata.get("architecture"):
            found.append((prefix + f.name, f.metadata.get("when")))
    return found


# single-value rules: (field, rule, what the value must be); every float field must besides be finite
VALUE_RULES = (
    ("model.rms_norm_eps", lambda v: v > 0, "a small positive number such as 1e-6"),
    ("model.initializer_range", lambda v: v > 0, "positive (0.02 is usual)"),
    ("model.rope_theta", lambda v: v > 0, "positive (10000 is usual)"),
    ("train.max_nonfinite_steps", lambda v: v >= 1, "a positive integer (non-finite steps skipped in a row)"),
    ("train.seed", lambda v: v >= 0, "a non-negative integer"),
    ("train.stop_timeout_seconds", lambda v: v >= 0, ">= 0 (0 waits for the step boundary)"),
    ("train.keep_last", lambda v: v >= 0, "a non-negative integer (0 keeps every checkpoint)"),
    ("train.weight_decay", lambda v: v >= 0, ">= 0 (0.1 is usual, 0 disables it)"),
    ("train.adam_beta1", lambda v: 0 <= v < 1, "in [0, 1) (0.9 is usual)"),
    ("train.adam_beta2", lambda v: 0 <= v < 1, "in [0, 1) (0.95 is usual)"),
    ("train.adam_eps", lambda v: v > 0, "a small positive number such as 1e-8"),
    ("train.out_dir", lambda v: v.strip() != "", "a folder path"),
)


def _float_fields(node, prefix: str):
    for item in dataclasses.fields(node):
        value = getattr(node, item.name)
        if dataclasses.is_dataclass(value):
            yield from _float_fields(value, f"{prefix}{item.name}.")
        elif isinstance(value, float):
            yield f"{prefix}{item.name}", value


def check_values(config: Config) -> None:
    """The rules of VALUE_RULES, and no nan or inf anywhere (a nan passes every `<` and `>` check)."""
    for name, value in _float_fields(config, ""):
        if not math.isfinite(value):
            raise ConfigError(f"{name}={value} must be a finite number")
    for name, rule, must_be in VALUE_RULES:
        section, _, key = name.rpartition(".")
        value = getattr(functools.reduce(getattr, section.split("."), config), key)
        if not rule(value):
            raise ConfigError(f"{name}={value!r} must be {must_be}")


def validate_rope_scaling(rope_scaling: dict) -> None:
    if not isinstance(rope_scaling, dict):
        raise ConfigError(f"model.rope_scaling={rope_scaling!r} must be a mapping like {{type: yarn, factor: 4}}")
    kind = rope_scaling.get("type", rope_scaling.get("rope_type"))
    if kind not in ROPE_SCALING_TYPES:
        raise ConfigError(
            f"model.rope_scaling.type={kind!r} is unknown: use one of {', '.join(ROPE_SCALING_TYPES)} "
            f"(or set rope_scaling: null for none)"
        )
    factor = rope_scaling.get("factor")
    if not isinstance(factor, (int, float)) or factor < 1:
        raise ConfigError(f"model.rope_scaling.factor={factor!r} must be a number >= 1")


# ---------------------------------------------------------------------------------------------------
# sample-level gated ensembles (mymoe.ensemble): not a training section, saved in an ensemble's manifest


@dataclass
class EnsembleConfig:
    """A gate routing each whole sample to some of several trained models (TinySeek's gated ensemble)."""

    threshold: float = 0.1  # members whose gate weight is below this are skipped for the sample (top one kept)
    gate_layers: int = 1  # Transformer blocks in the gate, read at the last real position; 0: mean of embeddings
    gate_heads: int = 4  # attention heads of those blocks (must divide the members' hidden_size)
    lm_loss_weight: float = 0.0  # the ensemble's lm loss joins the gate's cross-entropy (for adapters to learn)
    peft: PEFTConfig = field(default_factory=PEFTConfig)  # adapters on every member; their base stays frozen


def validate_ensemble(
    ensemble: EnsembleConfig, hidden_size: Optional[int] = None, attention_type: Optional[str] = None
) -> EnsembleConfig:
    """ConfigError naming the first bad field and its fix: first with the settings alone (before any member is
    loaded), then with the members' hidden_size and attention_type."""
    if not 0 <= ensemble.threshold < 1:
        raise ConfigError(
            f"threshold={ensemble.threshold} must be in [0, 1): the gate weight below which a member is skipped "
            f"(0 keeps every member)"
        )
    if ensemble.gate_layers < 0:
        raise ConfigError(f"gate_layers={ensemble.gate_layers} must be >= 0 (0: mean of the embeddings)")
    if ensemble.gate_layers and ensemble.gate_heads < 1:
        raise ConfigError(f"gate_heads={ensemble.gate_heads} must be >= 1")
    if ensemble.gate_layers and hidden_size is not None and hidden_size % ensemble.gate_heads:
        raise ConfigError(
            f"gate_heads={ensemble.gate_heads} must divide the members' hidden_size={hidden_size} "
            f"(try {_divisors(hidden_size)})"
        )
    if ensemble.lm_loss_weight < 0:
        raise ConfigError(f"lm_loss_weight={ensemble.lm_loss_weight} must be >= 0 (0: the gate's cross-entropy only)")
    validate_peft(ensemble.peft, attention_type or "gqa")
    if ensemble.peft.enabled and ensemble.lm_loss_weight == 0:
        raise ConfigError(
            "adapters (lora_rank or prefix_length) learn only through the ensemble's lm loss, and "
            "lm_loss_weight=0 leaves them untrained: set lm_loss_weight (e.g. 1.0) or drop the adapters"
        )
    return ensemble


def ensemble_config_from_dict(values: dict) -> EnsembleConfig:
    """An EnsembleConfig from plain values (an ensemble manifest's "ensemble"), unknown keys refused."""
    return _build(EnsembleConfig, values, "ensemble")


class MoEModelConfig:
    """seed-004's Hugging Face-style model config: every ModelConfig and MoEConfig field, and the names
    of SEED_ALIASES, as flat keywords (``MoEModelConfig(hidden_size=64, n_routed_experts=8)``), built into
    our ModelConfig and validated at construction. Fields read back flat: ``config.n_routed_experts``."""

    def __init__(self, **values):
        model_config = _build(ModelConfig, values, "MoEModelConfig")
        validate_model(model_config)
        self.__dict__["model_config"] = model_config

    def to_model_config(self) -> ModelConfig:
        return copy.deepcopy(self.model_config)

    def __getattr__(self, name: str):
        model_config = self.__dict__.get("model_config")  # absent while copy or pickle rebuilds the object
        for section in (model_config, model_config.moe) if model_config is not None else ():
            if name in {f.name for f in dataclasses.fields(section)}:
                return getattr(section, name)
        raise AttributeError(f"MoEModelConfig has no field {name!r}")

    def __setattr__(self, name: str, value) -> None:
        raise AttributeError(f"MoEModelConfig is built once and validated: pass {name}= to the constructor")

    def __repr__(self) -> str:
        return f"MoEModelConfig({self.model_config})"
