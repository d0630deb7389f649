"""Our stacked experts <-> Hugging Face's one module per expert, and the dense FFN layers, shared by
every format adapter.

Ours: experts.w_gate, w_up [E, hidden, ffn] and w_down [E, ffn, hidden], the transposes of the
nn.Linear weights that transformers keeps per expert under experts.{e}.{gate, up, down name}.weight.
"""

from __future__ import annotations

import torch

OURS = ("w_gate", "w_up", "w_down")
HF_NAMES = ("gate_proj", "up_proj", "down_proj")


def experts_to_hf(base: str, mlp: dict, names: tuple = HF_NAMES) -> dict:
    return {
        f"{base}.experts.{e}.{theirs}.weight": mlp[f"experts.{ours}"][e].T
        for e in range(mlp["experts.w_gate"].shape[0])
        for ours, theirs in zip(OURS, names)
    }


def experts_from_hf(base: str, tensors: dict, num_experts: int, names: tuple = HF_NAMES) -> dict:
    return {
        f"experts.{ours}": torch.stack([tensors[f"{base}.experts.{e}.{theirs}.weight"].T for e in range(num_experts)])
        for ours, theirs in zip(OURS, names)
    }


def dense_mlp_from_hf(base: str, tensors: dict) -> dict:
    """A dense SwiGLU layer (first_k_dense_replace, mlp_only_layers): the same names on both sides."""
    return {f"{proj}.weight": tensors[f"{base}.{proj}.weight"] for proj in HF_NAMES}
