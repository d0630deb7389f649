"""Families mymoe cannot compute yet, and quantized checkpoints, are refused on import with what they need, and
nothing is written."""

from __future__ import annotations

import pytest
import torch


def phimoe():
    import transformers

    torch.manual_seed(1)
    config = transformers.PhimoeConfig(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=16,
        num_local_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=64,
    )
    return transformers.PhimoeForCausalLM(config)


@pytest.mark.parametrize("build, reason", [(phimoe, "LayerNorm .* sparsemixer")], ids=["phimoe"])
def test_a_family_mymoe_cannot_compute_is_refused_with_what_it_needs(tmp_path, build, reason):
    from mymoe.checkpoint import CheckpointError
    from mymoe.convert.hf import import_hf

    build().save_pretrained(tmp_path / "hf")
    with pytest.raises(CheckpointError, match=f"cannot be imported, nothing was written: .*{reason}"):
        import_hf(tmp_path / "hf", tmp_path / "ours.safetensors")
    assert not (tmp_path / "ours.safetensors").exists() and not (tmp_path / "ours.yaml").exists()


def test_a_quantized_checkpoint_is_refused_with_how_to_dequantize(tmp_path):
    import json

    from mymoe.checkpoint import CheckpointError
    from mymoe.convert.hf import import_hf
    from test_hf_gpt_oss import gpt_oss

    gpt_oss().save_pretrained(tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "mxfp4"}
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="quant_method='mxfp4'.*Mxfp4Config\\(dequantize=True\\)"):
        import_hf(tmp_path / "hf", tmp_path / "ours.safetensors")
    assert not (tmp_path / "ours.safetensors").exists()
