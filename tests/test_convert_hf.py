"""Hugging Face export and import: transformers loads each export and computes our logits; a random
transformers model imported computes its own logits in mymoe; what cannot map is refused, nothing written."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mymoe.checkpoint import CheckpointError
from mymoe.config import config_from_dict, validate
from mymoe.convert.consolidate import load_consolidated_model
from mymoe.convert.hf import export_hf, import_hf
from mymoe.model import MoECausalLM

BASE = {"vocab_size": 64, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64, "rope_theta": 500.0}
MIXTRAL = {"moe": {"n_routed_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 24}}
QWEN = {"first_k_dense_replace": 1, "tie_word_embeddings": True,
        "moe": {"n_routed_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 24, "n_shared_experts": 1,
                "shared_expert_intermediate_size": 40, "shared_expert_gate": True, "norm_topk_prob": False}}
BATCH = torch.tensor([[3, 14, 15, 9, 26, 5, 35, 8, 9, 7, 9, 3], [2, 7, 18, 28, 18, 28, 4, 59, 0, 45, 23, 53]])


def our_model(fields: dict, seed: int = 0) -> MoECausalLM:
    torch.manual_seed(seed)
    model = MoECausalLM(validate(config_from_dict({"model": {**BASE, **fields}})).model)
    with torch.no_grad():  # norms away from 1, so a swapped norm would show
        for name, param in model.named_parameters():
            if name.endswith("layernorm.weight") or name == "model.norm.weight":
                param.uniform_(0.5, 1.5)
    return model.eval()


def our_logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(BATCH).logits


def hf_logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(BATCH).logits


@pytest.mark.parametrize("fields, architecture", [(MIXTRAL, "MixtralForCausalLM"),
                                                  (QWEN, "Qwen2MoeForCausalLM")])
def test_transformers_loads_the_export_with_our_logits(tmp_path, fields, architecture):
    from transformers import AutoModelForCausalLM

    model = our_model(fields)
    done = export_hf(model, tmp_path / "hf")
    assert done["architecture"] == architecture
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["architectures"] == [architecture]
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    assert type(loaded).__name__ == architecture
    torch.testing.assert_close(hf_logits(loaded), our_logits(model), atol=1e-4, rtol=0)


def random_hf_model(kind: str):
    import transformers

    torch.manual_seed(1)
    common = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=64, rms_norm_eps=1e-6)
    if kind == "mixtral":
        config = transformers.MixtralConfig(**common, intermediate_size=24, num_local_experts=4, num_experts_per_tok=2)
        model = transformers.MixtralForCausalLM(config)
    else:
        config = transformers.Qwen2MoeConfig(**common, intermediate_size=48, moe_intermediate_size=24,
                                             shared_expert_intermediate_size=40, num_experts=4, num_experts_per_tok=2,
                                             norm_topk_prob=True, mlp_only_layers=[0], tie_word_embeddings=True)
        model = transformers.Qwen2MoeForCausalLM(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.uniform_(0.5, 1.5)
    return model.eval()


@pytest.mark.parametrize("kind", ["mixtral", "qwen2_moe"])
def test_import_of_a_random_transformers_model_gives_its_logits(tmp_path, kind):
    reference = random_hf_model(kind)
    reference.save_pretrained(tmp_path / "hf")
    import_hf(tmp_path / "hf", tmp_path / "ours.safetensors")
    model, config = load_consolidated_model(tmp_path / "ours.safetensors")
    assert (tmp_path / "ours.yaml").exists()
    torch.testing.assert_close(our_logits(model.eval()), hf_logits(reference), atol=1e-4, rtol=0)


def test_import_reads_the_fused_in_memory_layout(tmp_path):
    from safetensors.torch import save_file

    reference = random_hf_model("qwen2_moe")
    reference.save_pretrained(tmp_path / "hf")
    fused = {key: value.contiguous() for key, value in reference.state_dict().items() if key != "lm_head.weight"}
    assert any(key.endswith("experts.gate_up_proj") for key in fused)
    (tmp_path / "hf" / "model.safetensors").unlink()
    save_file(fused, str(tmp_path / "hf" / "model.safetensors"))
    import_hf(tmp_path / "hf", tmp_path / "ours.safetensors")
    model, _ = load_consolidated_model(tmp_path / "ours.safetensors")
    torch.testing.assert_close(our_logits(model.eval()), hf_logits(reference), atol=1e-4, rtol=0)


@pytest.mark.parametrize("fields, fmt, reason", [
    ({"moe": {**MIXTRAL["moe"], "scoring_func": "sigmoid", "n_group": 2, "topk_group": 1}}, "auto",
     "multi-head latent attention"),
    ({"moe": {**MIXTRAL["moe"], "norm_topk_prob": False}}, "mixtral", "always renormalises"),
    ({"moe": {**MIXTRAL["moe"], "capacity_factor": 1.0}}, "mixtral", "drops tokens past capacity"),
    ({"moe": {**QWEN["moe"], "shared_expert_gate": False}}, "qwen2_moe", "sigmoid gate"),
    (MIXTRAL, "qwen2_moe", "has a shared expert"),
])
def test_what_a_format_cannot_compute_is_refused(tmp_path, fields, fmt, reason):
    with pytest.raises(CheckpointError, match=reason):
        export_hf(our_model(fields), tmp_path / "hf", fmt)
    assert list(tmp_path.iterdir()) == []


def test_deepseek_v3_import_is_refused(tmp_path):
    import transformers

    config = transformers.DeepseekV3Config(vocab_size=64, hidden_size=32, intermediate_size=48,
                                           moe_intermediate_size=16, num_hidden_layers=2, num_attention_heads=4,
                                           num_key_value_heads=4, n_routed_experts=4, num_experts_per_tok=2,
                                           n_group=2, topk_group=1, kv_lora_rank=16, q_lora_rank=None,
                                           qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8,
                                           first_k_dense_replace=1)
    transformers.DeepseekV3ForCausalLM(config).save_pretrained(tmp_path / "hf")
    with pytest.raises(CheckpointError, match="multi-head latent attention"):
        import_hf(tmp_path / "hf", tmp_path / "ours.safetensors")
    assert not (tmp_path / "ours.safetensors").exists()


def test_a_tokenizer_larger_than_the_vocabulary_is_refused(tmp_path):
    import sentencepiece as spm

    text = tmp_path / "corpus.txt"
    text.write_text("\n".join(f"word{i} and more words number {i * 7}" for i in range(300)))
    spm.SentencePieceTrainer.train(input=str(text), model_prefix=str(tmp_path / "tok"), vocab_size=100,
                                   minloglevel=2)
    with pytest.raises(CheckpointError, match="100 pieces but the model's vocab_size is 64"):
        export_hf(our_model(MIXTRAL), tmp_path / "hf", tokenizer=str(tmp_path / "tok.model"))
    assert not (tmp_path / "hf").exists()
