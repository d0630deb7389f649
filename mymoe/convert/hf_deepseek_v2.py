"""DeepSeek-V2 / V2-Lite <-> mymoe state-dict adapter (Hugging Face ``DeepseekV2ForCausalLM``, the Hub's names).

The tensors are DeepSeek-V3's (see hf_deepseek_v3): multi-head latent attention with or without the
query bottleneck (q_lora_rank null is V2-Lite), the same rotary row permutation (transformers rotates
adjacent pairs as complex numbers, which scores exactly like our half-split rotation of the permuted
rows), experts, dense first layers and ungated shared experts; the router has no correction bias.

Routing differs from V3: softmax scores; ``topk_method: greedy`` picks the top k of all experts,
``group_limited_greedy`` only among the topk_group groups whose best expert scores highest (our
n_group / topk_group under softmax); the k scores are never renormalised and are multiplied by
routed_scaling_factor.
"""

from __future__ import annotations

from mymoe.config import ModelConfig
from mymoe.convert.hf_deepseek_v3 import attention_from_hf, attention_to_hf  # noqa: F401 (hf.py calls them)
from mymoe.convert.hf_deepseek_v3 import (
    latent_attention_config,
    latent_attention_fields,
    latent_norm_and_rope_problems,
)
from mymoe.convert.hf_deepseek_v3 import mlp_to_hf as v3_mlp_to_hf
from mymoe.convert.hf_experts import dense_mlp_from_hf, experts_from_hf

ARCHITECTURE = "DeepseekV2ForCausalLM"
MODEL_TYPE = "deepseek_v2"
COMPUTES = ("mla", "group_limit", "routed_scaling")  # beyond Mixtral's routing (hf.export_refusals)


def refusals(model: ModelConfig) -> list[str]:
    moe, problems = model.moe, []
    if model.attention_type != "mla":
        problems.append(
            "attention_type=gqa: DeepSeek-V2 uses multi-head latent attention (train with attention_type: "
            "mla; a GQA model with softmax routing exports as mixtral, qwen2_moe or qwen3_moe)"
        )
        return problems
    if moe.scoring_func != "softmax":
        problems.append(
            f"scoring_func={moe.scoring_func!r}: DeepSeek-V2 scores experts with softmax (export as deepseek_v3)"
        )
    if moe.norm_topk_prob and moe.num_experts_per_tok > 1:
        problems.append(
            "norm_topk_prob=true: DeepSeek-V2 never renormalises the top-k scores (train with "
            "norm_topk_prob: false, or export as deepseek_v3 with sigmoid scoring)"
        )
    if moe.shared_expert_gate:
        problems.append("shared_expert_gate=true: DeepSeek-V2's shared experts have no gate (try qwen2_moe)")
    shared = moe.n_shared_experts * moe.moe_intermediate_size
    if moe.shared_expert_intermediate_size not in (None, shared):
        problems.append(
            f"shared_expert_intermediate_size={moe.shared_expert_intermediate_size}: DeepSeek-V2's shared "
            f"experts are n_shared_experts * moe_intermediate_size = {shared} wide"
        )
    return problems + latent_norm_and_rope_problems(model.rms_norm_eps, model.rope_scaling)


def config(model: ModelConfig) -> dict:
    moe = model.moe
    limited = moe.n_group > 1 and moe.topk_group < moe.n_group
    return {
        "model_type": MODEL_TYPE,
        "architectures": [ARCHITECTURE],
        **latent_attention_config(model),
        "mlp_bias": False,
        "moe_intermediate_size": moe.moe_intermediate_size,
        "n_routed_experts": moe.n_routed_experts,
        "num_experts_per_tok": moe.num_experts_per_tok,
        "n_shared_experts": moe.n_shared_experts,
        "routed_scaling_factor": moe.routed_scaling_factor,
        "norm_topk_prob": False,
        "topk_method": "group_limited_greedy" if limited else "greedy",
        "n_group": moe.n_group if limited else None,
        "topk_group": moe.topk_group if limited else None,
    }


def model_fields(hf: dict) -> tuple[dict, list[str]]:
    method = hf.get("topk_method") or "greedy"
    problems = latent_norm_and_rope_problems(
        hf.get("rms_norm_eps", 1e-6), hf.get("rope_parameters") or hf.get("rope_scaling")
    )
    if method not in ("greedy", "group_limited_greedy"):
        problems.append(
            f"topk_method={method!r}: transformers' DeepSeek-V2 routes with greedy or group_limited_greedy only"
        )
    for flag in ("attention_bias", "mlp_bias"):
        if hf.get(flag):
            problems.append(f"{flag}=true: mymoe's latent attention and MLPs have no biases")
    limited = method == "group_limited_greedy"
    experts = hf.get("n_routed_experts", 64)
    fields = {
        **latent_attention_fields(hf),
        "moe": {
            "n_routed_experts": experts,
            "num_experts_per_tok": hf.get("num_experts_per_tok") or 6,
            "moe_intermediate_size": hf["moe_intermediate_size"],
            "n_shared_experts": hf.get("n_shared_experts") or 0,
            "scoring_func": "softmax",
            "norm_topk_prob": False,
            "routed_scaling_factor": float(hf.get("routed_scaling_factor", 1.0)),
            "n_group": (hf.get("n_group") or 1) if limited else 1,
            "topk_group": (hf.get("topk_group") or 1) if limited else 1,
        },
    }
    return fields, problems


def mlp_to_hf(prefix: str, mlp: dict) -> dict:
    tensors = v3_mlp_to_hf(prefix, mlp)
    tensors.pop(f"{prefix}.mlp.gate.e_score_correction_bias", None)  # checked to be zero: V2 has no bias
    return tensors


def mlp_from_hf(prefix: str, tensors: dict, num_experts: int, is_moe: bool) -> dict:
    base = f"{prefix}.mlp"
    if not is_moe:
        return dense_mlp_from_hf(base, tensors)
    mlp = {"gate.weight": tensors[f"{base}.gate.weight"], **experts_from_hf(base, tensors, num_experts)}
    shared = f"{base}.shared_experts.gate_proj.weight"
    if shared in tensors and tensors[shared].numel():  # n_shared_experts=0 leaves empty or no tensors
        for proj in ("gate_proj", "up_proj", "down_proj"):
            mlp[f"shared_experts.{proj}.weight"] = tensors[f"{base}.shared_experts.{proj}.weight"]
    return mlp
