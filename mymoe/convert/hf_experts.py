"""Our stacked experts <-> Hugging Face's one module per expert, and the dense FFN layers, shared by
every format adapter.

Ours: experts.w_gate, w_up [E, hidden, ffn] and w_down [E, ffn, hidden], the transposes of the
nn.Linear weights that transformers keeps per expert under experts.{e}.{gate, up, down name}.weight.
"""

from __future__ import annotations

import torch

from mymoe.config import MoEConfig

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


def softmax_router_refusals(moe: MoEConfig, family: str, renormalises: bool, shared_hint: str = "") -> list[str]:
    """Why a softmax-routed family without shared experts cannot hold `moe` (empty: it can). `renormalises`:
    the family always renormalises its top-k weights (Mixtral, Granite, GPT-OSS: the softmax of the top-k
    logits), rather than only when asked and k > 1 (Qwen3-MoE, OLMoE)."""
    problems = []
    if moe.scoring_func != "softmax":
        problems.append(f"scoring_func={moe.scoring_func!r}: {family} scores experts with softmax")
    k = moe.num_experts_per_tok
    if renormalises and (not moe.norm_topk_prob or k == 1):
        problems.append(
            f"norm_topk_prob={moe.norm_topk_prob} with num_experts_per_tok={k}: {family} always renormalises "
            f"the top-k weights (ours does so only for k > 1 with norm_topk_prob)"
        )
    if not renormalises and moe.norm_topk_prob and k == 1:
        problems.append(
            f"norm_topk_prob=true with num_experts_per_tok=1: {family} renormalises the single weight to 1, "
            f"ours keeps the probability (set norm_topk_prob: false, which computes the same)"
        )
    if moe.n_shared_experts:
        problems.append(f"n_shared_experts={moe.n_shared_experts}: {family} has no shared experts{shared_hint}")
    return problems
