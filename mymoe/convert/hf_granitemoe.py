"""Granite-MoE <-> mymoe state-dict adapter (Hugging Face ``GraniteMoeForCausalLM``, the Hub's names).

    model.layers.N.block_sparse_moe.router.layer.weight   [E, hidden]         = mlp.gate.weight
    model.layers.N.block_sparse_moe.input_linear.weight   [E, 2 ffn, hidden]  = [w_gate[e].T ; w_up[e].T]
    model.layers.N.block_sparse_moe.output_linear.weight  [E, hidden, ffn]    = w_down[e].T

(transformers 5 holds the same tensors in memory as router.weight, experts.gate_up_proj and
experts.down_proj; both are read.) Granite is Mixtral with four scalings, each an option of our model:
embeddings times embedding_multiplier, every attention and MLP output times residual_multiplier before
its residual add, attention_multiplier as the softmax scale instead of 1 / sqrt(head_dim), logits
divided by logits_scaling. It routes by the softmax of the top-k logits, which is our softmax scores
renormalised over the k chosen (norm_topk_prob); ``intermediate_size`` is the experts' width.
"""

from __future__ import annotations

import torch

from mymoe.convert.hf_experts import softmax_router_refusals
from mymoe.config import ModelConfig

ARCHITECTURE = "GraniteMoeForCausalLM"
MODEL_TYPE = "granitemoe"
ATTENTION_OPTIONS = {"attention_bias": (True,), "attention_multiplier": (True,)}
COMPUTES = ("granite_scaling",)


def refusals(model: ModelConfig) -> list[str]:
    moe, problems = model.moe, []
    problems += softmax_router_refusals(moe, "Granite-MoE", renormalises=True)
    if model.first_k_dense_replace:
        problems.append(f"first_k_dense_replace={model.first_k_dense_replace}: every Granite-MoE layer is MoE")
    return problems


def config(model: ModelConfig) -> dict:
    moe = model.moe
    scale = model.attention_multiplier if model.attention_multiplier is not None else model.head_dim**-0.5
    return {
        "model_type": MODEL_TYPE,
        "architectures": [ARCHITECTURE],
        "intermediate_size": moe.moe_intermediate_size,
        "num_local_experts": moe.n_routed_experts,
        "num_experts_per_tok": moe.num_experts_per_tok,
        "attention_bias": model.attention_bias,
        "attention_multiplier": scale,
        "embedding_multiplier": model.embedding_multiplier,
        "residual_multiplier": model.residual_multiplier,
        "logits_scaling": model.logits_scaling,
        "router_aux_loss_coef": moe.router_aux_loss_coef,
    }


def model_fields(hf: dict) -> tuple[dict, list[str]]:
    k = hf.get("num_experts_per_tok") or 2
    problems = (
        ["num_experts_per_tok=1: Granite-MoE weights the single expert by 1, ours by its softmax probability"]
        if k == 1
        else []
    )
    fields = {
        "intermediate_size": hf["intermediate_size"],
        "attention_bias": bool(hf.get("attention_bias", False)),
        "attention_multiplier": float(hf.get("attention_multiplier") or 1.0),
        "embedding_multiplier": float(hf.get("embedding_multiplier") or 1.0),
        "residual_multiplier": float(hf.get("residual_multiplier") or 1.0),
        "logits_scaling": float(hf.get("logits_scaling") or 1.0),
        "moe": {
            "n_routed_experts": hf.get("num_local_experts") or 8,
            "num_experts_per_tok": k,
            "moe_intermediate_size": hf["intermediate_size"],
            "scoring_func": "softmax",
            "norm_topk_prob": True,
        },
    }
    return fields, problems


def mlp_to_hf(prefix: str, mlp: dict) -> dict:
    base = f"{prefix}.block_sparse_moe"
    gate_up = torch.cat([mlp["experts.w_gate"], mlp["experts.w_up"]], dim=2).transpose(1, 2)  # [E, 2 ffn, hidden]
    return {
        f"{base}.router.layer.weight": mlp["gate.weight"],
        f"{base}.input_linear.weight": gate_up,
        f"{base}.output_linear.weight": mlp["experts.w_down"].transpose(1, 2),
    }


def mlp_from_hf(prefix: str, tensors: dict, num_experts: int, is_moe: bool) -> dict:
    base = f"{prefix}.block_sparse_moe"
    router = tensors.get(f"{base}.router.layer.weight", tensors.get(f"{base}.router.weight"))
    gate_up = tensors.get(f"{base}.input_linear.weight", tensors.get(f"{base}.experts.gate_up_proj"))
    down = tensors.get(f"{base}.output_linear.weight", tensors.get(f"{base}.experts.down_proj"))
    if router is None or gate_up is None or down is None:
        raise KeyError(f"{base}.router.layer.weight / input_linear.weight / output_linear.weight")
    w_gate, w_up = gate_up.transpose(1, 2).chunk(2, dim=2)  # [E, hidden, ffn] each
    return {
        "gate.weight": router,
        "experts.w_gate": w_gate.contiguous(),
        "experts.w_up": w_up.contiguous(),
        "experts.w_down": down.transpose(1, 2).contiguous(),
    }
