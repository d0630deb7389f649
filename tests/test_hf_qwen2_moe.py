"""Qwen2-MoE with q/k/v biases (every released Qwen1.5-MoE / Qwen2-MoE) against transformers: import,
export, greedy tokens, training."""

from __future__ import annotations

import torch

from hf_family import check_family, draw_away_from_defaults


def qwen2_moe_with_biases():
    import transformers

    torch.manual_seed(1)
    config = transformers.Qwen2MoeConfig(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=48,
        moe_intermediate_size=24,
        shared_expert_intermediate_size=40,
        num_experts=4,
        num_experts_per_tok=2,
        norm_topk_prob=False,
        mlp_only_layers=[0],
        qkv_bias=True,
        max_position_embeddings=64,
        rms_norm_eps=1e-6,
    )
    model = transformers.Qwen2MoeForCausalLM(config)
    draw_away_from_defaults(model)
    assert model.model.layers[0].self_attn.q_proj.bias.abs().min() > 0
    return model.eval()


def test_qwen2_moe_with_qkv_biases_imports_exports_and_trains_like_transformers(tmp_path):
    check_family(qwen2_moe_with_biases(), tmp_path, "qwen2_moe", "Qwen2MoeForCausalLM")
