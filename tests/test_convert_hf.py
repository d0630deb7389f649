"""Hugging Face export and import: transformers loads each export and computes our logits; a random
transformers model imported computes its own logits in mymoe; what cannot map is refused, nothing written."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import BASE, MIXTRAL, QWEN, our_model
from mymoe.checkpoint import CheckpointError
from mymoe.config import config_from_dict, validate
from mymoe.convert.consolidate import load_consolidated_model
from mymoe.convert.hf import export_hf, import_hf

# multi-head latent attention, sigmoid group-limited routing with scaling, a shared expert, one dense layer
DEEPSEEK = {
    "attention_type": "mla",
    "q_lora_rank": 12,
    "kv_lora_rank": 16,
    "qk_nope_head_dim": 8,
    "qk_rope_head_dim": 8,
    "v_head_dim": 6,
    "first_k_dense_replace": 1,
    "moe": {
        "n_routed_experts": 8,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 16,
        "n_shared_experts": 1,
        "scoring_func": "sigmoid",
        "n_group": 4,
        "topk_group": 2,
        "routed_scaling_factor": 2.5,
    },
}
# no query bottleneck, YaRN with DeepSeek's softmax sharpening, and a multi-token prediction head left behind
DEEPSEEK_DIRECT_QUERY = {
    **DEEPSEEK,
    "q_lora_rank": None,
    "num_nextn_predict_layers": 1,
    "rope_scaling": {
        "type": "yarn",
        "factor": 4.0,
        "original_max_position_embeddings": 16,
        "mscale": 1.0,
        "mscale_all_dim": 1.0,
    },
}
DEEPSEEK_NO_SHARED = {**DEEPSEEK, "moe": {**DEEPSEEK["moe"], "n_shared_experts": 0}}
BATCH = torch.tensor([[3, 14, 15, 9, 26, 5, 35, 8, 9, 7, 9, 3], [2, 7, 18, 28, 18, 28, 4, 59, 0, 45, 23, 53]])


def our_logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(BATCH).logits


def hf_logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(BATCH).logits


@pytest.mark.parametrize(
    "fields, architecture",
    [
        (MIXTRAL, "MixtralForCausalLM"),
        (QWEN, "Qwen2MoeForCausalLM"),
        (DEEPSEEK, "DeepseekV3ForCausalLM"),
        (DEEPSEEK_DIRECT_QUERY, "DeepseekV3ForCausalLM"),
        (DEEPSEEK_NO_SHARED, "DeepseekV3ForCausalLM"),
    ],
    ids=["mixtral", "qwen2_moe", "deepseek_v3", "deepseek_v3_direct_query_yarn_mtp", "deepseek_v3_no_shared_expert"],
)
def test_transformers_loads_the_export_with_our_logits(tmp_path, capsys, fields, architecture):
    from transformers import AutoModelForCausalLM

    model = our_model(fields)
    done = export_hf(model, tmp_path / "hf")
    assert done["architecture"] == architecture
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["architectures"] == [architecture]
    if model.mtp is not None:
        assert "multi-token prediction head is not exported" in capsys.readouterr().err
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    assert type(loaded).__name__ == architecture
    torch.testing.assert_close(hf_logits(loaded), our_logits(model), atol=1e-4, rtol=0)


def test_interleaved_rotary_rows_rotate_like_our_half_split_layout():
    # the end-to-end logits move by only ~3e-4 when the rotary rows are left unpermuted, so check the rotation
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import apply_rotary_pos_emb_interleave

    from mymoe.convert.hf_deepseek_v3 import attention_from_hf, attention_to_hf
    from mymoe.model.layers import RotaryEmbedding, apply_rotary

    config = validate(config_from_dict({"model": {**BASE, **DEEPSEEK}})).model
    rope, latent, heads, query_block = 8, 16, 4, 16
    torch.manual_seed(0)
    ours = {
        "model.layers.0.self_attn.q_b_proj.weight": torch.randn(heads * query_block, 12),
        "model.layers.0.self_attn.kv_a_proj_with_mqa.weight": torch.randn(latent + rope, 32),
    }
    exported = attention_to_hf(ours, config)
    cos, sin = RotaryEmbedding(rope, 64, 500.0)(torch.arange(10)[None], torch.float32)  # [1, 10, rope]
    query_input, key_input = torch.randn(1, 10, 12), torch.randn(1, 10, 32)

    def rotary_parts(tensors):  # q [1, heads, 10, rope], k [1, 1, 10, rope]
        q = (query_input @ tensors["model.layers.0.self_attn.q_b_proj.weight"].T).view(1, 10, heads, query_block)
        k = key_input @ tensors["model.layers.0.self_attn.kv_a_proj_with_mqa.weight"].T
        return q[..., -rope:].transpose(1, 2), k[:, None, :, -rope:]

    q_ours, k_ours = rotary_parts(ours)
    q_hf, k_hf = apply_rotary_pos_emb_interleave(*rotary_parts(exported), cos, sin)
    torch.testing.assert_close(q_hf, apply_rotary(q_ours, cos, sin), atol=1e-5, rtol=0)
    torch.testing.assert_close(k_hf, apply_rotary(k_ours, cos, sin), atol=1e-5, rtol=0)
    assert all(torch.equal(attention_from_hf(exported, config, {})[key], ours[key]) for key in ours)


def random_hf_model(kind: str):
    import transformers

    torch.manual_seed(1)
    common = dict(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        rms_norm_eps=1e-6,
    )
    if kind.startswith("deepseek_v3"):
        # deepseek_v3: a query bottleneck and interleaved rotary rows (DeepSeek's own layout);
        # deepseek_v3_direct: q_proj and the half-split rotary layout
        direct = kind == "deepseek_v3_direct"
        config = transformers.DeepseekV3Config(
            **{**common, "num_hidden_layers": 3, "num_key_value_heads": 4},
            intermediate_size=48,
            moe_intermediate_size=16,
            n_routed_experts=8,
            num_experts_per_tok=2,
            n_shared_experts=1,
            n_group=4,
            topk_group=2,
            routed_scaling_factor=2.5,
            norm_topk_prob=True,
            first_k_dense_replace=1,
            q_lora_rank=None if direct else 12,
            kv_lora_rank=16,
            qk_rope_head_dim=8,
            qk_nope_head_dim=8,
            v_head_dim=6,
            rope_interleave=not direct,
        )
        model = transformers.DeepseekV3ForCausalLM(config)
        with torch.no_grad():
            for name, buffer in model.named_buffers():
                if name.endswith("e_score_correction_bias"):
                    buffer.uniform_(-0.05, 0.05)
    elif kind == "mixtral":
        config = transformers.MixtralConfig(**common, intermediate_size=24, num_local_experts=4, num_experts_per_tok=2)
        model = transformers.MixtralForCausalLM(config)
    else:
        config = transformers.Qwen2MoeConfig(
            **common,
            intermediate_size=48,
            moe_intermediate_size=24,
            shared_expert_intermediate_size=40,
            num_experts=4,
            num_experts_per_tok=2,
            norm_topk_prob=True,
            mlp_only_layers=[0],
            tie_word_embeddings=True,
        )
        model = transformers.Qwen2MoeForCausalLM(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.uniform_(0.5, 1.5)
    return model.eval()


@pytest.mark.parametrize("kind", ["mixtral", "qwen2_moe", "deepseek_v3", "deepseek_v3_direct"])
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


@pytest.mark.parametrize(
    "fields, fmt, reason",
    [
        (
            {"moe": {**MIXTRAL["moe"], "scoring_func": "sigmoid", "n_group": 2, "topk_group": 1}},
            "auto",
            "multi-head latent attention",
        ),
        (
            {**DEEPSEEK, "moe": {**DEEPSEEK["moe"], "scoring_func": "softmax"}},
            "deepseek_v3",
            "scores experts with sigmoid",
        ),
        ({**DEEPSEEK, "rms_norm_eps": 1e-5}, "deepseek_v3", "eps=1e-06 whatever rms_norm_eps is"),
        (DEEPSEEK, "qwen2_moe", "not multi-head latent attention"),
        ({"moe": {**MIXTRAL["moe"], "norm_topk_prob": False}}, "mixtral", "always renormalises"),
        ({"moe": {**MIXTRAL["moe"], "capacity_factor": 1.0}}, "mixtral", "drops tokens past capacity"),
        ({"moe": {**QWEN["moe"], "shared_expert_gate": False}}, "qwen2_moe", "sigmoid gate"),
        (MIXTRAL, "qwen2_moe", "has a shared expert"),
    ],
)
def test_what_a_format_cannot_compute_is_refused(tmp_path, fields, fmt, reason):
    with pytest.raises(CheckpointError, match=reason):
        export_hf(our_model(fields), tmp_path / "hf", fmt)
    assert list(tmp_path.iterdir()) == []


def test_deepseek_v3_import_with_other_latent_norm_eps_is_refused(tmp_path):
    reference = random_hf_model("deepseek_v3")
    reference.config.rms_norm_eps = 1e-5
    reference.save_pretrained(tmp_path / "hf")
    with pytest.raises(CheckpointError, match="q_a_layernorm, kv_a_layernorm"):
        import_hf(tmp_path / "hf", tmp_path / "ours.safetensors")
    assert not (tmp_path / "ours.safetensors").exists()


def test_a_tokenizer_larger_than_the_vocabulary_is_refused(tmp_path):
    import sentencepiece as spm

    text = tmp_path / "corpus.txt"
    text.write_text("\n".join(f"word{i} and more words number {i * 7}" for i in range(300)))
    spm.SentencePieceTrainer.train(input=str(text), model_prefix=str(tmp_path / "tok"), vocab_size=100, minloglevel=2)
    with pytest.raises(CheckpointError, match="100 pieces but the model's vocab_size is 64"):
        export_hf(our_model(MIXTRAL), tmp_path / "hf", tokenizer=str(tmp_path / "tok.model"))
    assert not (tmp_path / "hf").exists()


def test_a_transformers_model_fine_tunes_here_from_train_init_from(tmp_path):
    from mymoe.config import load_config
    from mymoe.parallel import ParallelContext
    from mymoe.train.loop import Trainer, train
    from conftest import make_dataset, tiny_overrides

    reference = random_hf_model("mixtral")
    reference.save_pretrained(tmp_path / "hf")
    import_hf(tmp_path / "hf", tmp_path / "ours.safetensors")  # ours.yaml beside it: the architecture
    train_prefix, valid_prefix = make_dataset(tmp_path / "data")
    overrides = tiny_overrides(
        train_prefix,
        valid_prefix,
        tmp_path / "run",
        3,
        {
            "train.init_from": str(tmp_path / "hf"),
            "peft.lora_rank": 4,
            "peft.lora_targets": "[q_proj,experts]",
            "data.seq_len": 32,
        },
    )
    config = load_config(str(tmp_path / "ours.yaml"), overrides)
    trainer = Trainer(config, ParallelContext(), init_from=config.train.init_from)
    torch.testing.assert_close(our_logits(trainer.model.eval()), hf_logits(reference), atol=1e-4, rtol=0)
    result = train(config, ParallelContext(), progress=False)  # fine-tunes the adapters from the imported weights
    assert result.steps == 3 and all(torch.isfinite(torch.tensor(result.losses)))
    wrong = load_config(
        str(tmp_path / "ours.yaml"),
        overrides + ["--model.num_hidden_layers=3", f"--train.out_dir={tmp_path / 'other'}"],
    )
    with pytest.raises(CheckpointError, match="model.num_hidden_layers: checkpoint 2, this run 3"):
        Trainer(wrong, ParallelContext(), init_from=wrong.train.init_from)
