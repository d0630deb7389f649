"""The options of our grouped-query attention, each on its own: q/k/v and output biases, per-head and
full-projection q/k RMSNorm, q/k/v clamping, a head_dim apart from hidden_size / heads (and Granite's
scalings, which test_hf_granitemoe checks one by one, train here too). Each is off by
default (checkpoints of before load unchanged), changes what the model computes when on, decodes with
the KV cache as it runs whole, is refused with its fix when it cannot apply, and trains from scratch."""

from __future__ import annotations

import pytest
import torch

from mymoe.config import ConfigError, config_from_dict, load_config, validate
from mymoe.model import MoECausalLM
from mymoe.model.layers import RMSNorm

BASE = {
    "vocab_size": 64,
    "hidden_size": 32,
    "intermediate_size": 48,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
    "moe": {"n_routed_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 16},
}
OPTIONS = {
    "attention_bias": {"attention_bias": True},
    "qkv_bias": {"qkv_bias": True},
    "qk_norm_head": {"qk_norm": "head"},
    "qk_norm_full": {"qk_norm": "full"},
    "clip_qkv": {"clip_qkv": 0.05},
    "head_dim": {"head_dim": 12},
}
IDS = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(0))


def build(fields: dict, seed: int = 0) -> MoECausalLM:
    torch.manual_seed(seed)
    return MoECausalLM(validate(config_from_dict({"model": {**BASE, **fields}})).model).eval()


@torch.no_grad()
def perturb(model) -> None:
    generator = torch.Generator().manual_seed(1)
    for name, param in model.named_parameters():
        if name.endswith("bias"):
            param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
        elif "q_norm" in name or "k_norm" in name:
            param.copy_(torch.rand(param.shape, generator=generator) + 0.5)


def test_every_option_is_off_by_default_and_the_attention_state_is_unchanged():
    names = {name for name in build({}).state_dict() if ".self_attn." in name and name.startswith("model.layers.0")}
    assert names == {f"model.layers.0.self_attn.{p}_proj.weight" for p in "qkvo"}


@pytest.mark.parametrize("option", OPTIONS)
def test_an_option_changes_the_logits_and_adds_its_weights(option):
    plain, with_option = build({}), build(OPTIONS[option])
    perturb(with_option)
    attention = with_option.model.layers[0].self_attn
    expected = {
        "attention_bias": ["q_proj.bias", "k_proj.bias", "v_proj.bias", "o_proj.bias"],
        "qkv_bias": ["q_proj.bias", "k_proj.bias", "v_proj.bias"],
        "qk_norm_head": ["q_norm.weight", "k_norm.weight"],
        "qk_norm_full": ["q_norm.weight", "k_norm.weight"],
        "clip_qkv": [],
        "head_dim": [],
    }[option]
    names = {name for name, _ in attention.named_parameters()}
    assert names == {f"{p}_proj.weight" for p in "qkvo"} | set(expected)
    if option == "qkv_bias":
        assert attention.o_proj.bias is None
    if option.startswith("qk_norm"):
        widths = {"qk_norm_head": (8, 8), "qk_norm_full": (4 * 8, 2 * 8)}[option]  # head_dim 8
        assert (attention.q_norm.weight.numel(), attention.k_norm.weight.numel()) == widths
        assert isinstance(attention.q_norm, RMSNorm)
    if option == "head_dim":
        assert attention.q_proj.weight.shape == (4 * 12, 32) and attention.o_proj.weight.shape == (32, 4 * 12)
    with torch.no_grad():
        different = (plain(IDS).logits - with_option(IDS).logits).abs().max()
    if option != "head_dim":  # same seed, other shapes: the logits differ anyway
        assert different > 1e-3


@pytest.mark.parametrize("option", OPTIONS)
def test_decoding_with_the_cache_matches_the_whole_sequence(option):
    model = build(OPTIONS[option])
    perturb(model)
    with torch.no_grad():
        whole = model(IDS).logits
        first = model(IDS[:, :6], use_cache=True)
        rest = model(IDS[:, 6:], past_key_values=first.past_key_values).logits
    torch.testing.assert_close(torch.cat([first.logits, rest], dim=1), whole, atol=1e-5, rtol=0)


def test_clip_qkv_clamps_queries_keys_and_values():
    from mymoe.model.attention import Attention

    attention = Attention(8, 2, 1, 4, clip_qkv=0.1)
    seen = []
    attention.v_proj.register_forward_hook(lambda module, inputs, output: seen.append(output))
    with torch.no_grad():
        attention.q_proj.weight.fill_(1.0), attention.k_proj.weight.fill_(1.0), attention.v_proj.weight.fill_(1.0)
        out = attention(torch.ones(1, 3, 8), torch.ones(1, 3, 4), torch.zeros(1, 3, 4))
    assert seen[0].max() == 8.0  # before clamping
    # values are all clamped to 0.1, so every output row is o_proj of 0.1s
    expected = attention.o_proj(torch.full((1, 3, 8), 0.1))
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"qk_norm": "layer"}, "qk_norm='layer' must be null, 'head'"),
        ({"clip_qkv": 0.0}, "clip_qkv=0.0 must be positive"),
        ({"attention_type": "mla", "qkv_bias": True}, "qkv_bias=True is an option of grouped-query attention"),
        ({"attention_type": "mla", "qk_norm": "head"}, "qk_norm='head' is an option of grouped-query attention"),
        ({"hidden_size": 30}, "num_attention_heads=4 must divide model.hidden_size=30 .* or set model.head_dim"),
    ],
)
def test_an_option_that_cannot_apply_is_refused_with_its_fix(fields, message):
    with pytest.raises(ConfigError, match=message):
        validate(config_from_dict({"model": {**BASE, **fields}}))


def test_an_explicit_head_dim_frees_hidden_size_from_the_head_count():
    model = build({"hidden_size": 30, "head_dim": 8})
    assert model(IDS).logits.shape == (2, 10, 64)


@pytest.mark.parametrize(
    "options",
    [
        {
            "model.qkv_bias": "true",
            "model.attention_bias": "true",
            "model.qk_norm": "head",
            "model.clip_qkv": 8.0,
            "model.head_dim": 24,
        },
        {
            "model.qk_norm": "full",
            "model.attention_multiplier": 0.1,
            "model.embedding_multiplier": 2.0,
            "model.residual_multiplier": 0.5,
            "model.logits_scaling": 2.0,
        },
    ],
    ids=["biases_head_norm_clip", "full_norm_granite"],
)
def test_every_option_trains_from_scratch(tmp_path, options):
    from mymoe.parallel import ParallelContext
    from mymoe.train.loop import train
    from conftest import make_dataset, tiny_overrides

    train_prefix, valid_prefix = make_dataset(tmp_path / "data")
    overrides = tiny_overrides(train_prefix, valid_prefix, tmp_path / "run", 8, {**options, "data.seq_len": 32})
    config = load_config("configs/tiny.yaml", overrides)
    result = train(config, ParallelContext(), progress=False)
    assert result.steps == 8 and result.losses[-1] < result.losses[0]
