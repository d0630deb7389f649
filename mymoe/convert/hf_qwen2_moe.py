"""Qwen2-MoE <-> mymoe state-dict adapter (Hugging Face ``Qwen2MoeForCausalLM``, the Hub's names).

    model.layers.N.mlp.gate.weight                          [E, hidden]  = mlp.gate.weight
    model.layers.N.mlp.experts.e.gate_proj.weight           [ffn, hidden] = mlp.experts.w_gate[e].T
    model.layers.N.mlp.experts.e.up_proj.weight             [ffn, hidden] = mlp.experts.w_up[e].T
    model.layers.N.mlp.experts.e.down_proj.weight           [hidden, ffn] = mlp.experts.w_down[e].T
    model.layers.N.mlp.shared_expert.{gate,up,down}_proj    = mlp.shared_experts.{gate,up,down}_proj
    model.layers.N.mlp.shared_expert_gate.weight            [1, hidden]  = mlp.shared_expert_gate.weight
    model.layers.N.mlp.{gate,up,down}_proj (mlp_only_layers) = the dense SwiGLU of first_k_dense_replace

Qwen2-MoE routes with softmax and top-k, renormalises when norm_topk_prob, and always adds one shared
expert scaled by sigmoid(shared_expert_gate(x)). Its q/k/v projections carry biases when qkv_bias (every
released Qwen1.5-MoE / Qwen2-MoE), ours when the model's qkv_bias is set.
"""

from __future__ import annotations

from mymoe.config import ModelConfig
from mymoe.convert.hf_experts import dense_mlp_from_hf, experts_from_hf, experts_to_hf

ARCHITECTURE = "Qwen2MoeForCausalLM"
MODEL_TYPE = "qwen2_moe"
ATTENTION_OPTIONS = {"qkv_bias": (True,)}


def refusals(model: ModelConfig) -> list[str]:
    moe, problems = model.moe, []
    if moe.scoring_func != "softmax":
        problems.append(f"scoring_func={moe.scoring_func!r}: Qwen2-MoE scores experts with softmax")
    if moe.norm_topk_prob and moe.num_experts_per_tok == 1:
        problems.append(
            "norm_topk_prob=true with num_experts_per_tok=1: Qwen2-MoE renormalises the single weight "
            "to 1, ours keeps the probability (set norm_topk_prob: false, which computes the same)"
        )
    if moe.n_shared_experts == 0:
        problems.append("n_shared_experts=0: every Qwen2-MoE MoE layer has a shared expert (try mixtral)")
    elif not moe.shared_expert_gate:
        problems.append("shared_expert_gate=false: Qwen2-MoE always scales its shared expert by a sigmoid gate")
    return problems


def config(model: ModelConfig) -> dict:
    moe = model.moe
    shared = moe.shared_expert_intermediate_size or moe.n_shared_experts * moe.moe_intermediate_size
    return {
        "model_type": MODEL_TYPE,
        "architectures": [ARCHITECTURE],
        "intermediate_size": model.intermediate_size,
        "moe_intermediate_size": moe.moe_intermediate_size,
        "shared_expert_intermediate_size": shared,
        "num_experts": moe.n_routed_experts,
        "num_experts_per_tok": moe.num_experts_per_tok,
        "norm_topk_prob": moe.norm_topk_prob,
        "decoder_sparse_step": 1,
        "mlp_only_layers": list(range(model.first_k_dense_replace)),
        "qkv_bias": model.qkv_bias,
        "use_sliding_window": False,
        "router_aux_loss_coef": moe.router_aux_loss_coef,
    }


def dense_layers(hf: dict, problems: list) -> list[int]:
    """The layers with a dense MLP (mlp_only_layers, and those decoder_sparse_step skips), Qwen-style."""
    layers = hf["num_hidden_layers"]
    step = hf.get("decoder_sparse_step", 1)
    dense = sorted(set(hf.get("mlp_only_layers") or []) | {i for i in range(layers) if (i + 1) % step})
    if dense != list(range(len(dense))):
        problems.append(
            f"dense layers {dense} (mlp_only_layers, decoder_sparse_step={step}): mymoe's dense "
            f"layers are the first first_k_dense_replace ones"
        )
    return dense


def model_fields(hf: dict) -> tuple[dict, list[str]]:
    problems = []
    dense = dense_layers(hf, problems)
    if hf.get("use_sliding_window"):
        problems.append("use_sliding_window=true: mymoe attends to the whole context")
    k = hf.get("num_experts_per_tok", 4)
    norm = hf.get("norm_topk_prob", False)
    if k == 1 and norm:
        problems.append(
            "norm_topk_prob=true with num_experts_per_tok=1: the weight would be 1, ours keeps the probability"
        )
    fields = {
        "intermediate_size": hf["intermediate_size"],
        "first_k_dense_replace": len(dense),
        "qkv_bias": bool(hf.get("qkv_bias", True)),
        "moe": {
            "n_routed_experts": hf["num_experts"],
            "num_experts_per_tok": k,
            "moe_intermediate_size": hf["moe_intermediate_size"],
            "n_shared_experts": 1,
            "shared_expert_intermediate_size": hf["shared_expert_intermediate_size"],
            "shared_expert_gate": True,
            "scoring_func": "softmax",
            "norm_topk_prob": norm,
        },
    }
    return fields, problems


def mlp_to_hf(prefix: str, mlp: dict) -> dict:
    base = f"{prefix}.mlp"
    if "experts.w_gate" not in mlp:  # a dense layer: same names
        return {f"{base}.{name}": value for name, value in mlp.items()}
    out = {
        f"{base}.gate.weight": mlp["gate.weight"],
        f"{base}.shared_expert_gate.weight": mlp["shared_expert_gate.weight"],
    }
    for proj in ("gate_proj", "up_proj", "down_proj"):
        out[f"{base}.shared_expert.{proj}.weight"] = mlp[f"shared_experts.{proj}.weight"]
    return {**out, **experts_to_hf(base, mlp)}


def mlp_from_hf(prefix: str, tensors: dict, num_experts: int, is_moe: bool) -> dict:
    base = f"{prefix}.mlp"
    if not is_moe:
        return dense_mlp_from_hf(base, tensors)
    mlp = {
        "gate.weight": tensors[f"{base}.gate.weight"],
        "shared_expert_gate.weight": tensors[f"{base}.shared_expert_gate.weight"],
        **experts_from_hf(base, tensors, num_experts),
    }
    for proj in ("gate_proj", "up_proj", "down_proj"):
        mlp[f"shared_experts.{proj}.weight"] = tensors[f"{base}.shared_expert.{proj}.weight"]
    return mlp
