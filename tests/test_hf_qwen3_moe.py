"""Qwen3-MoE (per-head q/k RMSNorm, a head_dim apart from hidden_size / heads, attention biases, a dense
first layer) against transformers: import, export, greedy tokens, training."""

from __future__ import annotations

import pytest
import torch

from hf_family import check_family, draw_away_from_defaults


def qwen3_moe(attention_bias: bool):
    import transformers

    torch.manual_seed(1)
    config = transformers.Qwen3MoeConfig(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=12,
        intermediate_size=40,
        moe_intermediate_size=16,
        num_experts=4,
        num_experts_per_tok=2,
        norm_topk_prob=True,
        mlp_only_layers=[0],
        max_position_embeddings=64,
        rms_norm_eps=1e-6,
        attention_bias=attention_bias,
    )
    model = transformers.Qwen3MoeForCausalLM(config)
    draw_away_from_defaults(model)
    return model.eval()


@pytest.mark.parametrize("attention_bias", [False, True], ids=["no_bias", "attention_bias"])
def test_qwen3_moe_imports_exports_and_trains_like_transformers(tmp_path, attention_bias):
    check_family(qwen3_moe(attention_bias), tmp_path, "qwen3_moe", "Qwen3MoeForCausalLM")


@pytest.mark.parametrize(
    "fields, fmt, reason",
    [
        (
            {"qkv_bias": True, "qk_norm": "head"},
            "qwen3_moe",
            r"qkv_bias=True: Qwen3MoeForCausalLM's attention has no "
            r"biases on the q, k and v projections \(export as qwen2_moe",
        ),
        ({}, "qwen3_moe", "qk_norm=None: every Qwen3-MoE attention RMS-normalises each query and key head"),
        (
            {"qk_norm": "head"},
            "mixtral",
            "qk_norm='head': MixtralForCausalLM's attention has no query and key norms "
            r"\(export as qwen3_moe",
        ),
        ({"qk_norm": "head", "moe": {"n_routed_experts": 4, "n_shared_experts": 1}}, "qwen3_moe", "no shared experts"),
    ],
)
def test_what_qwen3_moe_cannot_compute_is_refused_and_nothing_written(tmp_path, fields, fmt, reason):
    from mymoe.checkpoint import CheckpointError
    from mymoe.config import config_from_dict, validate
    from mymoe.convert.hf import export_hf
    from mymoe.model import MoECausalLM

    base = {
        "vocab_size": 64,
        "hidden_size": 32,
        "num_hidden_layers": 1,
        "num_attention_heads": 4,
        "moe": {"n_routed_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 16},
    }
    model = MoECausalLM(validate(config_from_dict({"model": {**base, **fields}})).model)
    with pytest.raises(CheckpointError, match=reason):
        export_hf(model, tmp_path / "hf", fmt)
    assert list(tmp_path.iterdir()) == []


def test_auto_export_picks_qwen3_moe_for_per_head_norms(tmp_path):
    from mymoe.config import config_from_dict, validate
    from mymoe.convert.hf import choose_format
    from mymoe.model import MoECausalLM

    model = MoECausalLM(
        validate(
            config_from_dict(
                {"model": {"vocab_size": 64, "hidden_size": 32, "num_hidden_layers": 1, "qk_norm": "head"}}
            )
        ).model
    )
    assert choose_format(model) == "qwen3_moe"
