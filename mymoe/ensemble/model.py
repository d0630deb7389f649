"""GatedEnsemble: trained members and a sample-level gate, whose output is the weighted mix of the members'
next-token probabilities.

Probabilities are mixed, not logits: p(token) = sum_m w_m p_m(token), a mixture of the members' predictive
distributions, so a member that is sure of a token keeps that certainty in proportion to its weight (an
average of logits would instead be a product of experts, sharper than any member where they agree and
meaningless across members whose logits have different offsets). The mix is kept in log space
(logsumexp of log w_m + log p_m) so that no probability underflows.

A member whose weight is 0 for a sample (below the gate's threshold) does not run on it: each member runs on
the rows routed to it only, in generation with a KV cache of those rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Optional

import torch
import torch.nn.functional as F
from torch import nn

from mymoe.ensemble.gate import SampleGate, route
from mymoe.model import MoECausalLM
from mymoe.model.attention import KVCache
from mymoe.model.transformer import IGNORE_INDEX, sample_next_token


# the settings of sample_next_token, with MoECausalLM.generate's defaults
SAMPLING_DEFAULTS = {"temperature": 1.0, "top_k": None, "top_p": None, "repetition_penalty": 1.0, "generator": None}


@dataclass
class EnsembleOutput:
    log_probs: torch.Tensor  # [B, S, V] log of the mixed next-token probabilities
    gate_logits: torch.Tensor  # [B, members]
    weights: torch.Tensor  # [B, members] after the threshold, summing to 1 per row
    lm_loss: Optional[torch.Tensor] = None  # mean negative log-likelihood of the labels under the mix


class GatedEnsemble(nn.Module):
    def __init__(self, members: list[MoECausalLM], gate: SampleGate, threshold: float):
        super().__init__()
        self.members = nn.ModuleList(members)
        self.gate = gate
        self.threshold = threshold

    def train(self, mode: bool = True) -> GatedEnsemble:
        """The members stay in eval mode (no router noise, eval capacity) while the gate and adapters train:
        they are finished models, and their routing should not change with the gate's mode."""
        super().train(mode)
        self.members.eval()
        return self

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        gate_tokens: Optional[int] = None,
    ) -> EnsembleOutput:
        """input_ids, labels [B, S] (labels already shifted, -100 ignored, as MoECausalLM takes them).
        gate_tokens: the gate reads only the first this many positions (a prompt), not the whole sample."""
        seen = slice(None, gate_tokens)
        gate_logits = self.gate(input_ids[:, seen], attention_mask[:, seen] if attention_mask is not None else None)
        weights = route(gate_logits, self.threshold)
        log_probs = self.mix(input_ids, attention_mask, weights)
        output = EnsembleOutput(log_probs, gate_logits, weights)
        if labels is not None:
            output.lm_loss = F.nll_loss(log_probs.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX)
        return output

    def mix(
        self,
        input_ids: torch.Tensor,
        attention_mask: Optional[torch.Tensor],
        weights: torch.Tensor,
        caches: Optional[list[list[KVCache]]] = None,
    ) -> torch.Tensor:
        """log sum_m w_m p_m [B, S, V] over the members each row is routed to (weights [B, M]); member m runs
        on its rows only, with caches[m] holding those rows' keys and values when given."""
        log_mix = None
        for index, member in enumerate(self.members):
            rows = weights[:, index].nonzero().squeeze(1)
            if len(rows) == 0:
                continue
            logits = member(
                input_ids[rows],
                attention_mask=attention_mask[rows] if attention_mask is not None else None,
                past_key_values=caches[index] if caches is not None else None,
            ).logits
            term = weights[rows, index, None, None].log() + F.log_softmax(logits.float(), dim=-1)  # [rows, S, V]
            if log_mix is None:
                log_mix = term.new_full((len(input_ids), *term.shape[1:]), float("-inf"))
            log_mix = log_mix.index_copy(0, rows, torch.logaddexp(log_mix.index_select(0, rows), term))
        return log_mix

    @torch.no_grad()
    def member_losses(self, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """[B, members]: each member's mean loss on each sample, every member on every row (the gate's
        training target is the member with the lowest)."""
        columns = []
        for member in self.members:
            log_probs = F.log_softmax(member(input_ids).logits.float(), dim=-1)
            columns.append(sample_losses(log_probs, labels))
        return torch.stack(columns, dim=1)

    @torch.no_grad()
    def routing(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """[B, members]: the weights the gate gives each sample (0 for a skipped member)."""
        return route(self.gate(input_ids, attention_mask), self.threshold)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, **sampling) -> torch.Tensor:
        """Continue each prompt [B, S] by up to max_new_tokens; returns [B, S + new] (arguments: ``stream``)."""
        new_tokens = [next_token[:, None] for next_token in self.stream(input_ids, max_new_tokens, **sampling)]
        return torch.cat([input_ids, *new_tokens], dim=1)

    @torch.no_grad()
    def stream(
        self,
        input_ids: torch.Tensor,
        max_new_tokens: int,
        attention_mask: Optional[torch.Tensor] = None,
        eos_token_id: Optional[int] = None,
        vocab_limit: Optional[int] = None,
        **sampling,
    ) -> Iterator[torch.Tensor]:
        """Yield each step's next token of every row [B], drawn from the mixed distribution by
        MoECausalLM's rule (sample_next_token; `sampling`: temperature, 0 greedy, top_k, top_p,
        repetition_penalty, generator). Left padding has attention_mask 0; a row that produced eos_token_id
        keeps emitting it until all have; ids from vocab_limit up are never drawn.

        The gate reads the prompt once: a row keeps its members and weights for the whole continuation, so
        each member's KV cache holds the same rows throughout.
        """
        unknown = sorted(set(sampling) - set(SAMPLING_DEFAULTS))
        if unknown:
            raise ValueError(f"unknown sampling settings {unknown}: choose from {', '.join(SAMPLING_DEFAULTS)}")
        settings = {**SAMPLING_DEFAULTS, **sampling}
        was_training = self.training
        self.eval()
        try:
            if attention_mask is not None and bool(attention_mask.all()):
                attention_mask = None  # no padding: attention's causal fast path
            weights = self.routing(input_ids, attention_mask)
            caches = [
                [KVCache(max_length=input_ids.shape[1] + max_new_tokens) for _ in member.model.layers]
                for member in self.members
            ]
            finished = torch.zeros(len(input_ids), dtype=torch.bool, device=input_ids.device)
            tokens, step_input = input_ids, input_ids
            for _ in range(max_new_tokens):
                log_probs = self.mix(step_input, attention_mask, weights, caches)[:, -1]  # [B, V]
                if vocab_limit is not None:
                    log_probs[:, vocab_limit:] = float("-inf")
                # log probabilities serve as logits: their softmax is the mixed distribution itself
                next_token = sample_next_token(log_probs, tokens, attention_mask, **settings)  # [B]
                if eos_token_id is not None:
                    next_token = next_token.masked_fill(finished, eos_token_id)
                    finished |= next_token == eos_token_id
                yield next_token
                if bool(finished.all()):
                    break
                tokens, step_input = torch.cat((tokens, next_token[:, None]), dim=1), next_token[:, None]
                if attention_mask is not None:
                    attention_mask = F.pad(attention_mask, (0, 1), value=1)
        finally:
            self.train(was_training)


def sample_losses(log_probs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[B]: each sample's mean negative log-likelihood over its labels other than -100 (0 when it has none)."""
    losses = F.nll_loss(log_probs.transpose(1, 2), labels, ignore_index=IGNORE_INDEX, reduction="none")  # [B, S]
    return losses.sum(1) / (labels != IGNORE_INDEX).sum(1).clamp(min=1)
