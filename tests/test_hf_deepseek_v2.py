"""DeepSeek-V2 (query bottleneck, group-limited greedy routing) and V2-Lite (direct queries, greedy) against
transformers, both with routed scaling, shared experts and a dense first layer: import, export, greedy
tokens, training."""

from __future__ import annotations

import pytest
import torch

from hf_family import check_family, draw_away_from_defaults


def deepseek_v2(lite: bool):
    import transformers

    torch.manual_seed(1)
    routing = (
        {"topk_method": "greedy"} if lite else {"topk_method": "group_limited_greedy", "n_group": 4, "topk_group": 2}
    )
    config = transformers.DeepseekV2Config(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=4,
        intermediate_size=48,
        moe_intermediate_size=16,
        n_routed_experts=8,
        num_experts_per_tok=2,
        n_shared_experts=1,
        routed_scaling_factor=1.5,
        first_k_dense_replace=1,
        q_lora_rank=None if lite else 12,
        kv_lora_rank=16,
        qk_rope_head_dim=8,
        qk_nope_head_dim=8,
        v_head_dim=6,
        max_position_embeddings=64,
        rms_norm_eps=1e-6,
        **routing,
    )
    model = transformers.DeepseekV2ForCausalLM(config)
    draw_away_from_defaults(model)
    return model.eval()


@pytest.mark.parametrize("lite", [False, True], ids=["v2_group_limited", "v2_lite_greedy"])
def test_deepseek_v2_imports_exports_and_trains_like_transformers(tmp_path, lite):
    check_family(deepseek_v2(lite), tmp_path, "deepseek_v2", "DeepseekV2ForCausalLM")


def test_group_limited_greedy_is_what_our_softmax_router_computes(tmp_path):
    from mymoe.convert.consolidate import load_consolidated_model
    from mymoe.convert.hf import choose_format, import_hf

    reference = deepseek_v2(lite=False)
    reference.save_pretrained(tmp_path / "hf")
    import_hf(tmp_path / "hf", tmp_path / "ours.safetensors")
    model, config = load_consolidated_model(tmp_path / "ours.safetensors")
    moe = config.model.moe
    assert (moe.scoring_func, moe.n_group, moe.topk_group, moe.norm_topk_prob, moe.routed_scaling_factor) == (
        "softmax",
        4,
        2,
        False,
        1.5,
    )
    assert choose_format(model) == "deepseek_v2"
    hidden = torch.randn(20, 32)
    theirs = reference.model.layers[1].mlp.gate(hidden)
    ours = model.model.layers[1].mlp.gate.eval()(hidden)
    assert torch.equal(theirs[2].sort(-1).values, ours.expert_indices.sort(-1).values)


def test_what_deepseek_v2_cannot_compute_is_refused_and_nothing_written(tmp_path):
    from mymoe.checkpoint import CheckpointError
    from mymoe.config import config_from_dict, validate
    from mymoe.convert.hf import export_hf
    from mymoe.model import MoECausalLM

    fields = {
        "vocab_size": 64,
        "hidden_size": 32,
        "num_hidden_layers": 1,
        "num_attention_heads": 4,
        "attention_type": "mla",
        "kv_lora_rank": 16,
        "qk_nope_head_dim": 8,
        "qk_rope_head_dim": 8,
        "v_head_dim": 6,
        "moe": {"n_routed_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 16, "norm_topk_prob": True},
    }
    model = MoECausalLM(validate(config_from_dict({"model": fields})).model)
    with pytest.raises(CheckpointError, match="never renormalises the top-k scores"):
        export_hf(model, tmp_path / "hf", "deepseek_v2")
    assert list(tmp_path.iterdir()) == []
