"""train.compile: torch.compile (inductor) the parts of each block that compile well, in place.

Compiled: the norms, the attention, a dense block's MLP, and a MoE block's router and shared experts
(fixed shapes, no data-dependent control flow). Left eager: the routed experts and their dispatch. Their
row counts depend on the routing, the fused gather-GEMM-scatter is a custom autograd Function over
Python-planned chunks, the all-to-all dispatchers read split sizes on the host, and tracing
torch._grouped_mm on CPU fails (its fake kernel accepts only bf16 while the CPU kernel runs fp32).
benchmarks/compile.py measures the step against eager.
"""

from __future__ import annotations

from torch import nn


def compiled_parts(block: nn.Module) -> list[nn.Module]:
    """The submodules of one transformer block that train.compile compiles."""
    parts = [block.input_layernorm, block.self_attn, block.post_attention_layernorm]
    if not block.is_moe:
        return parts + [block.mlp]
    parts.append(block.mlp.gate)
    if block.mlp.shared_experts is not None:
        parts.append(block.mlp.shared_experts)
    return parts


def compile_blocks(model: nn.Module) -> None:
    """Compile every block's compiled_parts (the MTP block's too) in place; parameters are untouched, so
    optimizer, checkpoints and FSDP see the same module tree."""
    blocks = list(model.model.layers)
    if model.mtp is not None:
        blocks.append(model.mtp.block)
    for block in blocks:
        for part in compiled_parts(block):
            part.compile()
