"""Megatron-Core names: every weight lands once, and Megatron's own splits recover q, k, v and gate, up."""

from __future__ import annotations

import torch
from safetensors.torch import load_file

from conftest import QWEN, our_model
from mymoe.convert.megatron_names import export_megatron, megatron_state_dict


def test_megatron_names_and_fused_layouts(tmp_path):
    model = our_model({**QWEN, "tie_word_embeddings": False})
    config = model.config
    export_megatron(model, tmp_path / "m.safetensors")
    tensors = load_file(str(tmp_path / "m.safetensors"))
    assert tensors.keys() == megatron_state_dict(model).keys()
    assert "output_layer.weight" in tensors and "decoder.layers.0.mlp.linear_fc1.weight" in tensors
    assert "decoder.layers.1.mlp.shared_experts.gate_weight" in tensors
    state = model.state_dict()
    total = sum(v.numel() for k, v in state.items())
    assert sum(v.numel() for v in tensors.values()) == total

    # SelfAttention.get_query_key_value_tensors: view per query group, then split [q heads, k, v]
    groups, d = config.num_key_value_heads, config.head_dim
    per_group = config.num_attention_heads // groups
    qkv = tensors["decoder.layers.1.self_attention.linear_qkv.weight"].view(groups, (per_group + 2) * d, -1)
    q, k, v = qkv.split([per_group * d, d, d], dim=1)
    for name, value in (("q", q), ("k", k), ("v", v)):
        assert torch.equal(value.reshape(-1, config.hidden_size), state[f"model.layers.1.self_attn.{name}_proj.weight"])
    # swiglu chunks linear_fc1's output in two: gate first, then up
    gate, up = tensors["decoder.layers.1.mlp.experts.local_experts.3.linear_fc1.weight"].chunk(2)
    assert torch.equal(gate, state["model.layers.1.mlp.experts.w_gate"][3].T)
    assert torch.equal(up, state["model.layers.1.mlp.experts.w_up"][3].T)
    x = torch.randn(5, config.hidden_size)
    fc2 = tensors["decoder.layers.1.mlp.experts.local_experts.3.linear_fc2.weight"]
    ours = model.model.layers[1].mlp.experts
    expected = (torch.nn.functional.silu(x @ ours.w_gate[3]) * (x @ ours.w_up[3])) @ ours.w_down[3]
    fc1_out = x @ tensors["decoder.layers.1.mlp.experts.local_experts.3.linear_fc1.weight"].T
    a, b = fc1_out.chunk(2, dim=-1)
    torch.testing.assert_close((torch.nn.functional.silu(a) * b) @ fc2.T, expected)
