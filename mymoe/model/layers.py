"""Building blocks shared by every layer: the norms, the FFNs (SwiGLU, plain GELU) and rotary position embeddings.

The rotary variants (none, linear, dynamic NTK, YaRN) follow the formulas of Hugging Face
``transformers.modeling_rope_utils`` line for line, so a model exported to Mixtral, Qwen2-MoE or DeepSeek
names produces the same logits there.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        # statistics in fp32 and the weight applied after casting back, as Hugging Face does, so bf16
        # outputs round the same way
        input_dtype = hidden.dtype
        hidden = hidden.float()
        hidden = hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * hidden.to(input_dtype)


def build_norm(norm_type: str, hidden_size: int, eps: float) -> nn.Module:
    """The residual stream's norm: RMSNorm, or torch's LayerNorm with weight and bias ("layernorm")."""
    return nn.LayerNorm(hidden_size, eps=eps) if norm_type == "layernorm" else RMSNorm(hidden_size, eps)


def dropout(hidden: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    # skipped outright at 0 so that a model without dropout draws no random numbers and computes exactly
    # what it did before dropout existed
    return F.dropout(hidden, p, training=True) if p and training else hidden


class SwiGLU(nn.Module):
    """down(dropout(silu(gate(x)) * up(x))): the dense FFN, and the shape of every expert."""

    def __init__(self, hidden_size: int, intermediate_size: int, dropout: float = 0.0):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)
        self.dropout = dropout

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        inner = F.silu(self.gate_proj(hidden)) * self.up_proj(hidden)
        return self.down_proj(dropout(inner, self.dropout, self.training))


class GELUMLP(nn.Module):
    """down(dropout(gelu(up(x)))): the plain two-layer FFN (w1, w2) of GPT-2, BERT and the MoE-layer tutorial."""

    def __init__(self, hidden_size: int, intermediate_size: int, dropout: float = 0.0):
        super().__init__()
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)
        self.dropout = dropout

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.down_proj(dropout(F.gelu(self.up_proj(hidden)), self.dropout, self.training))


def build_ffn(gelu: bool, hidden_size: int, intermediate_size: int, dropout: float = 0.0) -> nn.Module:
    return (GELUMLP if gelu else SwiGLU)(hidden_size, intermediate_size, dropout)


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


class RotaryEmbedding(nn.Module):
    """cos and sin tables for rotary position embeddings, with optional context-length scaling.

    ``scaling`` is the config's ``rope_scaling`` dict (``type`` or ``rope_type``: linear, dynamic or yarn,
    plus ``factor`` and the YaRN keys) or None. The inverse frequencies are recomputed on each call (a
    head_dim / 2 vector, once per forward): they stay fp32 when the model is cast to bf16, follow the
    model across devices without a buffer, and dynamic NTK needs the current length anyway.
    """

    def __init__(
        self, head_dim: int, max_position_embeddings: int, theta: float = 10000.0, scaling: Optional[dict] = None
    ):
        super().__init__()
        self.head_dim = head_dim
        self.max_position_embeddings = max_position_embeddings
        self.theta = theta
        scaling = dict(scaling or {})
        self.kind = scaling.get("type", scaling.get("rope_type", "default"))
        if self.kind not in ("default", "linear", "dynamic", "yarn"):
            raise ValueError(f"rope scaling type {self.kind!r} is unknown: use linear, dynamic or yarn")
        self.factor = float(scaling.get("factor", 1.0))
        self.attention_scaling = 1.0
        if self.kind == "yarn":
            self._init_yarn(scaling)

    @classmethod
    def from_config(cls, config) -> "RotaryEmbedding":
        """The table a model with this ModelConfig rotates by: over config.rope_head_dim, which is
        qk_rope_head_dim for multi-head latent attention (only that part of each head rotates) and head_dim
        otherwise. The model and inference-time rescaling both build it here, so they cannot disagree."""
        return cls(config.rope_head_dim, config.max_position_embeddings, config.rope_theta, config.rope_scaling)

    def _exponents(self, device) -> torch.Tensor:
        return torch.arange(0, self.head_dim, 2, dtype=torch.int64, device=device).float() / self.head_dim

    def _init_yarn(self, scaling: dict) -> None:
        # YaRN: high-frequency dimensions (many rotations within the original context) keep their
        # frequency, low-frequency ones are interpolated by `factor`, with a linear ramp in between; the
        # attention logits are sharpened by mscale^2 through cos and sin
        original_max = scaling.get("original_max_position_embeddings", self.max_position_embeddings)
        attention_factor = scaling.get("attention_factor")
        mscale, mscale_all_dim = scaling.get("mscale"), scaling.get("mscale_all_dim")
        if attention_factor is None:
            if mscale and mscale_all_dim:
                attention_factor = yarn_mscale(self.factor, mscale) / yarn_mscale(self.factor, mscale_all_dim)
            else:
                attention_factor = yarn_mscale(self.factor)
        self.attention_scaling = float(attention_factor)
        beta_fast = scaling.get("beta_fast") or 32
        beta_slow = scaling.get("beta_slow") or 1
        dim = self.head_dim

        def correction_dim(num_rotations: float) -> float:
            return dim * math.log(original_max / (num_rotations * 2 * math.pi)) / (2 * math.log(self.theta))

        low, high = correction_dim(beta_fast), correction_dim(beta_slow)
        if scaling.get("truncate", True):
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, dim - 1)
        if low == high:
            high += 0.001  # a zero-width ramp would divide by zero
        self.yarn_low, self.yarn_high = low, high

    def inv_freq(self, seq_len: torch.Tensor, device) -> torch.Tensor:
        """Inverse frequencies [head_dim / 2] for sequences of `seq_len` positions (a 0-d tensor)."""
        exponents = self._exponents(device)
        if self.kind == "dynamic":
            # NTK-aware base growth, only once the sequence outgrows the trained context; computed in
            # fp32 tensors as transformers does, and without a host sync on seq_len
            seq_len = torch.clamp(seq_len, min=self.max_position_embeddings)
            ratio = self.factor * seq_len / self.max_position_embeddings - (self.factor - 1)
            base = self.theta * ratio ** (self.head_dim / (self.head_dim - 2))
            return 1.0 / (base**exponents)
        theta_powers = self.theta**exponents
        if self.kind == "linear":
            return 1.0 / theta_powers / self.factor  # same as dividing positions by factor
        if self.kind == "yarn":
            ramp = torch.arange(self.head_dim // 2, dtype=torch.float32, device=device) - self.yarn_low
            ramp = torch.clamp(ramp / (self.yarn_high - self.yarn_low), 0, 1)
            extrapolation_weight = 1 - ramp
            interpolated, extrapolated = 1.0 / (self.factor * theta_powers), 1.0 / theta_powers
            return interpolated * (1 - extrapolation_weight) + extrapolated * extrapolation_weight
        return 1.0 / theta_powers

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """position_ids [B, S] -> cos, sin [B, S, head_dim] in `dtype`."""
        seq_len = position_ids.max() + 1
        inv_freq = self.inv_freq(seq_len, position_ids.device)
        angles = position_ids[..., None].float() * inv_freq  # [B, S, head_dim / 2]
        angles = torch.cat((angles, angles), dim=-1)
        cos = angles.cos() * self.attention_scaling
        sin = angles.sin() * self.attention_scaling
        return cos.to(dtype), sin.to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, heads, S, head_dim] rotated by cos, sin [B, S, head_dim] (the half-split layout of HF)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return x * cos + rotate_half(x) * sin
