"""Parameter-efficient fine-tuning: LoRA on chosen weights, and prefix tuning of attention.

LoRA adds a trainable low-rank term to a frozen weight, W + (alpha / r) * A @ B, through
``torch.nn.utils.parametrize``: the module keeps reading ``module.weight`` and gets the sum, so the
same mechanism covers an ``nn.Linear`` ([out, in]: the term is B @ A as in the LoRA paper), the
router's weight, and the stacked expert weights ([experts, in, out]: one A_e @ B_e per expert, batched).
B starts at zero, so an adapted model starts exactly where the base model is. ``merge_lora`` bakes the
term into the weights (for export); ``lora_state_dict`` / ``load_lora_state_dict`` save and load the
adapters alone.

Prefix tuning gives every attention layer ``prefix_length`` trainable key/value positions that each
query may attend to (Li and Liang, 2021); they carry no rotary position.

Targets name modules by the last part of their name: q_proj, k_proj, v_proj, o_proj (attention),
gate (the router), experts (w_gate, w_up and w_down of the routed experts), shared_experts (its three
projections). ``apply_peft`` freezes every base parameter, so only adapters train.
"""

from __future__ import annotations

import math
import zlib
from typing import Iterable, Optional

import torch
from torch import nn
from torch.nn.utils import parametrize

from mymoe.config import LORA_TARGETS
from mymoe.model.attention import Attention
from mymoe.model.moe.experts import GroupedExperts, is_expert, mark_expert
from mymoe.model.moe.router import Router


class LoRA(nn.Module):
    """The parametrization W -> W + scale * low-rank term, for a 2-D [out, in] or stacked 3-D [E, in, out] W."""

    def __init__(
        self,
        weight: torch.Tensor,
        rank: int,
        alpha: float,
        generator: torch.Generator,
        expert_rows: Optional[tuple] = None,
    ):
        super().__init__()
        self.scale = alpha / rank
        self.stacked = weight.dim() == 3
        if self.stacked:
            experts, fan_in, fan_out = weight.shape
            # A is drawn for every global expert and sliced, so any expert-parallel layout gets the same
            # adapters; expert_rows = (first, total) of the experts this module holds
            first, total = expert_rows or (0, experts)
            full = torch.empty(total, fan_in, rank).normal_(0, 1 / math.sqrt(fan_in), generator=generator)
            self.lora_A = nn.Parameter(full[first : first + experts].to(weight))
            self.lora_B = nn.Parameter(weight.new_zeros(experts, rank, fan_out))
            mark_expert(self.lora_A), mark_expert(self.lora_B)  # reduced over expert-data-parallel ranks
        else:
            fan_out, fan_in = weight.shape
            self.lora_A = nn.Parameter(
                torch.empty(rank, fan_in).normal_(0, 1 / math.sqrt(fan_in), generator=generator).to(weight)
            )
            self.lora_B = nn.Parameter(weight.new_zeros(fan_out, rank))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if self.stacked:
            return weight + self.scale * torch.bmm(self.lora_A, self.lora_B)
        return weight + self.scale * (self.lora_B @ self.lora_A)


def _targets(model: nn.Module, targets: Iterable[str]):
    """(module name, module, weight attribute) for every weight the targets name."""
    targets = set(targets)
    unknown = targets - set(LORA_TARGETS)
    if unknown:
        raise ValueError(f"unknown LoRA target(s) {sorted(unknown)}: choose from {', '.join(LORA_TARGETS)}")
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if isinstance(module, GroupedExperts) and "experts" in targets:
            for attribute in module.projection_names:
                yield name, module, attribute
        elif isinstance(module, Router) and "gate" in targets:
            yield name, module, "weight"
        elif isinstance(module, nn.Linear) and leaf in targets:
            yield name, module, "weight"
        elif isinstance(module, nn.Linear) and "shared_experts" in targets and ".shared_experts." in f".{name}":
            yield name, module, "weight"


def add_lora(model: nn.Module, rank: int, alpha: float, targets: Iterable[str], seed: int = 0) -> int:
    """Attach LoRA to every targeted weight (after expert sharding); returns how many weights got one."""
    if rank <= 0:
        raise ValueError(f"LoRA rank={rank} must be positive")
    count = 0
    for name, module, attribute in list(_targets(model, targets)):
        generator = torch.Generator().manual_seed(seed ^ zlib.crc32(f"{name}.{attribute}".encode()))
        weight = getattr(module, attribute)
        expert_rows = (module.first_expert, module.num_global_experts) if isinstance(module, GroupedExperts) else None
        parametrize.register_parametrization(
            module, attribute, LoRA(weight.detach(), rank, alpha, generator, expert_rows)
        )
        count += 1
    if count == 0:
        raise ValueError(f"no weight matched the LoRA targets {sorted(set(targets))}")
    return count


class PrefixKV(nn.Module):
    """Trainable keys and values [kv_heads, prefix_length, head_dim] that every query of the layer sees."""

    def __init__(self, num_kv_heads: int, prefix_length: int, head_dim: int, generator: torch.Generator):
        super().__init__()
        self.keys = nn.Parameter(
            torch.empty(num_kv_heads, prefix_length, head_dim).normal_(0, 0.02, generator=generator)
        )
        self.values = nn.Parameter(
            torch.empty(num_kv_heads, prefix_length, head_dim).normal_(0, 0.02, generator=generator)
        )


def add_prefix(model: nn.Module, prefix_length: int, seed: int = 0) -> int:
    """Give every grouped-query attention layer a trainable prefix; returns how many layers got one."""
    if prefix_length <= 0:
        raise ValueError(f"prefix_length={prefix_length} must be positive")
    count = 0
    for name, module in model.named_modules():
        if isinstance(module, Attention):
            generator = torch.Generator().manual_seed(seed ^ zlib.crc32(name.encode()))
            module.prefix = PrefixKV(module.num_kv_heads, prefix_length, module.head_dim, generator).to(
                module.q_proj.weight
            )
            count += 1
    if count == 0:
        raise ValueError(
            "prefix tuning needs grouped-query attention layers (model.attention_type=gqa); this model has none"
        )
    return count


def is_adapter(name: str) -> bool:
    return ".lora_A" in name or ".lora_B" in name or ".prefix." in name


def apply_peft(
    model: nn.Module,
    lora_rank: int = 0,
    lora_alpha: float = 16.0,
    lora_targets=("q_proj", "v_proj"),
    prefix_length: int = 0,
    seed: int = 0,
) -> nn.Module:
    """Add the configured adapters and freeze everything else; returns the model."""
    if lora_rank:
        add_lora(model, lora_rank, lora_alpha, lora_targets, seed)
    if prefix_length:
        add_prefix(model, prefix_length, seed)
    for name, param in model.named_parameters():
        param.requires_grad_(is_adapter(name))
    return model


def merge_lora(model: nn.Module) -> nn.Module:
    """Bake every LoRA term into its weight and drop the adapters: plain modules again, for export."""
    for module in list(model.modules()):
        if parametrize.is_parametrized(module):
            for attribute in list(module.parametrizations.keys()):
                original = module.parametrizations[attribute].original
                marked_expert = is_expert(original)
                parametrize.remove_parametrizations(module, attribute, leave_parametrized=True)
                merged = getattr(module, attribute)
                merged.requires_grad_(True)
                if marked_expert:
                    mark_expert(merged)
    return model


def lora_state_dict(model: nn.Module) -> dict:
    """The adapters alone (LoRA A/B and prefixes), by parameter name."""
    return {name: param.detach().clone() for name, param in model.named_parameters() if is_adapter(name)}


def load_lora_state_dict(model: nn.Module, state: dict) -> None:
    """Load adapters saved by lora_state_dict into a model with the same adapters attached."""
    own = {name: param for name, param in model.named_parameters() if is_adapter(name)}
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        raise ValueError(
            f"adapter names differ: missing {missing[:5]}, unexpected {unexpected[:5]}; attach the "
            f"same adapters (rank, targets, prefix length) before loading"
        )
    with torch.no_grad():
        for name, param in own.items():
            if param.shape != state[name].shape:
                raise ValueError(
                    f"adapter {name} has shape {tuple(state[name].shape)} in the file but "
                    f"{tuple(param.shape)} here: use the same LoRA rank and expert layout"
                )
            param.copy_(state[name])
