"""OLMoE <-> mymoe state-dict adapter (Hugging Face ``OlmoeForCausalLM``, the Hub's names).

    model.layers.N.self_attn.q_norm.weight             [heads * head_dim]    = the same name (qk_norm: full)
    model.layers.N.self_attn.k_norm.weight             [kv_heads * head_dim] = the same name
    model.layers.N.self_attn.{q,k,v,o}_proj.bias       (attention_bias)      = the same names
    model.layers.N.mlp.gate.weight                     [E, hidden]   = mlp.gate.weight
    model.layers.N.mlp.experts.e.{gate,up}_proj.weight [ffn, hidden] = mlp.experts.w_{gate,up}[e].T
    model.layers.N.mlp.experts.e.down_proj.weight      [hidden, ffn] = mlp.experts.w_down[e].T

OLMoE RMS-normalises the whole query and key projections (not each head: our ``qk_norm: full``) before
rotary, then clamps queries, keys and values to [-clip_qkv, clip_qkv] when clip_qkv is set. Every layer
is MoE, with softmax top-k routing renormalised when norm_topk_prob, and no shared expert; its
``intermediate_size`` is the experts' width.
"""

from __future__ import annotations

from mymoe.config import ModelConfig
from mymoe.convert.hf_experts import experts_from_hf, experts_to_hf, softmax_router_refusals

ARCHITECTURE = "OlmoeForCausalLM"
MODEL_TYPE = "olmoe"
ATTENTION_OPTIONS = {"attention_bias": (True,), "qk_norm": ("full",), "clip_qkv": (True,)}


def refusals(model: ModelConfig) -> list[str]:
    moe, problems = model.moe, []
    if model.qk_norm != "full":
        problems.append(
            f"qk_norm={model.qk_norm!r}: every OLMoE attention RMS-normalises its whole query and key "
            f"projections (train with qk_norm: full)"
        )
    if model.head_dim * model.num_attention_heads != model.hidden_size:
        problems.append(
            f"head_dim={model.head_dim} with {model.num_attention_heads} heads is not hidden_size="
            f"{model.hidden_size} wide: OLMoE sizes its query norm by hidden_size"
        )
    problems += softmax_router_refusals(moe, "OLMoE", renormalises=False, shared_hint=" (try qwen2_moe)")
    if model.first_k_dense_replace:
        problems.append(f"first_k_dense_replace={model.first_k_dense_replace}: every OLMoE layer is MoE")
    return problems


def config(model: ModelConfig) -> dict:
    moe = model.moe
    return {
        "model_type": MODEL_TYPE,
        "architectures": [ARCHITECTURE],
        "intermediate_size": moe.moe_intermediate_size,
        "num_experts": moe.n_routed_experts,
        "num_experts_per_tok": moe.num_experts_per_tok,
        "norm_topk_prob": moe.norm_topk_prob,
        "attention_bias": model.attention_bias,
        "clip_qkv": model.clip_qkv,
        "router_aux_loss_coef": moe.router_aux_loss_coef,
    }


def model_fields(hf: dict) -> tuple[dict, list[str]]:
    k = hf.get("num_experts_per_tok", 8)
    norm = bool(hf.get("norm_topk_prob", False))
    problems = []
    if k == 1 and norm:
        problems.append(
            "norm_topk_prob=true with num_experts_per_tok=1: the weight would be 1, ours keeps the probability"
        )
    heads = hf["num_attention_heads"]
    if hf.get("head_dim") and hf["head_dim"] * heads != hf["hidden_size"]:
        problems.append(
            f"head_dim={hf['head_dim']} with {heads} heads is not hidden_size wide: transformers' OLMoE "
            f"then sizes its q/k norms inconsistently"
        )
    fields = {
        "intermediate_size": hf["intermediate_size"],
        "attention_bias": bool(hf.get("attention_bias", False)),
        "qk_norm": "full",
        "clip_qkv": hf.get("clip_qkv"),
        "moe": {
            "n_routed_experts": hf.get("num_experts") or hf["num_local_experts"],
            "num_experts_per_tok": k,
            "moe_intermediate_size": hf["intermediate_size"],
            "scoring_func": "softmax",
            "norm_topk_prob": norm,
        },
    }
    return fields, problems


def mlp_to_hf(prefix: str, mlp: dict) -> dict:
    base = f"{prefix}.mlp"
    return {f"{base}.gate.weight": mlp["gate.weight"], **experts_to_hf(base, mlp)}


def mlp_from_hf(prefix: str, tensors: dict, num_experts: int, is_moe: bool) -> dict:
    base = f"{prefix}.mlp"
    return {"gate.weight": tensors[f"{base}.gate.weight"], **experts_from_hf(base, tensors, num_experts)}
