"""GPT-OSS (attention sinks, alternating sliding-window layers, q/k/v/o biases, a biased router, biased
experts with the clamped SwiGLU, YaRN) against transformers: import, export, greedy tokens, training;
and each of those pieces as an option of our model on its own."""

from __future__ import annotations

import pytest
import torch

from hf_family import check_family, draw_away_from_defaults


def gpt_oss(window: int = 4):
    import transformers

    torch.manual_seed(1)
    config = transformers.GptOssConfig(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=12,
        intermediate_size=16,
        num_local_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=64,
        sliding_window=window,
        rms_norm_eps=1e-5,
        swiglu_limit=0.5,
    )
    model = transformers.GptOssForCausalLM(config)
    draw_away_from_defaults(model)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("sinks"):
                param.normal_(0.0, 1.0)
            elif name.endswith(("gate_up_proj", "down_proj")) and "experts" in name:
                param.normal_(0.0, 0.3)  # activations large enough for the clamp at 0.5 to bite
    return model.eval()


def test_gpt_oss_imports_exports_and_trains_like_transformers(tmp_path):
    check_family(gpt_oss(), tmp_path, "gpt_oss", "GptOssForCausalLM")


BASE = {
    "vocab_size": 64,
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "moe": {"n_routed_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 16},
}
OPTIONS = {
    "attention_sinks": {"attention_sinks": True},
    "sliding_window": {"sliding_window": 3},
    "alternating_layers": {"sliding_window": 3, "layer_types": ["sliding_attention", "full_attention"]},
    "router_bias": {"moe": {**BASE["moe"], "router_bias": True}},
    "expert_mlp_bias": {"moe": {**BASE["moe"], "expert_mlp_bias": True}},
    "clamped_swiglu": {"moe": {**BASE["moe"], "expert_activation": "clamped_swiglu", "swiglu_limit": 0.01}},
}


def build(fields: dict):
    from mymoe.config import config_from_dict, validate
    from mymoe.model import MoECausalLM

    torch.manual_seed(0)
    model = MoECausalLM(validate(config_from_dict({"model": {**BASE, **fields}})).model).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("sinks", "_bias", "gate.bias")):
                param.normal_(0.0, 1.0)
    return model


@pytest.mark.parametrize("option", OPTIONS)
def test_each_option_changes_the_logits_decodes_with_the_cache_and_trains(option):
    ids = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(0))
    model, plain = build(OPTIONS[option]), build({})
    with torch.no_grad():
        whole = model(ids).logits
        assert (whole - plain(ids).logits).abs().max() > 1e-4
        first = model(ids[:, :6], use_cache=True)
        rest = model(ids[:, 6:], past_key_values=first.past_key_values).logits
    torch.testing.assert_close(torch.cat([first.logits, rest], dim=1), whole, atol=1e-5, rtol=0)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(5):
        optimizer.zero_grad()
        output = model(ids[:, :-1], shift_labels=ids[:, 1:])
        output.loss.backward()
        optimizer.step()
        losses.append(output.loss.item())
    assert losses[-1] < losses[0]


def test_the_sliding_window_hides_keys_that_many_positions_back():
    from mymoe.model.attention import window_mask

    mask = window_mask(None, 4, 6, 3, "cpu")[0, 0]  # queries at slots 2..5 of 6
    assert mask.int().tolist() == [[1, 1, 1, 0, 0, 0], [0, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 0], [0, 0, 0, 1, 1, 1]]


def test_per_expert_path_matches_the_fused_path_without_the_options():
    from mymoe.model.moe.experts import GroupedExperts
    from mymoe.model.moe.dispatch import ExpertBatch

    torch.manual_seed(0)
    experts = GroupedExperts(3, 8, 5)
    source = torch.randn(7, 8)
    batch = ExpertBatch(source, torch.tensor([2, 0, 5]), torch.tensor([3, 1, 4, 0, 6, 2, 5]), torch.rand(7))
    fused = experts(batch)
    forced = experts._forward_per_expert(batch)  # the path biases and the clamped SwiGLU take
    torch.testing.assert_close(forced, fused, atol=1e-6, rtol=0)


def test_what_gpt_oss_cannot_compute_is_refused_and_nothing_written(tmp_path):
    from mymoe.checkpoint import CheckpointError
    from mymoe.convert.hf import export_hf

    with pytest.raises(CheckpointError, match="attention_sinks=false.*\n.*clamped SwiGLU"):
        export_hf(build({}), tmp_path / "hf", "gpt_oss")
    with pytest.raises(CheckpointError, match="router_bias=true: mixtral's router has no bias"):
        export_hf(build(OPTIONS["router_bias"]), tmp_path / "hf", "mixtral")
    with pytest.raises(CheckpointError, match="attention_sinks=True: MixtralForCausalLM's attention has no sink"):
        export_hf(build(OPTIONS["attention_sinks"]), tmp_path / "hf", "mixtral")
    assert list(tmp_path.iterdir()) == []
