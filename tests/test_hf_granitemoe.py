"""Granite-MoE (embedding, residual, attention and logits scalings; softmax of the top-k logits) against
transformers: import, export, greedy tokens, training."""

from __future__ import annotations

import pytest
import torch

from hf_family import check_family, draw_away_from_defaults


def granitemoe():
    import transformers

    torch.manual_seed(1)
    config = transformers.GraniteMoeConfig(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=16,
        num_local_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=64,
        rms_norm_eps=1e-6,
        embedding_multiplier=3.0,
        residual_multiplier=0.4,
        attention_multiplier=0.2,
        logits_scaling=2.5,
        attention_bias=True,
    )
    model = transformers.GraniteMoeForCausalLM(config)
    draw_away_from_defaults(model)
    return model.eval()


def test_granitemoe_imports_exports_and_trains_like_transformers(tmp_path):
    check_family(granitemoe(), tmp_path, "granitemoe", "GraniteMoeForCausalLM")


def test_each_scaling_changes_the_model_and_is_refused_elsewhere(tmp_path):
    from mymoe.checkpoint import CheckpointError
    from mymoe.config import ConfigError, config_from_dict, validate
    from mymoe.convert.hf import choose_format, export_hf
    from mymoe.model import MoECausalLM

    base = {
        "vocab_size": 64,
        "hidden_size": 32,
        "num_hidden_layers": 1,
        "num_attention_heads": 4,
        "moe": {"n_routed_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 16},
    }
    ids = torch.arange(10)[None]
    torch.manual_seed(0)
    plain = MoECausalLM(validate(config_from_dict({"model": base})).model).eval()
    for field, value in (
        ("embedding_multiplier", 3.0),
        ("residual_multiplier", 0.5),
        ("logits_scaling", 2.0),
        ("attention_multiplier", 0.5),
    ):
        torch.manual_seed(0)
        scaled = MoECausalLM(validate(config_from_dict({"model": {**base, field: value}})).model).eval()
        with torch.no_grad():
            assert (scaled(ids).logits - plain(ids).logits).abs().max() > 1e-4, field
        assert choose_format(scaled) == "granitemoe"
        with pytest.raises(CheckpointError, match=f"{field}={value}"):
            export_hf(scaled, tmp_path / "hf", "mixtral")
        assert list(tmp_path.iterdir()) == []
    with pytest.raises(ConfigError, match="residual_multiplier=0.0 must be positive"):
        validate(config_from_dict({"model": {**base, "residual_multiplier": 0.0}}))
