"""All-to-all dispatch that sends each token to a rank once, however many of its k experts live there.

The plain AllToAllDispatcher sends one row per (token, expert) assignment; with fine-grained experts
(top-6 of 64) most of a token's copies go to the same rank. Here a token crosses to a rank once, with
its routing for that rank packed alongside the hidden state, and the rank sends back one row: the
weighted sum of its experts' outputs for that token. The source adds the rows coming back from each
rank. Same result as the plain dispatcher up to the order of the floating-point sum over k; the
traffic shrinks from tokens * k rows to tokens * (distinct ranks per token) rows each way.

    dispatch: per (destination, token) row = [hidden | k weights | k local expert ids], -1 where the slot
              goes elsewhere or was dropped -> count exchange -> all-to-all -> an ExpertBatch that reads
              the received rows expert-major and has the experts add each weighted output back to the
              row it came from (one row per received token)
    combine:  reverse all-to-all -> add per source token

The weights travel in the same differentiable all-to-all as the hidden states, so their gradient (the
router's) comes back through its backward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mymoe.model.moe.dispatch import ExpertBatch
from mymoe.parallel.dispatch import Exchange, ExchangeDispatcher

_SAME_WIDTH_INT = {2: torch.int16, 4: torch.int32, 8: torch.int64}


@dataclass
class DedupHandle(Exchange):
    sent_token: torch.Tensor  # [sent rows] this rank's token behind each row it sent
    num_tokens: int
    hidden_size: int
    top_k: int


class DedupAllToAllDispatcher(ExchangeDispatcher):
    """Drop-in for AllToAllDispatcher (same interface, same results) that moves fewer rows."""

    def _send(self, hidden, expert_indices, expert_weights, keep) -> DedupHandle:
        num_tokens, top_k = expert_indices.shape
        slot_rank = self.owner_rank(expert_indices)  # [tokens, k]
        ranks = torch.arange(self.group_size, device=expert_indices.device)
        # [ranks, tokens, k]: slot j of token t goes to rank r and was kept
        goes_to = slot_rank.unsqueeze(0) == ranks.view(-1, 1, 1)
        if keep is not None:  # None: dropless, all kept
            goes_to &= keep.unsqueeze(0)
        sent_rank, sent_token = goes_to.any(-1).nonzero(as_tuple=True)  # rank-major, then token order
        rows_per_rank = torch.bincount(sent_rank, minlength=self.group_size)
        slot_mask = goes_to[sent_rank, sent_token]  # [sent, k]
        local_ids = torch.where(
            slot_mask,
            expert_indices[sent_token] - sent_rank.unsqueeze(1) * self.num_local_experts,
            torch.full_like(slot_mask, -1, dtype=expert_indices.dtype),
        )
        weights = expert_weights[sent_token] * slot_mask  # [sent, k], zero where the slot is elsewhere
        # one all-to-all carries everything: the ids travel as the raw bits of hidden's dtype (a float
        # conversion would not be exact beyond 256 experts in bf16)
        id_bits = local_ids.to(_SAME_WIDTH_INT[hidden.element_size()]).view(hidden.dtype)
        packed = torch.cat([hidden[sent_token], weights.to(hidden.dtype), id_bits], dim=1)
        # splits must be host integers: the one host read an all-to-all of uneven rows cannot avoid
        input_splits = rows_per_rank.tolist()
        output_splits = self._exchange_counts(rows_per_rank).tolist()
        return DedupHandle(packed, input_splits, output_splits, sent_token, num_tokens, hidden.shape[1], top_k)

    def _expert_batch(self, received, exchange: DedupHandle, positions):
        # every received row carries its own routing, so a chunk of them reads like the whole
        hidden_size, top_k = exchange.hidden_size, exchange.top_k
        received_hidden = received[:, :hidden_size]  # [received, hidden + 2k] -> [received, hidden]
        received_weights = received[:, hidden_size : hidden_size + top_k]
        id_bits = received[:, hidden_size + top_k :].detach().contiguous()
        received_ids = id_bits.view(_SAME_WIDTH_INT[received.element_size()]).long()  # [received, k], -1: not here

        flat_ids = received_ids.reshape(-1)
        assignments = (flat_ids >= 0).nonzero(as_tuple=True)[0]
        # stable sort keeps each expert's rows in (source rank, token) order
        assignments = assignments[torch.argsort(flat_ids[assignments], stable=True)]
        received_row = torch.div(assignments, top_k, rounding_mode="floor")
        tokens_per_expert = torch.bincount(flat_ids[assignments], minlength=self.num_local_experts)
        row_weight = received_weights.reshape(-1).index_select(0, assignments)
        # the experts read received rows and add each weighted output back to the row it came from: one
        # row per received token, ready to go home
        return ExpertBatch(received_hidden, tokens_per_expert, row_index=received_row, row_weight=row_weight)

    def _finish(self, returned, exchange: DedupHandle):
        out = returned.new_zeros(exchange.num_tokens, returned.shape[-1])
        return out.index_add(0, exchange.sent_token, returned)
