"""Which layout fits, the math of ``python -m mymoe.plan`` (plan.py is its command line).

For every candidate layout (expert-parallel size, FSDP on or off, activation checkpointing, micro-batch)
it predicts what one rank holds at the peak of a training step, split into

    parameters      the rank's own copy or shard (fp32 master weights)
    gradients       fp32, same layout; under FSDP with gradient accumulation the unsharded ones pile
                    up between reductions (one reduce-scatter per step, not per micro-batch)
    optimizer       AdamW's two fp32 moments and its step counters
    gathered        FSDP only: the root's parameters kept gathered through the step, the blocks gathered
                    at once (1 + prefetch; all of them without reshard-after-forward) and one block's
                    unsharded gradients before its reduce-scatter
    activations     what backward keeps, per token and layer (below), plus the logits and their loss
    all-to-all      expert parallelism only: one MoE layer's send and receive buffers

and the all-to-all bytes each rank sends per step, which layouts fit the GPU and the one it recommends.
It reads the same config the trainer reads and builds the model on the meta device, so the parameter
shapes are the trainer's own; fsdp.py's rule (dim-0 shards, whole experts) gives each rank's share. Tests
hold the prediction against measured shards and against torch's memory profiler (tests/test_plan.py).

Activations per token of one block, in elements (d hidden, h heads of size hd, kv key/value heads, E
experts, k top-k, I expert width, Is shared-expert width), as the layers keep them for backward:
attention 4d + 3h*hd + 5kv*hd + h (norm, q/k/v, rotated q/k, GQA-expanded k/v, output, log-sum-exp);
MoE block 2d + 3E + 2k*I + 6*Is + 3k (norm, router scores, expert pre-activations, shared expert); the
all-to-all adds the k rows each token sends (k*d) when EP > 1. The head keeps 3 * vocab + 2d per token
(logits, log-softmax, their gradient at the start of backward; 6 * vocab with a candidate head). With
activation checkpointing a block keeps only its input (d), and backward holds either the head's or one
recomputed block's, not both. GELU experts keep one pre-activation instead of two (counted as two here).
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Optional
from unittest import mock

import torch

from mymoe.config import Config, ConfigError
from mymoe.model import MoECausalLM
from mymoe.parallel.fsdp import expert_shard_dim
from mymoe.peft import apply_peft

FP32 = 4
GIB = 2**30
RESERVE = 0.10  # of the GPU's memory kept free for the CUDA context, the allocator's slack and NCCL


@dataclass
class ParamShape:
    name: str
    shape: tuple
    expert: bool
    block: Optional[int]  # index of the FSDP unit (block) holding it; None for the root
    trainable: bool = True

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass
class Layout:
    gpus: int
    expert_parallel_size: int
    fsdp: bool
    activation_checkpointing: bool
    micro_batch_size: int

    def describe(self) -> str:
        return (
            f"EP {self.expert_parallel_size:<2} {'FSDP' if self.fsdp else 'repl'} "
            f"{'AC' if self.activation_checkpointing else '--'} mb {self.micro_batch_size}"
        )


@dataclass
class Prediction:
    layout: Layout
    bytes: dict = field(default_factory=dict)  # category -> bytes per rank at the peak
    alltoall_bytes_per_step: int = 0
    fits: bool = False
    step_scratch: int = 0  # AdamW's foreach temporaries: one moment-sized list for the largest group
    gradients_meet_activations: bool = False  # accumulation: earlier micro-batches' gradients stay

    @property
    def peak(self) -> int:
        """Backward turns activations into gradients, so with one micro-batch per step the two peak apart
        (activations at the start of backward, gradients at the optimizer step, with its temporaries)."""
        b = self.bytes
        always = b["parameters"] + b["optimizer"] + b["gathered"] + b["all-to-all"]
        if self.gradients_meet_activations:
            return always + b["gradients"] + b["activations"] + self.step_scratch
        return always + max(b["activations"], b["gradients"] + self.step_scratch)


def parameter_shapes(config: Config) -> list[ParamShape]:
    """Every parameter of the full model (all experts) with its FSDP unit, from a model on the meta device."""
    with torch.device("meta"), mock.patch.object(MoECausalLM, "reset_parameters", lambda self: None):
        model = MoECausalLM(config.model)
        if config.peft.enabled:
            apply_peft(
                model,
                config.peft.lora_rank,
                config.peft.lora_alpha,
                config.peft.lora_targets,
                config.peft.prefix_length,
            )
    units = {}
    for index, block in enumerate(list(model.model.layers) + ([model.mtp] if model.mtp is not None else [])):
        for param in block.parameters():
            units[id(param)] = index
    shapes, seen = [], set()
    for name, param in model.named_parameters():
        if id(param) in seen:
            continue
        seen.add(id(param))
        shapes.append(
            ParamShape(
                name, tuple(param.shape), getattr(param, "is_expert", False), units.get(id(param)), param.requires_grad
            )
        )
    return shapes


def shard_numel(shape: tuple, group: int) -> int:
    """Elements of rank 0's dim-0 shard (the largest) of a tensor sharded over `group` ranks."""
    if not shape:
        return 1
    rows = math.ceil(shape[0] / group)
    return rows * math.prod(shape[1:])


def held_numel(param: ParamShape, layout: Layout, sharded: bool) -> int:
    """Elements of `param` on rank 0 of the layout: whole or its FSDP shard."""
    shape = param.shape
    if param.expert:
        shape = (shape[0] // layout.expert_parallel_size, *shape[1:])
        group = layout.gpus // layout.expert_parallel_size
        if sharded and expert_shard_dim(shape, group) == 1:  # split inside each expert (fsdp.py)
            return math.prod(shape) // group
    else:
        group = layout.gpus
    return shard_numel(shape, group) if sharded and layout.gpus > 1 else math.prod(shape)


def model_state_bytes(shapes: list[ParamShape], layout: Layout) -> dict:
    """Parameters, gradients and AdamW state on one rank (fp32), as fsdp.py or the replicated layout lays them."""
    params = sum(held_numel(p, layout, layout.fsdp) for p in shapes) * FP32
    trainable = [p for p in shapes if p.trainable]
    grads = sum(held_numel(p, layout, layout.fsdp) for p in trainable) * FP32
    optimizer = sum(2 * held_numel(p, layout, layout.fsdp) + 1 for p in trainable) * FP32  # moments + step
    return {"parameters": params, "gradients": grads, "optimizer": optimizer}


def activation_elements_per_token(config: Config, layout: Layout) -> tuple[float, float, float]:
    """(elements one block keeps per token, the largest block's, the head's), per the module docstring."""
    m, moe = config.model, config.model.moe
    d = m.hidden_size
    if m.attention_type == "mla":
        heads_q = m.num_attention_heads * (m.qk_nope_head_dim + m.qk_rope_head_dim)
        heads_v = m.num_attention_heads * m.v_head_dim
        attention = 4 * d + 3 * heads_q + 3 * heads_v + m.kv_lora_rank + m.num_attention_heads
    else:
        h, kv, hd = m.num_attention_heads, m.num_key_value_heads, m.head_dim
        attention = 4 * d + 3 * h * hd + 5 * kv * hd + h
    shared = moe.shared_expert_intermediate_size or moe.n_shared_experts * moe.moe_intermediate_size
    moe_block = (
        2 * d
        + 3 * moe.n_routed_experts
        + 2 * moe.num_experts_per_tok * moe.moe_intermediate_size
        + 6 * shared
        + 3 * moe.num_experts_per_tok
    )
    if layout.expert_parallel_size > 1:
        moe_block += moe.num_experts_per_tok * d
    dense_block = 2 * d + 4 * m.intermediate_size
    dense_layers = m.first_k_dense_replace
    moe_layers = m.num_hidden_layers - dense_layers + m.num_nextn_predict_layers
    blocks = dense_layers * (attention + dense_block) + moe_layers * (attention + moe_block)
    largest = attention + (moe_block if moe_layers else dense_block)
    heads = 2 if m.candidate_head else 1  # the candidate head's logits are kept like the main head's
    return blocks, largest, 3 * m.vocab_size * heads + 2 * d


def activation_dtype_bytes(config: Config, on_gpu: bool) -> int:
    precision = config.train.precision
    bf16 = precision == "bf16" or (precision == "auto" and on_gpu) or config.parallel.fsdp_param_dtype == "bf16"
    return 2 if bf16 else FP32


def predict(
    config: Config, shapes: list[ParamShape], layout: Layout, gpu_memory: Optional[int] = None, on_gpu: bool = True
) -> Prediction:
    m, moe, train = config.model, config.model.moe, config.train
    tokens = layout.micro_batch_size * config.data.seq_len
    state = model_state_bytes(shapes, layout)
    result = Prediction(layout, dict(state))
    accumulation = train.gradient_accumulation_steps
    result.gradients_meet_activations = accumulation > 1
    groups: dict = {}
    for p in shapes:
        if p.trainable:
            key = (p.expert, len(p.shape) >= 2 and "norm" not in p.name)  # optim.parameter_groups' split
            groups[key] = groups.get(key, 0) + held_numel(p, layout, layout.fsdp) * FP32
    result.step_scratch = max(groups.values(), default=0)
    gathered = 0
    if layout.fsdp and layout.gpus > 1:
        whole = dataclasses.replace(layout, fsdp=False)
        units: dict = {}
        for p in shapes:
            units[p.block] = units.get(p.block, 0) + held_numel(p, whole, False) * FP32
        root = units.pop(None, 0)
        block = max(units.values(), default=0)
        param_bytes = FP32 if config.parallel.fsdp_param_dtype == "fp32" else 2
        ahead = 1 + config.parallel.fsdp_prefetch
        blocks_gathered = ahead * block if config.parallel.fsdp_reshard_after_forward else sum(units.values())
        gathered = (root + blocks_gathered) * param_bytes // FP32 + block  # + one block's unsharded grads
        if accumulation > 1:  # gradients kept unsharded between the reductions of a step
            result.bytes["gradients"] = sum(held_numel(p, whole, False) for p in shapes if p.trainable) * FP32
    result.bytes["gathered"] = gathered
    element = activation_dtype_bytes(config, on_gpu)
    blocks, largest, head = activation_elements_per_token(config, layout)
    if layout.activation_checkpointing:  # block inputs, then the head's or one recomputed block's, not both
        layers = m.num_hidden_layers + m.num_nextn_predict_layers
        per_token = layers * m.hidden_size * element + max(largest * element, head * FP32)
    else:
        per_token = blocks * element + head * FP32
    result.bytes["activations"] = int(tokens * per_token)
    ep = layout.expert_parallel_size
    routed = tokens * moe.num_experts_per_tok * m.hidden_size * element
    result.bytes["all-to-all"] = 2 * routed if ep > 1 else 0
    moe_layers = m.num_hidden_layers - m.first_k_dense_replace + m.num_nextn_predict_layers
    # dispatch and combine, forward and backward, of the rows bound for the other ep - 1 ranks
    result.alltoall_bytes_per_step = int(4 * moe_layers * routed * (ep - 1) / ep) * accumulation
    if gpu_memory is not None:
        result.fits = result.peak <= gpu_memory * (1 - RESERVE)
    return result


def candidate_layouts(config: Config, gpus: int, micro_batches: list[int]) -> list[Layout]:
    experts = config.model.moe.n_routed_experts
    sizes = [ep for ep in range(1, gpus + 1) if gpus % ep == 0 and experts % ep == 0]
    return [
        Layout(gpus, ep, fsdp, ac, mb)
        for ep in sizes
        for fsdp in (False, True)
        for ac in (False, True)
        for mb in micro_batches
    ]


def relative_throughput(prediction: Prediction) -> float:
    """A rough ordering of layouts that fit: tokens per micro-batch, less a third for recomputation,
    a little for FSDP's gathers and for all-to-all traffic."""
    layout = prediction.layout
    score = layout.micro_batch_size / (1.33 if layout.activation_checkpointing else 1.0)
    score *= 0.95 if layout.fsdp else 1.0
    score *= 1.0 - 0.05 * (layout.expert_parallel_size - 1) / max(layout.expert_parallel_size, 1)
    return score


def plan(
    config: Config, gpus: int, gpu_memory: int, micro_batches: list[int]
) -> tuple[list[Prediction], Optional[Prediction]]:
    shapes = parameter_shapes(config)
    predictions = [
        predict(config, shapes, layout, gpu_memory) for layout in candidate_layouts(config, gpus, micro_batches)
    ]
    fitting = [p for p in predictions if p.fits]
    best = max(fitting, key=lambda p: (relative_throughput(p), -p.peak)) if fitting else None
    return predictions, best


def parse_bytes(text: str) -> int:
    """ "80GB" (decimal units) or "141GiB" (binary) -> bytes."""
    match = re.fullmatch(r"\s*([0-9.]+)\s*([KMGT])(i?)B\s*", text, re.IGNORECASE)
    if not match:
        raise ConfigError(f"--gpu-memory {text!r}: write a size such as 80GB or 141GiB")
    base = 1024 if match.group(3) else 1000
    return int(float(match.group(1)) * base ** ("KMGT".index(match.group(2).upper()) + 1))


CATEGORIES = ("parameters", "gradients", "optimizer", "gathered", "activations", "all-to-all")


def format_table(predictions: list[Prediction], best: Optional[Prediction]) -> str:
    header = (
        f"{'layout':24s}" + "".join(f"{name:>12s}" for name in CATEGORIES) + f"{'peak':>10s}{'a2a/step':>11s}  fits"
    )
    lines = [header, "-" * len(header)]
    for p in predictions:
        mark = "  <- recommended" if p is best else ""
        lines.append(
            f"{p.layout.describe():24s}"
            + "".join(f"{p.bytes[name] / GIB:11.2f}G" for name in CATEGORIES)
            + f"{p.peak / GIB:9.1f}G{p.alltoall_bytes_per_step / GIB:10.2f}G  {'yes' if p.fits else 'no '}{mark}"
        )
    return "\n".join(lines)
