"""Multi-head latent attention (DeepSeek-V2/V3): keys and values through a low-rank latent.

    kv_a_proj_with_mqa: hidden -> [latent (kv_lora_rank) | k_rope (qk_rope_head_dim)]
    latent -> kv_a_layernorm -> kv_b_proj -> per head [k_nope (qk_nope_head_dim) | v (v_head_dim)]
    queries: hidden -> q_proj (or q_a_proj -> q_a_layernorm -> q_b_proj with q_lora_rank)
             -> per head [q_nope | q_rope]
    score = q_nope . k_nope + rope(q_rope) . rope(k_rope)   (k_rope is one head shared by all heads)

Rotary position lives only in the decoupled qk_rope_head_dim part, so the latent itself is position
free: the cache stores the normalised latent and the rotated shared k_rope, kv_lora_rank +
qk_rope_head_dim numbers per token and layer, instead of 2 x kv_heads x head_dim for GQA. Decoding
expands the cached latent through kv_b_proj again (the simple form; absorbing kv_b_proj into the query
and output projections saves that work at inference and computes the same thing).
Module names follow Hugging Face's DeepseekV3Attention.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from mymoe.model.attention import KVCache
from mymoe.model.layers import RMSNorm, apply_rotary, yarn_mscale


class MultiHeadLatentAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.q_lora_rank = config.q_lora_rank
        self.kv_lora_rank = config.kv_lora_rank
        self.nope_dim = config.qk_nope_head_dim
        self.rope_dim = config.qk_rope_head_dim
        self.v_head_dim = config.v_head_dim
        query_dim = self.num_heads * (self.nope_dim + self.rope_dim)
        if self.q_lora_rank is None:
            self.q_proj = nn.Linear(config.hidden_size, query_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(config.hidden_size, self.q_lora_rank, bias=False)
            self.q_a_layernorm = RMSNorm(self.q_lora_rank, config.rms_norm_eps)
            self.q_b_proj = nn.Linear(self.q_lora_rank, query_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(config.hidden_size, self.kv_lora_rank + self.rope_dim, bias=False)
        self.kv_a_layernorm = RMSNorm(self.kv_lora_rank, config.rms_norm_eps)
        self.kv_b_proj = nn.Linear(self.kv_lora_rank, self.num_heads * (self.nope_dim + self.v_head_dim), bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.v_head_dim, config.hidden_size, bias=False)
        self.set_rope_scaling(config.rope_scaling)
        self.dropout, self.causal = config.attention_dropout, config.is_causal

    def set_rope_scaling(self, scaling: Optional[dict]) -> None:
        """The softmax scale for this rope_scaling: at construction, and again when the context is extended
        at inference (the rotary table alone would leave DeepSeek's YaRN sharpening behind)."""
        self.scale = 1.0 / math.sqrt(self.nope_dim + self.rope_dim)
        scaling = scaling or {}
        if scaling.get("type", scaling.get("rope_type")) == "yarn" and scaling.get("mscale_all_dim"):
            # DeepSeek sharpens the softmax by the YaRN mscale of all dimensions, squared (as transformers)
            self.scale *= yarn_mscale(float(scaling["factor"]), float(scaling["mscale_all_dim"])) ** 2

    def cache_numbers_per_token(self) -> int:
        """What the cache holds per token and layer: the latent and the shared rotated key part."""
        return self.kv_lora_rank + self.rope_dim

    def forward(
        self,
        hidden: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: Optional[torch.Tensor] = None,
        cache: Optional[KVCache] = None,
    ) -> torch.Tensor:
        """hidden [B, S, d]; cos, sin [B, S, qk_rope_head_dim]; mask and cache as for Attention."""
        batch, seq, _ = hidden.shape
        if self.q_lora_rank is None:
            queries = self.q_proj(hidden)
        else:
            queries = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(hidden)))
        queries = queries.view(batch, seq, self.num_heads, self.nope_dim + self.rope_dim).transpose(1, 2)
        q_nope, q_rope = queries.split([self.nope_dim, self.rope_dim], dim=-1)
        q_rope = apply_rotary(q_rope, cos, sin)

        latent, k_rope = self.kv_a_proj_with_mqa(hidden).split([self.kv_lora_rank, self.rope_dim], dim=-1)
        latent = self.kv_a_layernorm(latent).unsqueeze(1)  # [B, 1, S, kv_lora_rank]
        k_rope = apply_rotary(k_rope.unsqueeze(1), cos, sin)  # [B, 1, S, rope_dim]
        if cache is not None:
            latent, k_rope = cache.update(latent, k_rope)  # the whole sequence so far
        total = latent.shape[2]
        kv = self.kv_b_proj(latent.squeeze(1)).view(batch, total, self.num_heads, self.nope_dim + self.v_head_dim)
        k_nope, values = kv.transpose(1, 2).split([self.nope_dim, self.v_head_dim], dim=-1)
        keys = torch.cat([k_nope, k_rope.expand(-1, self.num_heads, -1, -1)], dim=-1)
        queries = torch.cat([q_nope, q_rope], dim=-1)
        is_causal = self.causal and mask is None and seq > 1
        dropout_p = self.dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(
            queries, keys, values, attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal, scale=self.scale
        )  # [B, heads, S, v_head_dim]
        return self.o_proj(out.transpose(1, 2).reshape(batch, seq, self.num_heads * self.v_head_dim))
