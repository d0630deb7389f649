"""Qwen3-MoE <-> mymoe state-dict adapter (Hugging Face ``Qwen3MoeForCausalLM``, the Hub's names).

    model.layers.N.self_attn.{q,k}_norm.weight             [head_dim]    = the same names (qk_norm: head)
    model.layers.N.self_attn.{q,k,v,o}_proj.bias           (attention_bias) = the same names
    model.layers.N.mlp.gate.weight                         [E, hidden]   = mlp.gate.weight
    model.layers.N.mlp.experts.e.{gate,up}_proj.weight     [ffn, hidden] = mlp.experts.w_{gate,up}[e].T
    model.layers.N.mlp.experts.e.down_proj.weight          [hidden, ffn] = mlp.experts.w_down[e].T
    model.layers.N.mlp.{gate,up,down}_proj (mlp_only_layers) = the dense SwiGLU of first_k_dense_replace

Qwen3-MoE is Qwen2-MoE without the shared expert and with every query and key head RMS-normalised
before rotary (our ``qk_norm: head``, same eps as the other norms); its head_dim is free of
hidden_size / num_attention_heads. Routing: softmax, top-k, renormalised when norm_topk_prob.
"""

from __future__ import annotations

from mymoe.config import ModelConfig
from mymoe.convert.hf_experts import dense_mlp_from_hf, experts_from_hf, experts_to_hf, softmax_router_refusals
from mymoe.convert.hf_qwen2_moe import dense_layers

ARCHITECTURE = "Qwen3MoeForCausalLM"
MODEL_TYPE = "qwen3_moe"
ATTENTION_OPTIONS = {"attention_bias": (True,), "qk_norm": ("head",)}


def refusals(model: ModelConfig) -> list[str]:
    moe, problems = model.moe, []
    if model.qk_norm != "head":
        problems.append(
            f"qk_norm={model.qk_norm!r}: every Qwen3-MoE attention RMS-normalises each query and key "
            f"head (train with qk_norm: head, or export as mixtral / qwen2_moe)"
        )
    problems += softmax_router_refusals(moe, "Qwen3-MoE", renormalises=False, shared_hint=" (try qwen2_moe)")
    return problems


def config(model: ModelConfig) -> dict:
    moe = model.moe
    return {
        "model_type": MODEL_TYPE,
        "architectures": [ARCHITECTURE],
        "intermediate_size": model.intermediate_size,
        "moe_intermediate_size": moe.moe_intermediate_size,
        "num_experts": moe.n_routed_experts,
        "num_experts_per_tok": moe.num_experts_per_tok,
        "norm_topk_prob": moe.norm_topk_prob,
        "decoder_sparse_step": 1,
        "mlp_only_layers": list(range(model.first_k_dense_replace)),
        "attention_bias": model.attention_bias,
        "use_sliding_window": False,
        "router_aux_loss_coef": moe.router_aux_loss_coef,
    }


def model_fields(hf: dict) -> tuple[dict, list[str]]:
    problems = []
    dense = dense_layers(hf, problems)
    if hf.get("use_sliding_window"):
        problems.append("use_sliding_window=true: mymoe's Qwen3-MoE import attends to the whole context")
    k = hf.get("num_experts_per_tok", 8)
    norm = bool(hf.get("norm_topk_prob", False))
    if k == 1 and norm:
        problems.append(
            "norm_topk_prob=true with num_experts_per_tok=1: the weight would be 1, ours keeps the probability"
        )
    fields = {
        "intermediate_size": hf["intermediate_size"],
        "first_k_dense_replace": len(dense),
        "attention_bias": bool(hf.get("attention_bias", False)),
        "qk_norm": "head",
        "moe": {
            "n_routed_experts": hf.get("num_experts") or hf["num_local_experts"],
            "num_experts_per_tok": k,
            "moe_intermediate_size": hf["moe_intermediate_size"],
            "scoring_func": "softmax",
            "norm_topk_prob": norm,
        },
    }
    return fields, problems


def mlp_to_hf(prefix: str, mlp: dict) -> dict:
    base = f"{prefix}.mlp"
    if "experts.w_gate" not in mlp:  # a dense layer: same names
        return {f"{base}.{name}": value for name, value in mlp.items()}
    return {f"{base}.gate.weight": mlp["gate.weight"], **experts_to_hf(base, mlp)}


def mlp_from_hf(prefix: str, tensors: dict, num_experts: int, is_moe: bool) -> dict:
    base = f"{prefix}.mlp"
    if not is_moe:
        return dense_mlp_from_hf(base, tensors)
    return {"gate.weight": tensors[f"{base}.gate.weight"], **experts_from_hf(base, tensors, num_experts)}
