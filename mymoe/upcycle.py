"""Dense-to-MoE upcycling (Komatsuzaki et al., "Sparse Upcycling", 2022): an MoE model started from a
trained dense one.

    moe_model = upcycle(dense_model, MoEConfig(n_routed_experts=8, num_experts_per_tok=2))

Attention, norms, embeddings and head are copied as they are; every expert of a layer starts as a copy of
that layer's dense SwiGLU FFN (the experts take the dense ``intermediate_size``), and shared experts, if
any, start with a zero down projection so they add nothing yet. When the chosen experts' weights sum to
one (``norm_topk_prob`` with top_k > 1 and ``routed_scaling_factor`` 1), k identical experts give exactly
the dense FFN's output whatever the router chooses, so a dropless upcycled model computes the dense
model's function at initialisation.

Identical experts also give the router no gradient through the output (weights summing to one over
equal outputs), so only the balancing losses move it at first; ``noise_std`` breaks the symmetry with
Gaussian noise of that many standard deviations of each weight, drawn per expert. ``router_init_std`` 0
makes the router uniform: every token then ties across experts and picks the same k, which a capacity
limit would mostly drop, so upcycle dropless or give the router a small std.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Optional, Union

import torch

from mymoe.config import ModelConfig, MoEConfig
from mymoe.model.transformer import MoECausalLM

# dense FFN projection -> the stacked expert weight it seeds
_EXPERT_WEIGHTS = {"gate_proj": "w_gate", "up_proj": "w_up", "down_proj": "w_down"}
_DENSE_FFN_KEY = re.compile(r"^model\.layers\.(\d+)\.mlp\.(gate_proj|up_proj|down_proj)\.weight$")


def upcycled_config(dense_config: ModelConfig, moe: MoEConfig, first_k_dense_replace: int = 0) -> ModelConfig:
    """The MoE model's config: the dense one with MoE layers from `first_k_dense_replace` on, experts as
    wide as the dense FFN."""
    if dense_config.first_k_dense_replace != dense_config.num_hidden_layers:
        raise ValueError(
            f"the dense config has first_k_dense_replace={dense_config.first_k_dense_replace} but "
            f"num_hidden_layers={dense_config.num_hidden_layers}: upcycling starts from a model whose "
            f"layers are all dense (set first_k_dense_replace to num_hidden_layers)"
        )
    if not 0 <= first_k_dense_replace <= dense_config.num_hidden_layers:
        raise ValueError(
            f"first_k_dense_replace={first_k_dense_replace} must be between 0 and "
            f"num_hidden_layers={dense_config.num_hidden_layers}"
        )
    if (dense_config.hidden_act == "gelu") != (moe.expert_activation == "gelu"):
        raise ValueError(
            f"the dense FFN has hidden_act={dense_config.hidden_act!r} but the experts "
            f"expert_activation={moe.expert_activation!r}: a plain GELU FFN seeds only GELU experts and a SwiGLU "
            f"one only gated experts (set both to gelu, or neither)"
        )
    moe = dataclasses.replace(moe, moe_intermediate_size=dense_config.intermediate_size)
    return dataclasses.replace(dense_config, first_k_dense_replace=first_k_dense_replace, moe=moe)


@torch.no_grad()
def upcycle(
    dense: Union[MoECausalLM, dict],
    moe: MoEConfig,
    dense_config: Optional[ModelConfig] = None,
    first_k_dense_replace: int = 0,
    noise_std: float = 0.0,
    router_init_std: float = 0.0,
    seed: int = 0,
) -> MoECausalLM:
    """Build an MoECausalLM from a dense MoECausalLM (every layer dense) or its state dict.

    dense_config is required with a state dict and taken from the model otherwise. Layers before
    `first_k_dense_replace` stay dense. Noise and router weights are drawn from a generator seeded by `seed`.
    """
    if isinstance(dense, MoECausalLM):
        dense_config = dense_config or dense.config
        dense_state = dense.state_dict()
    elif dense_config is None:
        raise ValueError("upcycle from a state dict needs dense_config, the ModelConfig it was trained with")
    else:
        dense_state = dense
    if noise_std < 0 or router_init_std < 0:
        raise ValueError(f"noise_std={noise_std} and router_init_std={router_init_std} must be >= 0")
    config = upcycled_config(dense_config, moe, first_k_dense_replace)
    model = MoECausalLM(config)
    generator = torch.Generator().manual_seed(seed)
    state = model.state_dict()
    for key, value in dense_state.items():
        match = _DENSE_FFN_KEY.match(key)
        if match is None or int(match.group(1)) < first_k_dense_replace:
            state[key] = value
            continue
        prefix = f"model.layers.{match.group(1)}.mlp"
        expert_weight = value.t()  # nn.Linear holds [out, in]; the stacked experts [in, out]
        copies = expert_weight.unsqueeze(0).repeat(config.moe.n_routed_experts, 1, 1)
        if noise_std > 0:
            noise = torch.randn(copies.shape, generator=generator, dtype=copies.dtype)
            copies = copies + noise_std * expert_weight.std() * noise
        state[f"{prefix}.experts.{_EXPERT_WEIGHTS[match.group(2)]}"] = copies
    for layer in range(first_k_dense_replace, config.num_hidden_layers):
        prefix = f"model.layers.{layer}.mlp"
        router = state[f"{prefix}.gate.weight"]
        state[f"{prefix}.gate.weight"] = torch.randn(router.shape, generator=generator) * router_init_std
        if f"{prefix}.shared_experts.down_proj.weight" in state:
            state[f"{prefix}.shared_experts.down_proj.weight"] = torch.zeros_like(
                state[f"{prefix}.shared_experts.down_proj.weight"]
            )
    model.load_state_dict(state)
    return model
