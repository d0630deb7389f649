"""Multi-head latent attention: cache decoding equals the full forward, and the cache is smaller."""

import torch

from mymoe.config import ModelConfig, MoEConfig, config_from_dict, validate
from mymoe.model import MoECausalLM
from mymoe.model.mla import MultiHeadLatentAttention


def mla_config(**overrides):
    values = dict(
        vocab_size=101,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=64,
        attention_type="mla",
        q_lora_rank=32,
        kv_lora_rank=24,
        qk_nope_head_dim=16,
        qk_rope_head_dim=8,
        v_head_dim=16,
        moe=MoEConfig(n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32),
    )
    values.update(overrides)
    return ModelConfig(**values)


def test_mla_latent_cache_decodes_like_the_full_forward():
    torch.manual_seed(0)
    model = MoECausalLM(
        mla_config(rope_scaling={"type": "yarn", "factor": 2.0, "mscale": 1.0, "mscale_all_dim": 1.0})
    ).eval()
    assert isinstance(model.model.layers[0].self_attn, MultiHeadLatentAttention)
    ids = torch.randint(0, 101, (2, 11))
    full = model(ids).logits
    prefill = model(ids[:, :4], use_cache=True)
    pieces, cache = [prefill.logits], prefill.past_key_values
    for t in range(4, 11):
        pieces.append(model(ids[:, t : t + 1], past_key_values=cache).logits)
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=1e-5)
    # the cache holds the latent and the shared rotated key, not per-head keys and values
    assert cache[0].keys.shape == (2, 1, 11, 24) and cache[0].values.shape == (2, 1, 11, 8)
    prompt = ids[:, :3]
    assert torch.equal(
        model.generate(prompt, 6, temperature=0), model.generate(prompt, 6, temperature=0, use_cache=False)
    )


def test_mla_cache_is_smaller_than_gqa_cache_at_the_same_width():
    gqa = MoECausalLM(mla_config(attention_type="gqa", num_key_value_heads=2))  # head_dim 16, 2 kv heads
    mla = MoECausalLM(mla_config())
    ids = torch.randint(0, 101, (1, 9))
    gqa_cache = gqa(ids, use_cache=True).past_key_values[0]
    mla_cache = mla(ids, use_cache=True).past_key_values[0]

    def numbers(cache):
        return cache.keys.numel() + cache.values.numel()

    ratio = numbers(mla_cache) / numbers(gqa_cache)
    assert numbers(mla_cache) == 9 * mla.model.layers[0].self_attn.cache_numbers_per_token() == 9 * 32
    assert numbers(gqa_cache) == 9 * 2 * 2 * 16
    print(f"MLA cache / GQA cache per token and layer: {ratio:.3f}")
    assert ratio < 1  # 32 / 64 = 0.5 here


def test_mla_trains_and_checkpoints_its_gradients():
    torch.manual_seed(0)
    model = MoECausalLM(mla_config(q_lora_rank=None, gradient_checkpointing=True))
    ids = torch.randint(0, 101, (2, 8))
    model(ids, labels=ids).loss.backward()
    attention = model.model.layers[0].self_attn
    assert attention.q_proj.weight.grad is not None and attention.kv_b_proj.weight.grad.abs().sum() > 0


def test_mla_config_errors():
    import pytest

    from mymoe.config import ConfigError

    with pytest.raises(ConfigError, match="qk_rope_head_dim=7 must be even"):
        validate(config_from_dict({"model": {"attention_type": "mla", "qk_rope_head_dim": 7}}))
    with pytest.raises(ConfigError, match="attention_type='flash' must be 'gqa' or 'mla'"):
        validate(config_from_dict({"model": {"attention_type": "flash"}}))


def test_rope_scaling_at_inference_equals_a_model_built_with_it():
    """--rope-scaling on an MLA model: the table rotates qk_rope_head_dim (8 here, head_dim 16) and the
    YaRN softmax sharpening follows, so the logits are those of a model configured with the scaling."""
    from mymoe.inference import apply_rope_scaling

    scaling = {"type": "yarn", "factor": 4.0, "mscale": 1.0, "mscale_all_dim": 1.0}
    torch.manual_seed(0)
    extended = MoECausalLM(mla_config()).eval()
    built = MoECausalLM(mla_config(rope_scaling=scaling)).eval()
    built.load_state_dict(extended.state_dict())
    apply_rope_scaling(extended, scaling)
    ids = torch.randint(0, 101, (1, 40))
    with torch.no_grad():
        torch.testing.assert_close(extended(ids).logits, built(ids).logits)
    assert extended.model.rotary_emb.head_dim == 8
