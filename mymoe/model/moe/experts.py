"""Stacked expert weights and the grouped GEMM that runs every expert's SwiGLU in one call.

The experts see only contiguous, expert-sorted rows and how many belong to each expert; they never see
routing. Weights are stacked per projection ([experts, in, out]) so one ``torch._grouped_mm`` covers all
experts, and a loop over contiguous slices does the same work where grouped GEMM is unavailable (float64,
row strides that are not a multiple of 16 bytes, GPUs older than sm90) or when forced for tests.

Every expert parameter carries ``param.is_expert = True``: the one marker the optimizer groups, the
expert-data-parallel gradient reduction and checkpoint resharding look for.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn


def grouped_mm_supported(dtype: torch.dtype, device: torch.device, *row_sizes: int) -> bool:
    """Whether ``torch._grouped_mm`` can multiply tensors of this dtype on this device.

    ``row_sizes`` are the contiguous last dimensions involved; the kernels need every row stride to be a
    multiple of 16 bytes.
    """
    if not hasattr(torch, "_grouped_mm"):
        return False
    if device.type == "cpu":
        dtype_ok = dtype in (torch.float32, torch.bfloat16, torch.float16)
    elif device.type == "cuda":
        dtype_ok = dtype == torch.bfloat16 and torch.cuda.get_device_capability(device) >= (9, 0)
    else:
        dtype_ok = False
    element_size = torch.empty((), dtype=dtype).element_size()
    return dtype_ok and all(size * element_size % 16 == 0 for size in row_sizes)


def _grouped_matmul(rows: torch.Tensor, weight: torch.Tensor, offsets: Optional[torch.Tensor],
                    counts: Optional[list]) -> torch.Tensor:
    """rows [N, K] times weight[e] [K, M] for each expert's contiguous slice of rows -> [N, M]."""
    if offsets is not None:
        return torch._grouped_mm(rows, weight, offs=offsets)
    out = rows.new_empty(rows.shape[0], weight.shape[-1])
    for expert, (rows_e, out_e) in enumerate(zip(rows.split(counts), out.split(counts))):
        torch.mm(rows_e, weight[expert], out=out_e)
    return out


def _grouped_weight_grad(rows: torch.Tensor, grad: torch.Tensor, offsets: Optional[torch.Tensor],
                         counts: Optional[list]) -> torch.Tensor:
    """rows_e^T @ grad_e for each expert's slice: rows [N, K], grad [N, M] -> [experts, K, M]."""
    if offsets is not None:
        return torch._grouped_mm(rows.t(), grad, offs=offsets)
    out = rows.new_empty(len(counts), rows.shape[-1], grad.shape[-1])
    for expert, (rows_e, grad_e) in enumerate(zip(rows.split(counts), grad.split(counts))):
        torch.mm(rows_e.t(), grad_e, out=out[expert])
    return out


class _SwiGLUExperts(torch.autograd.Function):
    """down(silu(rows @ gate) * (rows @ up)) per expert, keeping for backward only the rows and the two
    pre-activations; silu(gate) * up is recomputed, which costs one elementwise pass and saves two
    [rows, intermediate] tensors that autograd would otherwise hold."""

    @staticmethod
    def forward(ctx, rows, w_gate, w_up, w_down, offsets, counts):
        gate = _grouped_matmul(rows, w_gate, offsets, counts)  # [rows, intermediate]
        up = _grouped_matmul(rows, w_up, offsets, counts)
        out = _grouped_matmul(F.silu(gate).mul_(up), w_down, offsets, counts)  # [rows, hidden]
        ctx.save_for_backward(rows, gate, up, w_gate, w_up, w_down, offsets)
        ctx.counts = counts
        return out

    @staticmethod
    def backward(ctx, grad_out):
        rows, gate, up, w_gate, w_up, w_down, offsets = ctx.saved_tensors
        counts = ctx.counts
        grad_out = grad_out.contiguous()  # grouped GEMM rejects broadcast (stride 0) gradients
        need_rows, need_gate, need_up, need_down = ctx.needs_input_grad[:4]

        silu_gate = F.silu(gate)
        grad_w_down = None
        if need_down:
            grad_w_down = _grouped_weight_grad(silu_gate * up, grad_out, offsets, counts)
        grad_hidden = _grouped_matmul(grad_out, w_down.transpose(1, 2), offsets, counts)  # [rows, intermediate]
        grad_up = grad_hidden * silu_gate
        del silu_gate
        grad_gate = torch.ops.aten.silu_backward(grad_hidden.mul_(up), gate)
        del grad_hidden

        grad_w_gate = _grouped_weight_grad(rows, grad_gate, offsets, counts) if need_gate else None
        grad_w_up = _grouped_weight_grad(rows, grad_up, offsets, counts) if need_up else None
        grad_rows = None
        if need_rows:
            grad_rows = _grouped_matmul(grad_gate, w_gate.transpose(1, 2), offsets, counts)
            grad_rows += _grouped_matmul(grad_up, w_up.transpose(1, 2), offsets, counts)
        return grad_rows, grad_w_gate, grad_w_up, grad_w_down, None, None


class GroupedExperts(nn.Module):
    """``num_experts`` SwiGLU experts with stacked weights w_gate, w_up [E, hidden, ffn], w_down [E, ffn, hidden].

    After ``shard`` the module holds a contiguous block of the global experts: ``num_experts`` local
    ones starting at global index ``first_expert`` out of ``num_global_experts``.
    """

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, init_std: float = 0.02):
        super().__init__()
        self.num_experts = num_experts
        self.num_global_experts = num_experts
        self.first_expert = 0
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.use_grouped_mm = True  # False forces the loop over experts (tests compare the two)
        self.w_gate = self._expert_parameter(torch.empty(num_experts, hidden_size, intermediate_size))
        self.w_up = self._expert_parameter(torch.empty(num_experts, hidden_size, intermediate_size))
        self.w_down = self._expert_parameter(torch.empty(num_experts, intermediate_size, hidden_size))
        self.reset_parameters(init_std)

    @staticmethod
    def _expert_parameter(data: torch.Tensor) -> nn.Parameter:
        param = nn.Parameter(data)
        param.is_expert = True
        return param

    def reset_parameters(self, init_std: float = 0.02) -> None:
        for param in (self.w_gate, self.w_up, self.w_down):
            nn.init.normal_(param, mean=0.0, std=init_std)

    def shard(self, first_expert: int, num_local: int) -> None:
        """Keep only global experts [first_expert, first_expert + num_local) of the ones held now.

        Called by expert parallelism after a seeded full-size init, so every layout starts from the same
        weights. The kept slices are copied into new Parameters so the full tensors can be freed.
        """
        start = first_expert - self.first_expert
        if num_local <= 0 or start < 0 or start + num_local > self.num_experts:
            raise ValueError(
                f"cannot shard experts [{first_expert}, {first_expert + num_local}): this module holds global "
                f"experts [{self.first_expert}, {self.first_expert + self.num_experts}); shard a full-size "
                f"module with first_expert = rank * num_local")
        for name in ("w_gate", "w_up", "w_down"):
            kept = getattr(self, name).detach()[start:start + num_local].clone()
            setattr(self, name, self._expert_parameter(kept))
        self.first_expert = first_expert
        self.num_experts = num_local

    def num_parameters_per_expert(self) -> int:
        return 3 * self.hidden_size * self.intermediate_size

    def forward(self, rows: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
        """rows [N, hidden] sorted by local expert, tokens_per_expert [num_experts] -> [N, hidden]."""
        if tokens_per_expert.numel() != self.num_experts:
            raise ValueError(f"tokens_per_expert has {tokens_per_expert.numel()} entries but this module holds "
                             f"{self.num_experts} experts: shard the experts to the dispatcher's local experts")
        # a custom autograd Function is invisible to autocast, so cast to its dtype here as nn.Linear would be
        device_type = rows.device.type
        dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else rows.dtype
        rows = rows.to(dtype).contiguous()
        weights = [w.to(dtype) for w in (self.w_gate, self.w_up, self.w_down)]
        if self.use_grouped_mm and grouped_mm_supported(dtype, rows.device, self.hidden_size, self.intermediate_size):
            offsets, counts = torch.cumsum(tokens_per_expert, 0, dtype=torch.int32), None
        else:
            offsets, counts = None, tokens_per_expert.tolist()
        return _SwiGLUExperts.apply(rows, *weights, offsets, counts)

    def extra_repr(self) -> str:
        return (f"experts {self.first_expert}..{self.first_expert + self.num_experts - 1} of "
                f"{self.num_global_experts}, hidden={self.hidden_size}, ffn={self.intermediate_size}")
