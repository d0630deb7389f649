"""Grouped-query self-attention over torch's scaled_dot_product_attention, and its KV cache."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from mymoe.model.layers import RMSNorm, apply_rotary


class KVCache:
    """Rotated keys and values of one attention layer for every position seen so far.

    With ``max_length`` the tensors are allocated once at the first update and written in place (what
    ``generate`` uses: it knows the final length, and decoding then copies nothing); without it each
    update concatenates. ``length`` is the number of filled positions, so the next token's cache slot.
    """

    def __init__(self, max_length: Optional[int] = None):
        self.max_length = max_length
        self.keys: Optional[torch.Tensor] = None  # [B, kv_heads, max_length or length, head_dim]
        self.values: Optional[torch.Tensor] = None
        self.length = 0

    def update(self, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append keys, values [B, kv_heads, S, head_dim]; return all of them so far."""
        new_length = self.length + keys.shape[2]
        if self.max_length is None:
            if self.keys is not None:
                keys = torch.cat((self.keys, keys), dim=2)
                values = torch.cat((self.values, values), dim=2)
            self.keys, self.values, self.length = keys, values, new_length
            return keys, values
        if new_length > self.max_length:
            raise ValueError(
                f"KV cache of max_length={self.max_length} cannot hold {new_length} positions: "
                f"allocate it with a larger max_length"
            )
        if self.keys is None:
            # keys and values may differ in width (MLA caches its latent and its rotated key part)
            self.keys = keys.new_empty(*keys.shape[:2], self.max_length, keys.shape[-1])
            self.values = values.new_empty(*values.shape[:2], self.max_length, values.shape[-1])
        self.keys[:, :, self.length : new_length] = keys
        self.values[:, :, self.length : new_length] = values
        self.length = new_length
        return self.keys[:, :, :new_length], self.values[:, :, :new_length]

    def truncate(self, length: int) -> None:
        """Forget every position from `length` on (a rejected speculative draft)."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot truncate a cache of {self.length} positions to {length}")
        if self.max_length is None and self.keys is not None:
            self.keys, self.values = self.keys[:, :, :length], self.values[:, :, :length]
        self.length = length


class Attention(nn.Module):
    """Causal self-attention where groups of query heads share one key/value head (GQA).

    num_key_value_heads == num_attention_heads is plain multi-head attention, 1 is multi-query.
    Options, all off by default: biases on q, k, v (qkv_bias) and o (out_bias); ``qk_norm`` "head"
    RMS-normalises each query and key head (Qwen3), "full" the whole query and key projection (OLMoE),
    both before rotary; ``clip_qkv`` clamps queries, keys and values after that (OLMoE); ``scale``
    replaces 1 / sqrt(head_dim) as the scores' scale (Granite's attention_multiplier); ``sinks`` adds a
    learned logit per head to every softmax, taking probability but adding no value, and
    ``sliding_window`` lets a query see only the keys less than that many positions back (GPT-OSS);
    ``dropout`` drops attention probabilities in training; ``causal`` False attends both ways (an encoder),
    the padding of the mask still applying.
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        qkv_bias: bool = False,
        out_bias: bool = False,
        qk_norm: Optional[str] = None,
        clip_qkv: Optional[float] = None,
        eps: float = 1e-6,
        scale: Optional[float] = None,
        sinks: bool = False,
        sliding_window: Optional[int] = None,
        dropout: float = 0.0,
        causal: bool = True,
    ):
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.q_proj = nn.Linear(hidden_size, num_heads * head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(num_heads * head_dim, hidden_size, bias=out_bias)
        self.qk_norm, self.clip_qkv = qk_norm, clip_qkv
        self.scale = scale  # None: SDPA's 1 / sqrt(head_dim)
        self.sliding_window = sliding_window
        self.sinks = nn.Parameter(torch.zeros(num_heads)) if sinks else None  # [heads] logits
        if qk_norm is not None:
            per_head = qk_norm == "head"
            self.q_norm = RMSNorm(head_dim if per_head else num_heads * head_dim, eps)
            self.k_norm = RMSNorm(head_dim if per_head else num_kv_heads * head_dim, eps)
        self.prefix = None  # prefix tuning (mymoe.peft): trainable keys and values every query sees
        self.dropout, self.causal = dropout, causal

    def forward(
        self,
        hidden: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: Optional[torch.Tensor] = None,
        cache: Optional[KVCache] = None,
    ) -> torch.Tensor:
        """hidden [B, S, d]; cos, sin [B, S, head_dim]; mask [B, 1, S, past + S] bool (True = may attend)
        or None for plain causal attention over this call's tokens (and the whole cache when S == 1), or for
        attention over every key when the layer is not causal."""
        batch, seq, _ = hidden.shape
        queries, keys, values = self.q_proj(hidden), self.k_proj(hidden), self.v_proj(hidden)
        if self.qk_norm == "full":
            queries, keys = self.q_norm(queries), self.k_norm(keys)
        if self.clip_qkv is not None:
            queries, keys, values = (x.clamp(-self.clip_qkv, self.clip_qkv) for x in (queries, keys, values))
        queries = queries.view(batch, seq, self.num_heads, self.head_dim).transpose(1, 2)
        keys = keys.view(batch, seq, self.num_kv_heads, self.head_dim).transpose(1, 2)
        values = values.view(batch, seq, self.num_kv_heads, self.head_dim).transpose(1, 2)
        if self.qk_norm == "head":
            queries, keys = self.q_norm(queries), self.k_norm(keys)
        queries, keys = apply_rotary(queries, cos, sin), apply_rotary(keys, cos, sin)
        if cache is not None:
            keys, values = cache.update(keys, values)  # [B, kv_heads, past + S, head_dim]
        if self.prefix is not None:
            keys, values, mask = self._with_prefix(keys, values, mask, seq)
        groups = self.num_heads // self.num_kv_heads
        if groups > 1:
            keys = keys.repeat_interleave(groups, dim=1)
            values = values.repeat_interleave(groups, dim=1)
        # is_causal aligns the triangle to the top-left corner, right only when queries and keys start
        # together; every other case comes with an explicit mask
        if self.sliding_window is not None:
            mask = window_mask(mask, seq, keys.shape[2], self.sliding_window, keys.device)
        dropout_p = self.dropout if self.training else 0.0
        if self.sinks is not None:
            out = attention_with_sinks(queries, keys, values, mask, self.sinks, self.scale, dropout_p)
        else:
            is_causal = self.causal and mask is None and seq > 1
            out = F.scaled_dot_product_attention(
                queries, keys, values, attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal, scale=self.scale
            )
        return self.o_proj(out.transpose(1, 2).reshape(batch, seq, self.num_heads * self.head_dim))

    def _with_prefix(self, keys, values, mask, seq: int):
        """Prepend the prefix positions (no rotary: they have no place in the sequence), visible to all."""
        batch, prefix_length = keys.shape[0], self.prefix.keys.shape[1]
        keys = torch.cat([self.prefix.keys.to(keys.dtype).expand(batch, -1, -1, -1), keys], dim=2)
        values = torch.cat([self.prefix.values.to(values.dtype).expand(batch, -1, -1, -1), values], dim=2)
        if mask is None:  # the plain causal (or full) case, now with the prefix columns in front
            total = keys.shape[2] - prefix_length
            query_slot = torch.arange(total - seq, total, device=keys.device)[:, None]
            mask = (torch.arange(total, device=keys.device)[None, :] <= query_slot)[None, None]
            mask = mask if self.causal else torch.ones_like(mask)
        visible = mask.new_ones(mask.shape[:-1] + (prefix_length,))
        return keys, values, torch.cat([visible, mask], dim=-1)


def window_mask(mask: Optional[torch.Tensor], seq: int, total: int, window: int, device) -> torch.Tensor:
    """The boolean mask [B or 1, 1, S, total] (the causal one when mask is None) limited to keys fewer than
    `window` slots before each query, as transformers' sliding-window layers (the queries are the last S slots)."""
    query_slot = torch.arange(total - seq, total, device=device)[:, None]
    key_slot = torch.arange(total, device=device)[None, :]
    near = (key_slot <= query_slot) & (key_slot > query_slot - window)  # [S, total]
    return near[None, None] if mask is None else mask & near


def attention_with_sinks(
    queries, keys, values, mask, sinks: torch.Tensor, scale: Optional[float], dropout_p: float = 0.0
) -> torch.Tensor:
    """softmax over [scores, sink] with the sink's column dropped, times values: queries [B, H, S, d], keys and
    values [B, H, T, d], mask [B or 1, 1, S, T] bool or None (causal), sinks [H]. Written out (SDPA has no sink)."""
    seq, total = queries.shape[2], keys.shape[2]
    scale = scale if scale is not None else queries.shape[-1] ** -0.5
    scores = (queries @ keys.transpose(-1, -2)).float() * scale  # [B, H, S, T]
    if mask is None:
        mask = window_mask(None, seq, total, total + 1, queries.device)
    scores = scores.masked_fill(~mask, float("-inf"))
    sink = sinks.float().view(1, -1, 1, 1).expand(scores.shape[0], -1, seq, 1)
    probs = torch.cat([scores, sink], dim=-1).softmax(dim=-1)[..., :-1]
    if dropout_p:
        probs = F.dropout(probs, dropout_p)
    return probs.to(values.dtype) @ values


def build_attention_mask(
    attention_mask: Optional[torch.Tensor], past_length: int, seq_len: int, device, causal: bool = True
) -> Optional[torch.Tensor]:
    """The boolean mask [B or 1, 1, S, past + S] for SDPA, built once per forward for every layer.

    attention_mask [B, past + S] marks real tokens with 1 and padding with 0 (left padding included).
    Returns None where SDPA's own is_causal flag (or no mask at all, for one query) is exact, which
    lets it pick its fastest kernel. Not causal (an encoder): only the padding is masked.
    """
    total = past_length + seq_len
    if attention_mask is None and (past_length == 0 or seq_len == 1 or not causal):
        return None
    query_slot = torch.arange(past_length, total, device=device)[:, None]  # [S, 1]
    key_slot = torch.arange(total, device=device)[None, :]  # [1, past + S]
    allowed = (key_slot <= query_slot)[None, None] if causal else (key_slot >= 0)[None, None]  # [1, 1, S, past + S]
    if attention_mask is not None:
        if attention_mask.shape[-1] != total:
            raise ValueError(
                f"attention_mask covers {attention_mask.shape[-1]} positions but the cache and "
                f"input hold {total}: pass the mask of the whole sequence so far"
            )
        allowed = allowed & attention_mask.bool()[:, None, None, :]
        # a padding query before any real token would see no key at all, and an all-masked softmax row
        # is NaN; let it see itself (its output is never used, but NaN would poison the MoE statistics)
        allowed = allowed | (key_slot == query_slot)[None, None]
    return allowed
