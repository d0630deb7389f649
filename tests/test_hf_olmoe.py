"""OLMoE (q/k RMSNorm over the whole projection, q/k/v clamping, attention biases) against transformers:
import, export, greedy tokens, training."""

from __future__ import annotations

import pytest
import torch

from hf_family import check_family, draw_away_from_defaults


def olmoe(clip_qkv, attention_bias: bool):
    import transformers

    torch.manual_seed(1)
    config = transformers.OlmoeConfig(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=16,
        num_experts=4,
        num_experts_per_tok=2,
        norm_topk_prob=False,
        max_position_embeddings=64,
        rms_norm_eps=1e-5,
        clip_qkv=clip_qkv,
        attention_bias=attention_bias,
        pad_token_id=None,
        eos_token_id=None,
    )
    model = transformers.OlmoeForCausalLM(config)
    draw_away_from_defaults(model)
    return model.eval()


@pytest.mark.parametrize("clip_qkv, attention_bias", [(None, False), (0.3, True)], ids=["plain", "clip_qkv_bias"])
def test_olmoe_imports_exports_and_trains_like_transformers(tmp_path, clip_qkv, attention_bias):
    check_family(olmoe(clip_qkv, attention_bias), tmp_path, "olmoe", "OlmoeForCausalLM")


def test_what_olmoe_cannot_compute_is_refused_and_nothing_written(tmp_path):
    from mymoe.checkpoint import CheckpointError
    from mymoe.config import config_from_dict, validate
    from mymoe.convert.hf import choose_format, export_hf
    from mymoe.model import MoECausalLM

    base = {
        "vocab_size": 64,
        "hidden_size": 32,
        "num_hidden_layers": 1,
        "num_attention_heads": 4,
        "moe": {"n_routed_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 16},
    }
    model = MoECausalLM(validate(config_from_dict({"model": {**base, "qk_norm": "head"}})).model)
    with pytest.raises(CheckpointError, match="whole query and key projections"):
        export_hf(model, tmp_path / "hf", "olmoe")
    assert list(tmp_path.iterdir()) == []
    assert (
        choose_format(MoECausalLM(validate(config_from_dict({"model": {**base, "qk_norm": "full"}})).model)) == "olmoe"
    )
