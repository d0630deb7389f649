"""DeepSeek-V3 (Hugging Face ``DeepseekV3ForCausalLM``): refused both ways, with the reason.

The routing would map (sigmoid scores, group-limited top-k, e_score_correction_bias = our
gate.expert_bias, routed_scaling_factor, n_shared_experts, first_k_dense_replace), but the attention
does not. transformers' DeepseekV3Attention is multi-head latent attention: keys and values come from a
compressed latent that is RMS-normalised (kv_a_layernorm) before being expanded per head, and one rotary
key of qk_rope_head_dim is shared by all heads. mymoe's attention is grouped-query attention with
full-width rotary keys per head. A normalisation inside the projection has no linear equivalent, so no
choice of weights makes one compute the other; an export would load and produce different logits.
"""
from __future__ import annotations

from mymoe.config import ModelConfig

ARCHITECTURE = "DeepseekV3ForCausalLM"
MODEL_TYPE = "deepseek_v3"
WHY = ("DeepSeek-V3 in transformers uses multi-head latent attention (an RMS-normalised compressed KV and one "
       "shared rotary key), which mymoe's grouped-query attention cannot be written as, so the logits would "
       "differ")


def refusals(model: ModelConfig) -> list[str]:
    return [WHY + "; DeepSeek-style routing has no other exact Hugging Face target here (train with softmax "
            "scoring and n_group=1 to export as mixtral or qwen2_moe)"]


def model_fields(hf: dict) -> tuple[dict, list[str]]:
    return {}, [WHY + "; import a Mixtral or Qwen2-MoE model instead"]
