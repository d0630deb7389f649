"""DeepSeek-V3 <-> mymoe state-dict adapter (Hugging Face ``DeepseekV3ForCausalLM``, the Hub's names).

    model.layers.N.self_attn.{q_proj | q_a_proj, q_a_layernorm, q_b_proj}  = the same names, rotary rows interleaved
    model.layers.N.self_attn.kv_a_proj_with_mqa.weight  = the same name, rotary rows interleaved
    model.layers.N.self_attn.{kv_a_layernorm, kv_b_proj, o_proj}            = the same names
    model.layers.N.mlp.gate.weight                       [E, hidden]   = mlp.gate.weight
    model.layers.N.mlp.gate.e_score_correction_bias      [E]           = mlp.gate.expert_bias
    model.layers.N.mlp.experts.e.{gate,up}_proj.weight   [ffn, hidden] = mlp.experts.w_{gate,up}[e].T
    model.layers.N.mlp.experts.e.down_proj.weight        [hidden, ffn] = mlp.experts.w_down[e].T
    model.layers.N.mlp.shared_experts.{gate,up,down}_proj              = mlp.shared_experts.{gate,up,down}_proj
    model.layers.N.mlp.{gate,up,down}_proj (first_k_dense_replace)     = the dense SwiGLU

Rotary layout. mymoe rotates the qk_rope_head_dim part of each query and of the shared key in the
half-split layout (dimension i pairs with i + rope/2). Exports write ``rope_interleave: true``, the
layout of DeepSeek's own checkpoints that every runtime assumes: transformers then rotates pairs
(2i, 2i + 1) and lays the result out de-interleaved, so writing our rotary row i at 2i and row
i + rope/2 at 2i + 1 (in q_proj / q_b_proj per head, and in kv_a_proj_with_mqa) computes exactly our
scores. Imports undo that permutation, or take the rows as they are when ``rope_interleave: false``
(transformers then uses the half-split layout, as we do).

Routing is the same computation: sigmoid scores, e_score_correction_bias added for selection only
(group scores included), a group scored by the sum of its two best experts, the chosen scores
renormalised when norm_topk_prob and then multiplied by routed_scaling_factor, and ungated shared
experts of n_shared_experts * moe_intermediate_size. The multi-token prediction module is not part of
transformers' model (it runs num_hidden_layers layers and ignores the rest), so it is neither written
nor read.
"""

from __future__ import annotations

import torch

from mymoe.config import ModelConfig
from mymoe.convert.hf_experts import dense_mlp_from_hf, experts_from_hf, experts_to_hf

ARCHITECTURE = "DeepseekV3ForCausalLM"
MODEL_TYPE = "deepseek_v3"
WHY = (
    "DeepSeek-V3 in transformers uses multi-head latent attention (an RMS-normalised compressed KV and one "
    "shared rotary key), which mymoe's grouped-query attention cannot be written as, so the logits would "
    "differ"
)
# transformers builds q_a_layernorm and kv_a_layernorm with RMSNorm's default eps, not rms_norm_eps
LATENT_NORM_EPS = 1e-6


def refusals(model: ModelConfig) -> list[str]:
    moe, problems = model.moe, []
    if model.attention_type != "mla":
        problems.append(
            WHY + " (train with attention_type: mla to export as deepseek_v3; with softmax scoring "
            "and n_group=1 a GQA model exports as mixtral or qwen2_moe)"
        )
        return problems
    if moe.scoring_func != "sigmoid":
        problems.append(f"scoring_func={moe.scoring_func!r}: DeepSeek-V3 scores experts with sigmoid")
    if moe.n_routed_experts // moe.n_group < 2:
        problems.append(
            f"n_group={moe.n_group} leaves {moe.n_routed_experts // moe.n_group} expert per group: "
            f"DeepSeek-V3 scores a group by its two best experts (use n_group <= "
            f"{moe.n_routed_experts // 2})"
        )
    if moe.norm_topk_prob and moe.num_experts_per_tok == 1:
        problems.append(
            "norm_topk_prob=true with num_experts_per_tok=1: DeepSeek-V3 renormalises the single weight "
            "to 1, ours keeps the score (set norm_topk_prob: false, which computes the same)"
        )
    if moe.shared_expert_gate:
        problems.append("shared_expert_gate=true: DeepSeek-V3's shared experts have no gate (try qwen2_moe)")
    shared = moe.n_shared_experts * moe.moe_intermediate_size
    if moe.shared_expert_intermediate_size not in (None, shared):
        problems.append(
            f"shared_expert_intermediate_size={moe.shared_expert_intermediate_size}: DeepSeek-V3's shared "
            f"experts are n_shared_experts * moe_intermediate_size = {shared} wide"
        )
    problems += latent_norm_and_rope_problems(model.rms_norm_eps, model.rope_scaling)
    return problems


def latent_norm_and_rope_problems(rms_norm_eps: float, rope_scaling) -> list[str]:
    """What differs both ways: the latent norms' eps and an mscale_all_dim outside YaRN."""
    problems = []
    if rms_norm_eps != LATENT_NORM_EPS:
        problems.append(
            f"rms_norm_eps={rms_norm_eps}: transformers' DeepSeek-V3 normalises the query and KV latents "
            f"(q_a_layernorm, kv_a_layernorm) with eps={LATENT_NORM_EPS} whatever rms_norm_eps is, mymoe "
            f"with rms_norm_eps (only rms_norm_eps={LATENT_NORM_EPS} maps exactly)"
        )
    scaling = dict(rope_scaling or {})
    kind = scaling.get("type", scaling.get("rope_type", "default"))
    if kind not in ("default", "yarn") and scaling.get("mscale_all_dim"):
        problems.append(
            f"mscale_all_dim={scaling['mscale_all_dim']} with rope type {kind!r}: DeepSeek-V3 sharpens the "
            f"softmax by it for every scaled rope, mymoe only for yarn"
        )
    return problems


def config(model: ModelConfig) -> dict:
    moe = model.moe
    return {
        "model_type": MODEL_TYPE,
        "architectures": [ARCHITECTURE],
        **latent_attention_config(model),
        "rope_interleave": True,
        "moe_intermediate_size": moe.moe_intermediate_size,
        "n_routed_experts": moe.n_routed_experts,
        "num_experts_per_tok": moe.num_experts_per_tok,
        "n_shared_experts": moe.n_shared_experts,
        "routed_scaling_factor": moe.routed_scaling_factor,
        "n_group": moe.n_group,
        "topk_group": moe.topk_group,
        "norm_topk_prob": moe.norm_topk_prob,
        "num_nextn_predict_layers": 0,
    }


def latent_attention_config(model: ModelConfig) -> dict:
    """A DeepSeek config's latent attention and dense-layer keys (V2 and V3 alike): latent_attention_fields'
    inverse."""
    return {
        # kv_b_proj expands the latent to every head: no key/value sharing between heads
        "num_key_value_heads": model.num_attention_heads,
        "head_dim": model.qk_rope_head_dim,
        "q_lora_rank": model.q_lora_rank,
        "kv_lora_rank": model.kv_lora_rank,
        "qk_nope_head_dim": model.qk_nope_head_dim,
        "qk_rope_head_dim": model.qk_rope_head_dim,
        "v_head_dim": model.v_head_dim,
        "attention_bias": False,
        "intermediate_size": model.intermediate_size,
        "first_k_dense_replace": model.first_k_dense_replace,
    }


def latent_attention_fields(hf: dict) -> dict:
    """Our model fields for a DeepSeek config's latent attention and dense layers (V2 and V3 alike)."""
    return {
        "attention_type": "mla",
        "num_key_value_heads": hf["num_attention_heads"],
        "q_lora_rank": hf.get("q_lora_rank"),
        "kv_lora_rank": hf["kv_lora_rank"],
        "qk_nope_head_dim": hf["qk_nope_head_dim"],
        "qk_rope_head_dim": hf["qk_rope_head_dim"],
        "v_head_dim": hf["v_head_dim"],
        "intermediate_size": hf["intermediate_size"],
        "first_k_dense_replace": min(hf.get("first_k_dense_replace") or 0, hf["num_hidden_layers"]),
    }


def model_fields(hf: dict) -> tuple[dict, list[str]]:
    experts = hf.get("n_routed_experts", 256)
    n_group, topk_group = hf.get("n_group") or 1, hf.get("topk_group") or 1
    k = hf.get("num_experts_per_tok") or 8
    norm = bool(hf.get("norm_topk_prob", True))
    problems = latent_norm_and_rope_problems(
        hf.get("rms_norm_eps", 1e-6), hf.get("rope_parameters") or hf.get("rope_scaling")
    )
    if experts // n_group < 2:
        problems.append(
            f"n_group={n_group} leaves fewer than two of the {experts} experts per group: transformers "
            f"scores a group by its two best experts and cannot run this model"
        )
    if k == 1 and norm:
        problems.append("norm_topk_prob=true with num_experts_per_tok=1: the weight would be 1, ours keeps the score")
    fields = {
        **latent_attention_fields(hf),
        "moe": {
            "n_routed_experts": experts,
            "num_experts_per_tok": k,
            "moe_intermediate_size": hf["moe_intermediate_size"],
            "n_shared_experts": hf.get("n_shared_experts") or 0,
            "scoring_func": "sigmoid",
            "norm_topk_prob": norm,
            "routed_scaling_factor": float(hf.get("routed_scaling_factor", 1.0)),
            "n_group": n_group,
            "topk_group": topk_group,
        },
    }
    return fields, problems


# ---------------------------------------------------------------------------------------------------
# attention: the rotary rows


def _rotary_rows(weight: torch.Tensor, row_block: int, rope_dim: int, interleave: bool) -> torch.Tensor:
    """weight [blocks * row_block, in] whose last rope_dim rows of each block are rotary: half-split order ->
    interleaved pairs (interleave) or back."""
    blocks = weight.reshape(-1, row_block, weight.shape[-1])
    plain, rope = blocks[:, :-rope_dim], blocks[:, -rope_dim:]
    if interleave:  # row i -> 2i, row i + rope/2 -> 2i + 1
        rope = rope.reshape(blocks.shape[0], 2, rope_dim // 2, -1).transpose(1, 2).reshape(rope.shape)
    else:
        rope = torch.cat([rope[:, 0::2], rope[:, 1::2]], dim=1)
    return torch.cat([plain, rope], dim=1).reshape(weight.shape)


def _rotary_weights(tensors: dict, model: ModelConfig, interleave: bool) -> dict:
    rope = model.qk_rope_head_dim
    query_block = model.qk_nope_head_dim + rope
    out = dict(tensors)
    for key, value in tensors.items():
        if key.endswith(("self_attn.q_proj.weight", "self_attn.q_b_proj.weight")):
            out[key] = _rotary_rows(value, query_block, rope, interleave)
        elif key.endswith("self_attn.kv_a_proj_with_mqa.weight"):
            out[key] = _rotary_rows(value, model.kv_lora_rank + rope, rope, interleave)
    return out


def attention_to_hf(tensors: dict, model: ModelConfig) -> dict:
    """Our tensors (outside the mlp) with the rotary rows of the query and shared key interleaved."""
    return _rotary_weights(tensors, model, interleave=True)


def attention_from_hf(tensors: dict, model: ModelConfig, hf: dict) -> dict:
    """Hugging Face tensors with the rotary rows in our half-split order."""
    if not hf.get("rope_interleave", True):
        return tensors
    return _rotary_weights(tensors, model, interleave=False)


# ---------------------------------------------------------------------------------------------------
# mlp


def mlp_to_hf(prefix: str, mlp: dict) -> dict:
    base = f"{prefix}.mlp"
    if "experts.w_gate" not in mlp:  # a dense layer: same names
        return {f"{base}.{name}": value for name, value in mlp.items()}
    out = {f"{base}.gate.weight": mlp["gate.weight"], f"{base}.gate.e_score_correction_bias": mlp["gate.expert_bias"]}
    hidden = mlp["gate.weight"].shape[1]
    # n_shared_experts=0: transformers still builds the shared MLP, zero wide; empty tensors load it silently
    empty = {"gate_proj": (0, hidden), "up_proj": (0, hidden), "down_proj": (hidden, 0)}
    for proj, shape in empty.items():
        out[f"{base}.shared_experts.{proj}.weight"] = mlp.get(
            f"shared_experts.{proj}.weight", mlp["gate.weight"].new_empty(shape)
        )
    return {**out, **experts_to_hf(base, mlp)}


def mlp_from_hf(prefix: str, tensors: dict, num_experts: int, is_moe: bool) -> dict:
    base = f"{prefix}.mlp"
    if not is_moe:
        return dense_mlp_from_hf(base, tensors)
    mlp = {
        "gate.weight": tensors[f"{base}.gate.weight"],
        "gate.expert_bias": tensors[f"{base}.gate.e_score_correction_bias"].float(),
        **experts_from_hf(base, tensors, num_experts),
    }
    shared = f"{base}.shared_experts.gate_proj.weight"
    if shared in tensors and tensors[shared].numel():  # n_shared_experts=0 leaves empty or no tensors
        for proj in ("gate_proj", "up_proj", "down_proj"):
            mlp[f"shared_experts.{proj}.weight"] = tensors[f"{base}.shared_experts.{proj}.weight"]
    return mlp
