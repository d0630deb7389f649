"""A Mixture-of-Experts model for vectors rather than sequences: [N, in_features] -> [N, out_features].

The same ``MoELayer`` as the language model (router, capacity, overflow policy, dispatcher, experts), in
a residual stack:

    x -> input projection -> num_layers x (h + MoE(RMSNorm(h))) -> RMSNorm -> output projection

Each row is one token and the whole batch one routing group, so capacity counts rows, and the
sequence-level balance loss sees the batch as a single sequence. For regression, classification heads,
or as a drop-in for an MLP whose input space splits into regions that want different maps.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from mymoe.config import MoEConfig
from mymoe.model.layers import RMSNorm
from mymoe.model.moe.layer import MoELayer


@dataclass
class VectorMoEOutput:
    output: torch.Tensor  # [N, out_features]
    aux_loss: torch.Tensor  # sum over the MoE layers, coefficient-weighted: add it to the task loss
    router_stats: list = field(default_factory=list)  # one stats dict per MoE layer


class VectorMoE(nn.Module):
    def __init__(
        self,
        in_features: int,
        out_features: int,
        hidden_size: int,
        moe: MoEConfig,
        num_layers: int = 1,
        init_std: float = 0.02,
    ):
        super().__init__()
        if min(in_features, out_features, hidden_size, num_layers) <= 0:
            raise ValueError(
                f"in_features={in_features}, out_features={out_features}, hidden_size={hidden_size} "
                f"and num_layers={num_layers} must all be positive"
            )
        self.in_features, self.out_features, self.hidden_size = in_features, out_features, hidden_size
        self.num_layers, self.moe_config, self.init_std = num_layers, moe, init_std
        self.input_proj = nn.Linear(in_features, hidden_size)
        self.norms = nn.ModuleList(RMSNorm(hidden_size) for _ in range(num_layers))
        self.layers = nn.ModuleList(MoELayer(hidden_size, moe, init_std=init_std) for _ in range(num_layers))
        self.norm = RMSNorm(hidden_size)
        self.output_proj = nn.Linear(hidden_size, out_features)

    def architecture(self) -> dict:
        """Plain values that rebuild this model with ``VectorMoE.from_architecture``: saved beside the
        weights, so a file of tensors, strings and numbers describes the whole model."""
        return {
            "in_features": self.in_features,
            "out_features": self.out_features,
            "hidden_size": self.hidden_size,
            "num_layers": self.num_layers,
            "init_std": self.init_std,
            "moe": asdict(self.moe_config),
        }

    @classmethod
    def from_architecture(cls, architecture: dict) -> "VectorMoE":
        values = dict(architecture)
        return cls(moe=MoEConfig(**values.pop("moe")), **values)

    def forward(self, inputs: torch.Tensor) -> VectorMoEOutput:
        """inputs [N, in_features] -> VectorMoEOutput with output [N, out_features]."""
        if inputs.dim() != 2:
            raise ValueError(
                f"inputs of shape {tuple(inputs.shape)} must be [N, in_features]; flatten the leading dimensions first"
            )
        hidden = self.input_proj(inputs)  # [N, hidden]
        aux_loss = hidden.new_zeros(())
        stats = []
        for norm, layer in zip(self.norms, self.layers):
            moe_output, aux = layer(norm(hidden))
            hidden = hidden + moe_output
            aux_loss = aux_loss + aux.aux_loss
            stats.append(aux.stats)
        return VectorMoEOutput(self.output_proj(self.norm(hidden)), aux_loss, stats)

    def num_parameters(self, active_only: bool = False) -> int:
        """All parameters, or those one row touches: everything but the routed experts it does not choose."""
        total = sum(p.numel() for p in self.parameters())
        if active_only:
            for layer in self.layers:
                unused = layer.experts.num_experts - layer.top_k
                total -= unused * layer.experts.num_parameters_per_expert()
        return total
