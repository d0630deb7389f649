"""Multi-token prediction (DeepSeek-V3, depth 1) and the self-speculative greedy decoding it allows.

The extra head predicts token t+2 from the main model's final hidden state at t and the embedding of
token t+1 (the token the main head predicts there):

    h = eh_proj([enorm(embed(x[t+1])) | hnorm(hidden[t])]) -> one more block -> norm -> the shared lm_head

Training adds ``mtp_loss_weight`` times its cross-entropy to the loss. At generation it is a free
draft model: each main forward verifies the previous draft and the head proposes the next one, so a
step of two tokens through the main model yields two tokens when the draft was right and one when it
was not. Only the main model's argmax is ever emitted, so the output is the plain greedy output.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from mymoe.model.attention import KVCache
from mymoe.model.layers import build_norm


class MultiTokenPrediction(nn.Module):
    """One DeepSeek-V3 MTP module; names follow the Hugging Face checkpoint layout (enorm, hnorm,
    eh_proj, the block, and shared_head.norm here called norm)."""

    def __init__(self, config, block: nn.Module):
        super().__init__()
        self.enorm = build_norm(config.norm_type, config.hidden_size, config.rms_norm_eps)
        self.hnorm = build_norm(config.norm_type, config.hidden_size, config.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * config.hidden_size, config.hidden_size, bias=False)
        self.block = block
        self.norm = build_norm(config.norm_type, config.hidden_size, config.rms_norm_eps)

    def forward(self, hidden, next_embeddings, cos, sin, mask=None, cache=None):
        """hidden [B, S, d] of the main model at positions t, next_embeddings [B, S, d] of tokens t+1
        -> (hidden [B, S, d] for the shared head, MoEAux or None)."""
        mixed = self.eh_proj(torch.cat([self.enorm(next_embeddings), self.hnorm(hidden)], dim=-1))
        mixed, aux = self.block(mixed, cos, sin, mask, cache)
        return self.norm(mixed), aux


@dataclass
class SpeculativeResult:
    tokens: torch.Tensor  # [1, prompt + new]
    drafts: int  # drafts proposed by the MTP head
    accepted: int  # drafts the main model confirmed

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / max(self.drafts, 1)


@torch.no_grad()
def speculative_greedy(model, input_ids: torch.Tensor, max_new_tokens: int) -> SpeculativeResult:
    """Greedy decoding of one prompt [1, S], drafting with the MTP head and verifying with the main one.

    Each loop feeds the main model [last token, draft] at once; the main argmax after the last token
    either confirms the draft (then the argmax after the draft comes free) or replaces it, and the
    draft's cache entry is dropped. The MTP head keeps its own cache over the confirmed positions.
    """
    if input_ids.shape[0] != 1:
        raise ValueError(f"speculative decoding runs one prompt at a time, got a batch of {input_ids.shape[0]}")
    if model.mtp is None:
        raise ValueError("the model has no multi-token prediction head: set model.num_nextn_predict_layers=1")
    prompt_length = input_ids.shape[1]
    max_length = prompt_length + max_new_tokens + 1
    main_cache = [KVCache(max_length=max_length) for _ in range(model.config.num_hidden_layers)]
    mtp_cache = KVCache(max_length=max_length)

    prefill = model(input_ids, past_key_values=main_cache)
    tokens = torch.cat([input_ids, prefill.logits[:, -1:].argmax(-1)], dim=1)
    # the head's positions 0..S-1 pair hidden[t] with token t+1, the last one with the token just chosen
    draft = model.mtp_draft(prefill.hidden, tokens[:, 1:], start=0, cache=mtp_cache)
    drafts = accepted = 0
    while tokens.shape[1] - prompt_length < max_new_tokens:
        position = tokens.shape[1] - 1  # of the last confirmed token, not yet through the main model
        step = model(torch.cat([tokens[:, -1:], draft], dim=1), past_key_values=main_cache)
        choice = step.logits.argmax(-1)  # [1, 2]: after the last token, after the draft
        drafts += 1
        if bool(choice[0, 0] == draft[0, 0]):
            accepted += 1
            new_tokens, verified_hidden = torch.cat([draft, choice[:, 1:]], dim=1), step.hidden
        else:
            for cache in main_cache:
                cache.truncate(position + 1)  # forget the rejected draft
            new_tokens, verified_hidden = choice[:, :1], step.hidden[:, :1]
        tokens = torch.cat([tokens, new_tokens], dim=1)
        draft = model.mtp_draft(verified_hidden, new_tokens, start=position, cache=mtp_cache)
    return SpeculativeResult(tokens[:, : prompt_length + max_new_tokens], drafts, accepted)
