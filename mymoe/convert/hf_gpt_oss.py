"""GPT-OSS <-> mymoe state-dict adapter (Hugging Face ``GptOssForCausalLM``, bf16/fp32 tensors, not MXFP4).

    model.layers.N.self_attn.{q,k,v,o}_proj.{weight,bias}  = the same names (attention_bias)
    model.layers.N.self_attn.sinks                 [heads]            = the same name (attention_sinks)
    model.layers.N.mlp.router.{weight,bias}        [E, hidden], [E]   = mlp.gate.{weight,bias} (router_bias)
    model.layers.N.mlp.experts.gate_up_proj        [E, hidden, 2 ffn] = w_gate, w_up interleaved (even, odd columns)
    model.layers.N.mlp.experts.gate_up_proj_bias   [E, 2 ffn]         = w_gate_bias, w_up_bias interleaved
    model.layers.N.mlp.experts.down_proj           [E, ffn, hidden]   = w_down
    model.layers.N.mlp.experts.down_proj_bias      [E, hidden]        = w_down_bias (expert_mlp_bias)

GPT-OSS attends with a learned sink logit per head, on alternating sliding-window and full layers
(layer_types), and routes by the softmax of the top-k biased logits, which is our softmax of the biased
logits renormalised over the k chosen; its experts apply the clamped SwiGLU (expert_activation:
clamped_swiglu, swiglu_alpha, swiglu_limit). A model of ours without router or expert biases exports
them as zeros; one without sinks or with plain SwiGLU experts is refused (a zero sink still takes mass).
"""

from __future__ import annotations

import torch

from mymoe.convert.hf_experts import softmax_router_refusals
from mymoe.config import ModelConfig

ARCHITECTURE = "GptOssForCausalLM"
MODEL_TYPE = "gpt_oss"
ATTENTION_OPTIONS = {"attention_bias": (True,), "attention_sinks": (True,), "sliding_window": (True,)}
COMPUTES = ("router_bias",)  # and its experts' biases and clamped SwiGLU (hf.export_refusals)
READS_FUSED_EXPERTS = True  # hf.read_hf_tensors must not split gate_up_proj into halves: it is interleaved


def refusals(model: ModelConfig) -> list[str]:
    moe, problems = model.moe, []
    if not model.attention_sinks:
        problems.append(
            "attention_sinks=false: every GPT-OSS attention has a sink logit per head (train with "
            "attention_sinks: true)"
        )
    if moe.expert_activation != "clamped_swiglu":
        problems.append(
            f"expert_activation={moe.expert_activation!r}: GPT-OSS's experts use the clamped SwiGLU "
            f"(expert_activation: clamped_swiglu)"
        )
    problems += softmax_router_refusals(moe, "GPT-OSS", renormalises=True)
    if model.first_k_dense_replace:
        problems.append(f"first_k_dense_replace={model.first_k_dense_replace}: every GPT-OSS layer is MoE")
    if model.qkv_bias and not model.attention_bias:
        problems.append("qkv_bias without attention_bias: GPT-OSS biases q, k, v and o together")
    return problems


def config(model: ModelConfig) -> dict:
    moe = model.moe
    sliding = model.sliding_window is not None
    layer_types = model.layer_types or ["sliding_attention" if sliding else "full_attention"] * model.num_hidden_layers
    return {
        "model_type": MODEL_TYPE,
        "architectures": [ARCHITECTURE],
        "intermediate_size": moe.moe_intermediate_size,
        "num_local_experts": moe.n_routed_experts,
        "num_experts_per_tok": moe.num_experts_per_tok,
        "attention_bias": model.attention_bias,
        "sliding_window": model.sliding_window or 1,
        "layer_types": layer_types,
        "swiglu_alpha": moe.swiglu_alpha,
        "swiglu_limit": moe.swiglu_limit,
        "router_aux_loss_coef": moe.router_aux_loss_coef,
    }


def model_fields(hf: dict) -> tuple[dict, list[str]]:
    k = hf.get("num_experts_per_tok") or 4
    problems = (
        ["num_experts_per_tok=1: GPT-OSS weights the single expert by 1, ours by its softmax probability"]
        if k == 1
        else []
    )
    layer_types = hf.get("layer_types") or [
        "sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(hf["num_hidden_layers"])
    ]
    sliding = "sliding_attention" in layer_types
    fields = {
        "intermediate_size": hf["intermediate_size"],
        "attention_bias": bool(hf.get("attention_bias", True)),
        "attention_sinks": True,
        "sliding_window": hf.get("sliding_window") if sliding else None,
        "layer_types": layer_types if sliding else None,
        "moe": {
            "n_routed_experts": hf.get("num_local_experts") or 128,
            "num_experts_per_tok": k,
            "moe_intermediate_size": hf["intermediate_size"],
            "scoring_func": "softmax",
            "norm_topk_prob": True,
            "router_bias": True,
            "expert_mlp_bias": True,
            "expert_activation": "clamped_swiglu",
            "swiglu_alpha": float(hf.get("swiglu_alpha", 1.702)),
            "swiglu_limit": float(hf.get("swiglu_limit", 7.0)),
        },
    }
    return fields, problems


def mlp_to_hf(prefix: str, mlp: dict) -> dict:
    base = f"{prefix}.mlp"
    w_gate, w_up = mlp["experts.w_gate"], mlp["experts.w_up"]
    experts, hidden, ffn = w_gate.shape
    zeros = w_gate.new_zeros
    gate_bias, up_bias = (
        mlp.get("experts.w_gate_bias", zeros(experts, ffn)),
        mlp.get("experts.w_up_bias", zeros(experts, ffn)),
    )
    return {
        f"{base}.router.weight": mlp["gate.weight"],
        f"{base}.router.bias": mlp.get("gate.bias", zeros(experts)),
        f"{base}.experts.gate_up_proj": torch.stack([w_gate, w_up], dim=-1).reshape(experts, hidden, 2 * ffn),
        f"{base}.experts.gate_up_proj_bias": torch.stack([gate_bias, up_bias], dim=-1).reshape(experts, 2 * ffn),
        f"{base}.experts.down_proj": mlp["experts.w_down"],
        f"{base}.experts.down_proj_bias": mlp.get("experts.w_down_bias", zeros(experts, hidden)),
    }


def mlp_from_hf(prefix: str, tensors: dict, num_experts: int, is_moe: bool) -> dict:
    base = f"{prefix}.mlp"
    gate_up, gate_up_bias = tensors[f"{base}.experts.gate_up_proj"], tensors[f"{base}.experts.gate_up_proj_bias"]
    return {
        "gate.weight": tensors[f"{base}.router.weight"],
        "gate.bias": tensors[f"{base}.router.bias"],
        "experts.w_gate": gate_up[..., 0::2].contiguous(),
        "experts.w_up": gate_up[..., 1::2].contiguous(),
        "experts.w_gate_bias": gate_up_bias[:, 0::2].contiguous(),
        "experts.w_up_bias": gate_up_bias[:, 1::2].contiguous(),
        "experts.w_down": tensors[f"{base}.experts.down_proj"],
        "experts.w_down_bias": tensors[f"{base}.experts.down_proj_bias"],
    }
