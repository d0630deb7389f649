"""seed-004's Hugging Face-style causal LM: TransformerForCausalLM, our MoECausalLM under the name and
keywords a transformers user types, with per-layer expert usage on request (docs/seed_api.md)."""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Optional, Union

import torch

from mymoe.config import ModelConfig, MoEModelConfig
from mymoe.model.transformer import CausalLMOutput, MoECausalLM

# the training-dynamics schedules read the step inside MoECausalLM.forward once that keyword exists there;
# until then a step given here changes nothing
FORWARD_TAKES_STEP = "step" in inspect.signature(MoECausalLM.forward).parameters


@dataclass
class MoECausalLMOutput(CausalLMOutput):
    # per MoE layer (the multi-token prediction block last, when there is one), with output_expert_usage:
    expert_usage: Optional[torch.Tensor] = None  # [moe_layers, experts] share of the kept assignments
    imbalances: Optional[torch.Tensor] = None  # [moe_layers] max load / mean load; 1 is balanced


def expert_usage(router_stats: list) -> tuple[torch.Tensor, torch.Tensor]:
    """Router stats of each MoE layer -> (fraction of the kept assignments each expert received
    [moe_layers, experts], max / mean load [moe_layers])."""
    load = torch.stack([stats["tokens_per_expert"] for stats in router_stats]).float()  # [moe_layers, experts]
    usage = load / load.sum(-1, keepdim=True).clamp(min=1)
    return usage, torch.stack([stats["max_load_ratio"] for stats in router_stats]).float()


class TransformerForCausalLM(MoECausalLM):
    """MoECausalLM built from a MoEModelConfig (or our ModelConfig), its forward in Hugging Face's order."""

    def __init__(self, config: Union[MoEModelConfig, ModelConfig]):
        super().__init__(config.to_model_config() if isinstance(config, MoEModelConfig) else config)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.Tensor] = None,
        past_key_values: Optional[list] = None,
        labels: Optional[torch.Tensor] = None,
        use_cache: bool = False,
        output_expert_usage: bool = False,
        return_dict: bool = True,
        shift_labels: Optional[torch.Tensor] = None,
        step: Optional[int] = None,
    ) -> Union[MoECausalLMOutput, tuple]:
        """labels follow Hugging Face (aligned with input_ids, shifted inside); return_dict=False gives
        (loss, logits) with labels, (logits,) without, then expert_usage and imbalances when asked."""
        timing = {"step": step} if FORWARD_TAKES_STEP else {}
        out = super().forward(
            input_ids,
            labels=labels,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            use_cache=use_cache,
            shift_labels=shift_labels,
            **timing,
        )
        output = MoECausalLMOutput(**vars(out))
        if output_expert_usage and output.router_stats:
            output.expert_usage, output.imbalances = expert_usage(output.router_stats)
        if return_dict:
            return output
        extras = (output.expert_usage, output.imbalances) if output_expert_usage else ()
        return ((output.loss,) if output.loss is not None else ()) + (output.logits,) + extras
