"""Mixtral <-> mymoe state-dict adapter (Hugging Face ``MixtralForCausalLM``, the Hub's per-expert names).

    model.layers.N.block_sparse_moe.gate.weight          [E, hidden]  = mlp.gate.weight
    model.layers.N.block_sparse_moe.experts.e.w1.weight  [ffn, hidden] = mlp.experts.w_gate[e].T
    model.layers.N.block_sparse_moe.experts.e.w3.weight  [ffn, hidden] = mlp.experts.w_up[e].T
    model.layers.N.block_sparse_moe.experts.e.w2.weight  [hidden, ffn] = mlp.experts.w_down[e].T

Attention, norms, embedding and head keep their names. Mixtral routes with softmax, top-k, and always
renormalises the k weights; it has no shared experts, dense layers, group limits, scaling or bias.
"""

from __future__ import annotations

from mymoe.config import ModelConfig
from mymoe.convert.hf_experts import experts_from_hf, experts_to_hf, softmax_router_refusals

# Mixtral's own names for the gate, up and down projections of an expert
MIXTRAL_NAMES = ("w1", "w3", "w2")

ARCHITECTURE = "MixtralForCausalLM"
MODEL_TYPE = "mixtral"


def refusals(model: ModelConfig) -> list[str]:
    """Why this config cannot be written as Mixtral without computing something else (empty: it can)."""
    moe, problems = model.moe, []
    problems += softmax_router_refusals(moe, "Mixtral", renormalises=True, shared_hint=" (try qwen2_moe)")
    if model.first_k_dense_replace:
        problems.append(f"first_k_dense_replace={model.first_k_dense_replace}: every Mixtral layer is MoE")
    return problems


def config(model: ModelConfig) -> dict:
    return {
        "model_type": MODEL_TYPE,
        "architectures": [ARCHITECTURE],
        "intermediate_size": model.moe.moe_intermediate_size,
        "num_local_experts": model.moe.n_routed_experts,
        "num_experts_per_tok": model.moe.num_experts_per_tok,
        "router_jitter_noise": model.moe.router_jitter_noise,
        "router_aux_loss_coef": model.moe.router_aux_loss_coef,
        "sliding_window": None,
    }


def model_fields(hf: dict) -> tuple[dict, list[str]]:
    """(our model fields, refusals) from a Mixtral config.json."""
    k = hf.get("num_experts_per_tok", 2)
    problems = (
        ["num_experts_per_tok=1: Mixtral renormalises the single weight to 1, ours keeps the softmax probability"]
        if k == 1
        else []
    )
    if hf.get("sliding_window"):
        problems.append(f"sliding_window={hf['sliding_window']}: mymoe attends to the whole context")
    fields = {
        "intermediate_size": hf["intermediate_size"],
        "moe": {
            "n_routed_experts": hf["num_local_experts"],
            "num_experts_per_tok": k,
            "moe_intermediate_size": hf["intermediate_size"],
            "scoring_func": "softmax",
            "norm_topk_prob": True,
            "router_jitter_noise": hf.get("router_jitter_noise", 0.0),
        },
    }
    return fields, problems


def mlp_to_hf(prefix: str, mlp: dict) -> dict:
    """One layer's mlp tensors (names after ``mlp.``) -> Mixtral tensors (full names)."""
    return {
        f"{prefix}.block_sparse_moe.gate.weight": mlp["gate.weight"],
        **experts_to_hf(f"{prefix}.block_sparse_moe", mlp, MIXTRAL_NAMES),
    }


def mlp_from_hf(prefix: str, tensors: dict, num_experts: int, is_moe: bool) -> dict:
    """Mixtral tensors -> one layer's mlp tensors (names after ``mlp.``)."""
    base = f"{prefix}.block_sparse_moe"
    if f"{base}.gate.weight" not in tensors:  # transformers 5's in-memory names: mlp.experts.e.gate_proj ...
        tensors = {
            key.replace(f"{prefix}.mlp.", f"{base}.")
            .replace(".gate_proj.", ".w1.")
            .replace(".up_proj.", ".w3.")
            .replace(".down_proj.", ".w2."): value
            for key, value in tensors.items()
            if key.startswith(prefix)
        }
    return {"gate.weight": tensors[f"{base}.gate.weight"], **experts_from_hf(base, tensors, num_experts, MIXTRAL_NAMES)}
