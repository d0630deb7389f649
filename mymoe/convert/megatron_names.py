"""The model's weights under Megatron-Core GPT MoE parameter names (local layer spec), as one safetensors file.

    embedding.word_embeddings.weight                      = model.embed_tokens.weight
    decoder.layers.N.input_layernorm.weight               = model.layers.N.input_layernorm.weight
    decoder.layers.N.self_attention.linear_qkv.weight     = q, k, v fused per query group (below)
    decoder.layers.N.self_attention.linear_proj.weight    = model.layers.N.self_attn.o_proj.weight
    decoder.layers.N.pre_mlp_layernorm.weight             = model.layers.N.post_attention_layernorm.weight
    decoder.layers.N.mlp.router.weight                    = mlp.gate.weight            [E, hidden]
    decoder.layers.N.mlp.router.expert_bias               = mlp.gate.expert_bias       [E] (aux-loss-free bias)
    decoder.layers.N.mlp.experts.local_experts.E.linear_fc1.weight = cat(w_gate[E].T, w_up[E].T)  [2 ffn, hidden]
    decoder.layers.N.mlp.experts.local_experts.E.linear_fc2.weight = w_down[E].T                  [hidden, ffn]
    decoder.layers.N.mlp.shared_experts.linear_fc1.weight = cat(shared gate_proj, up_proj)   (gated linear unit)
    decoder.layers.N.mlp.shared_experts.linear_fc2.weight = shared down_proj
    decoder.layers.N.mlp.shared_experts.gate_weight       = mlp.shared_expert_gate.weight  [1, hidden]
    decoder.layers.N.mlp.linear_fc1.weight / linear_fc2.weight   the dense layers (first_k_dense_replace)
    decoder.final_layernorm.weight                        = model.norm.weight
    output_layer.weight                                   = lm_head.weight (left out when tied: Megatron's
                                                            share_embeddings_and_output_weights)

linear_qkv interleaves per query group, as Megatron's SelfAttention splits it
(``view(..., groups, (heads / groups + 2) * head_dim)`` then ``split([heads / groups * head_dim, head_dim,
head_dim])``): for each key/value head g, the rows of its heads / groups query heads, then k_g, then v_g.
linear_fc1 holds gate rows first and up rows second, the order Megatron's swiglu chunks them in. Megatron's
default rotary layout (rotary_interleaved=False) is the same half-split one we use, so no permutation of
q/k rows is needed. With the Transformer-Engine spec, input_layernorm.weight is instead
``self_attention.linear_qkv.layer_norm_weight`` (and a dense layer's pre-MLP norm ``mlp.linear_fc1.layer_norm_weight``).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from mymoe.checkpoint.storage import CheckpointError
from mymoe.convert.atomic import atomic_output


def fused_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int, num_kv_heads: int) -> torch.Tensor:
    """q [heads * d, hidden], k and v [kv_heads * d, hidden] -> [(heads + 2 kv_heads) * d, hidden]."""
    head_dim = k.shape[0] // num_kv_heads
    per_group = num_heads // num_kv_heads
    q = q.view(num_kv_heads, per_group * head_dim, -1)
    k = k.view(num_kv_heads, head_dim, -1)
    v = v.view(num_kv_heads, head_dim, -1)
    return torch.cat((q, k, v), dim=1).reshape(-1, q.shape[-1])


def megatron_state_dict(model) -> dict[str, torch.Tensor]:
    config = model.config
    options = [
        f"{name}={getattr(config, name)!r}"
        for name in (
            "attention_bias",
            "qkv_bias",
            "qk_norm",
            "clip_qkv",
            "attention_multiplier",
            "attention_sinks",
            "sliding_window",
        )
        if getattr(config, name)
    ]
    options += [
        f"{name}={getattr(config, name)}"
        for name in ("embedding_multiplier", "residual_multiplier", "logits_scaling")
        if getattr(config, name) != 1
    ]
    options += [f"moe.{name}=true" for name in ("router_bias", "expert_mlp_bias") if getattr(config.moe, name)]
    if config.moe.expert_activation != "swiglu":
        options.append(f"moe.expert_activation={config.moe.expert_activation}")
    defaults = {"hidden_act": "silu", "norm_type": "rmsnorm", "is_causal": True, "candidate_head": False}
    options += [
        f"{name}={getattr(config, name)!r}" for name, value in defaults.items() if getattr(config, name) != value
    ]
    if options:
        raise CheckpointError(
            f"{', '.join(options)}: the Megatron-Core names written here have no attention "
            f"biases, q/k norms, clamping, sinks, windows, scalings, expert biases, GELU FFNs, LayerNorm, "
            f"encoder attention or candidate heads; export to Hugging Face (export-hf) instead"
        )
    state = model.state_dict()
    out = {
        "embedding.word_embeddings.weight": state["model.embed_tokens.weight"],
        "decoder.final_layernorm.weight": state["model.norm.weight"],
    }
    if not config.tie_word_embeddings:
        out["output_layer.weight"] = state["lm_head.weight"]
    for n, block in enumerate(model.model.layers):
        ours, theirs = f"model.layers.{n}", f"decoder.layers.{n}"
        out[f"{theirs}.input_layernorm.weight"] = state[f"{ours}.input_layernorm.weight"]
        out[f"{theirs}.pre_mlp_layernorm.weight"] = state[f"{ours}.post_attention_layernorm.weight"]
        out[f"{theirs}.self_attention.linear_qkv.weight"] = fused_qkv(
            *(state[f"{ours}.self_attn.{p}_proj.weight"] for p in "qkv"),
            config.num_attention_heads,
            config.num_key_value_heads,
        )
        out[f"{theirs}.self_attention.linear_proj.weight"] = state[f"{ours}.self_attn.o_proj.weight"]
        mlp = f"{ours}.mlp"
        if not block.is_moe:
            out[f"{theirs}.mlp.linear_fc1.weight"] = torch.cat(
                (state[f"{mlp}.gate_proj.weight"], state[f"{mlp}.up_proj.weight"])
            )
            out[f"{theirs}.mlp.linear_fc2.weight"] = state[f"{mlp}.down_proj.weight"]
            continue
        out[f"{theirs}.mlp.router.weight"] = state[f"{mlp}.gate.weight"]
        out[f"{theirs}.mlp.router.expert_bias"] = state[f"{mlp}.gate.expert_bias"]
        w_gate, w_up, w_down = (state[f"{mlp}.experts.{w}"] for w in ("w_gate", "w_up", "w_down"))
        for e in range(w_gate.shape[0]):
            expert = f"{theirs}.mlp.experts.local_experts.{e}"
            out[f"{expert}.linear_fc1.weight"] = torch.cat((w_gate[e].T, w_up[e].T))
            out[f"{expert}.linear_fc2.weight"] = w_down[e].T
        if block.mlp.shared_experts is not None:
            shared = f"{mlp}.shared_experts"
            out[f"{theirs}.mlp.shared_experts.linear_fc1.weight"] = torch.cat(
                (state[f"{shared}.gate_proj.weight"], state[f"{shared}.up_proj.weight"])
            )
            out[f"{theirs}.mlp.shared_experts.linear_fc2.weight"] = state[f"{shared}.down_proj.weight"]
            if block.mlp.shared_expert_gate is not None:
                out[f"{theirs}.mlp.shared_experts.gate_weight"] = state[f"{mlp}.shared_expert_gate.weight"]
    return out


def export_megatron(model, out_file: str | Path, overwrite: bool = False) -> dict:
    tensors = megatron_state_dict(model)
    metadata = {"format": "megatron-core-gpt-moe-names", "config": json.dumps(dataclasses.asdict(model.config))}
    with atomic_output(Path(out_file), overwrite) as temporary:
        save_file({key: value.contiguous() for key, value in tensors.items()}, str(temporary), metadata=metadata)
    return {"tensors": len(tensors)}
