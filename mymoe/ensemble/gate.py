"""The sample-level gate: token ids -> one weight per member for the whole sample.

The gate's embedding starts as the average of the members' token embeddings (copied, so the gate owns and
trains it apart from them): a gate that starts from the members' own reading of the vocabulary needs far
fewer steps than one from random vectors. A few causal Transformer blocks follow (plain ones from
mymoe.model, with a dense FFN) and the hidden state at the last real position, which has attended to the
whole sample, is mapped to one logit per member. With no blocks the gate averages the embeddings of the
real positions instead (the last position alone would see one token).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mymoe.config import ModelConfig
from mymoe.model.transformer import MoETransformer


def gate_model_config(vocab_size: int, hidden_size: int, layers: int, heads: int, max_positions: int) -> ModelConfig:
    """The gate's body: `layers` dense blocks (first_k_dense_replace = layers, so no MoE layer)."""
    return ModelConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=max_positions,
        first_k_dense_replace=layers,
    )


class SampleGate(nn.Module):
    def __init__(self, config: ModelConfig, num_members: int):
        super().__init__()
        self.body = MoETransformer(config)
        self.to_members = nn.Linear(config.hidden_size, num_members)
        nn.init.zeros_(self.to_members.weight)  # every member equally likely until the gate has learnt
        nn.init.zeros_(self.to_members.bias)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids [B, S], attention_mask [B, S] (1 = token, left or right padding) -> logits [B, members]."""
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.long()
        if len(self.body.layers) == 0:
            embedded = self.body.norm(self.body.embed_tokens(input_ids))  # [B, S, d]
            pooled = (embedded * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1)
        else:
            hidden, _ = self.body(input_ids, attention_mask)  # [B, S, d]
            pooled = hidden[torch.arange(len(input_ids)), last_real_position(mask)]  # [B, d]
        return self.to_members(pooled)


def last_real_position(attention_mask: torch.Tensor) -> torch.Tensor:
    """[B] index of each row's last position with mask 1: S - 1 under left padding, length - 1 under right."""
    length = attention_mask.shape[1]
    return length - 1 - attention_mask.flip(1).argmax(1)


def route(gate_logits: torch.Tensor, threshold: float) -> torch.Tensor:
    """Gate logits [B, M] -> member weights [B, M] summing to 1 per row: the softmax, with every member below
    `threshold` set to 0 (never the top one, so a sample always has a member) and the rest renormalised.
    Differentiable in the kept weights."""
    probs = F.softmax(gate_logits.float(), dim=-1)
    keep = (probs >= threshold) | F.one_hot(probs.argmax(-1), probs.shape[-1]).bool()
    kept = probs * keep
    return kept / kept.sum(-1, keepdim=True)


def average_embedding(embeddings: list[torch.Tensor]) -> torch.Tensor:
    """The members' token embeddings [V, d] averaged: the gate's starting embedding (a copy)."""
    return torch.stack([weight.detach().float() for weight in embeddings]).mean(0)
