"""Stacked expert weights and the grouped GEMM that runs every expert's FFN (SwiGLU or GELU) in one call.

The experts see rows grouped by expert and how many belong to each expert, never routing scores: an
``ExpertBatch`` names where each row comes from (a gather index into the dispatcher's source tensor)
and, optionally, the weight its output is scaled by before it is added back at that index. Weights are stacked per projection ([experts, in, out]) so one ``torch._grouped_mm`` covers all
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

from mymoe.model.layers import dropout
from mymoe.model.moe.dispatch import ExpertBatch


def mark_expert(param: torch.Tensor) -> torch.Tensor:
    """Mark a parameter as belonging to routed experts (reduced over expert-data-parallel ranks, its own
    optimizer groups, resharded by global expert index)."""
    param.is_expert = True
    return param


def is_expert(param: torch.Tensor) -> bool:
    return getattr(param, "is_expert", False)


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


class ExpertGroups:
    """How a chunk's rows split over its experts, in the form each GEMM path needs: counts on the host for
    the loop, or cumulative offsets on the device for grouped GEMM (made once per chunk, reused by all six
    GEMMs; only the loop needs the host counts)."""

    def __init__(self, counts: Optional[list], offsets: Optional[torch.Tensor]):
        self.counts = counts
        self.offsets = offsets

    @classmethod
    def from_counts(cls, counts: list, device: torch.device, use_grouped_mm: bool) -> "ExpertGroups":
        if not use_grouped_mm:
            return cls(counts, None)
        return cls(counts, torch.tensor(counts, dtype=torch.int32, device=device).cumsum(0, dtype=torch.int32))

    @classmethod
    def on_device(cls, tokens_per_expert: torch.Tensor) -> "ExpertGroups":
        """Grouped-GEMM offsets straight from the device counts: nothing is read on the host."""
        return cls(None, tokens_per_expert.cumsum(0, dtype=torch.int32))


def _grouped_matmul(rows: torch.Tensor, weight: torch.Tensor, groups: ExpertGroups) -> torch.Tensor:
    """rows [N, K] times weight[e] [K, M] for each expert's contiguous slice of rows -> [N, M]."""
    if groups.offsets is not None:
        return torch._grouped_mm(rows, weight, offs=groups.offsets)
    out = rows.new_empty(rows.shape[0], weight.shape[-1])
    for expert, (rows_e, out_e) in enumerate(zip(rows.split(groups.counts), out.split(groups.counts))):
        torch.mm(rows_e, weight[expert], out=out_e)
    return out


def _grouped_weight_grad(rows: torch.Tensor, grad: torch.Tensor, groups: ExpertGroups, out: torch.Tensor) -> None:
    """out[e] = rows_e^T @ grad_e for each expert's slice: rows [N, K], grad [N, M], out [experts, K, M]."""
    if groups.offsets is not None:
        out.copy_(torch._grouped_mm(rows.t(), grad, offs=groups.offsets))
        return
    for expert, (rows_e, grad_e) in enumerate(zip(rows.split(groups.counts), grad.split(groups.counts))):
        torch.mm(rows_e.t(), grad_e, out=out[expert])


def plan_chunks(counts: list, max_rows: int) -> list[tuple[int, int, int, int]]:
    """Cut expert-sorted rows into chunks of whole experts, each of at most max_rows rows where one
    expert alone does not exceed it: [(first expert, end expert, first row, end row)]."""
    chunks, first_expert, first_row, rows = [], 0, 0, 0
    for expert, count in enumerate(counts):
        if rows and rows + count > max_rows:
            chunks.append((first_expert, expert, first_row, first_row + rows))
            first_expert, first_row, rows = expert, first_row + rows, 0
        rows += count
    chunks.append((first_expert, len(counts), first_row, first_row + rows))
    return chunks


class _GatherExpertScatter(torch.autograd.Function):
    """out[index[r]] += weight[r] * down(dropout(act(x_r))) with x_r = source[index[r]] and act(x) =
    silu(x @ gate) * (x @ up) (SwiGLU), or gelu(x @ up) when w_gate is None (the plain two-layer FFN).

    The gather from token order, the expert GEMMs, the routing weight and the scatter back are one
    function, run over chunks of whole experts, so no [rows, hidden] copy of the tokens, of the expert
    outputs or of their gradients ever exists whole: each chunk gathers its rows, and the backward
    regathers them instead of keeping them. Only the [rows, intermediate] pre-activations (two for SwiGLU,
    one for GELU) and, with dropout, the boolean keep mask are kept for backward. With index None the
    source already is expert-sorted rows and out is row for row.
    """

    @staticmethod
    def forward(ctx, source, index, weight, w_gate, w_up, w_down, chunks, groups, out_rows, dropout_p):
        num_rows = chunks[-1][3]
        intermediate = w_up.shape[-1]
        gate = source.new_empty(num_rows, intermediate) if w_gate is not None else None  # kept for backward
        up = source.new_empty(num_rows, intermediate)
        keep = source.new_empty(num_rows, intermediate, dtype=torch.bool) if dropout_p else None
        out = source.new_zeros(out_rows, w_down.shape[-1])
        for (first_expert, end_expert, first_row, end_row), chunk_groups in zip(chunks, groups):
            experts = slice(first_expert, end_expert)
            rows = _rows(source, index, first_row, end_row)
            up_c = _grouped_matmul(rows, w_up[experts], chunk_groups)
            up[first_row:end_row] = up_c
            if gate is None:
                activation = F.gelu(up_c)
            else:
                gate_c = _grouped_matmul(rows, w_gate[experts], chunk_groups)
                gate[first_row:end_row] = gate_c
                activation = F.silu(gate_c).mul_(up_c)
            if keep is not None:
                # uniforms drawn in fp32: in bf16 they would take few enough values to shift the rate
                keep_c = torch.rand(activation.shape, device=activation.device) >= dropout_p
                keep[first_row:end_row] = keep_c
                activation.mul_(keep_c).div_(1 - dropout_p)
            if weight is not None:
                activation.mul_(weight[first_row:end_row, None].to(activation.dtype))
            expert_out = _grouped_matmul(activation, w_down[experts], chunk_groups)
            _scatter(out, index, first_row, end_row, expert_out)
        ctx.save_for_backward(source, index, weight, gate, up, keep, w_gate, w_up, w_down)
        ctx.chunks, ctx.groups, ctx.dropout_p = chunks, groups, dropout_p
        return out

    @staticmethod
    def backward(ctx, grad_out):
        source, index, weight, gate, up, keep, w_gate, w_up, w_down = ctx.saved_tensors
        grad_out = grad_out.contiguous()  # grouped GEMM rejects broadcast (stride 0) gradients
        need_source, _, need_weight, need_gate, need_up, need_down = ctx.needs_input_grad[:6]
        grad_source = torch.zeros_like(source) if need_source else None
        grad_weight = torch.zeros_like(weight) if weight is not None and need_weight else None
        # every expert's weight gradient is written whole by its chunk, and on CPU mm and grouped_mm write
        # zeros for an expert without rows, so zero-filling them first only costs time (7% of a fine-grained
        # layer's step); CUDA's grouped GEMM does not promise zeros for an empty group
        new_grad = torch.empty_like if source.device.type == "cpu" else torch.zeros_like
        grad_w_gate = new_grad(w_gate) if w_gate is not None and need_gate else None
        grad_w_up = new_grad(w_up) if need_up else None
        grad_w_down = new_grad(w_down) if need_down else None
        for (first_expert, end_expert, first_row, end_row), groups in zip(ctx.chunks, ctx.groups):
            experts = slice(first_expert, end_expert)
            grad_expert_out = _rows(grad_out, index, first_row, end_row)  # [chunk rows, hidden]
            up_c = up[first_row:end_row]
            if gate is None:
                activation = F.gelu(up_c)
            else:
                gate_c = gate[first_row:end_row]
                silu_gate = F.silu(gate_c)
                activation = silu_gate * up_c
            keep_scale = None
            if keep is not None:
                keep_scale = keep[first_row:end_row].to(activation.dtype).div_(1 - ctx.dropout_p)
                activation.mul_(keep_scale)
            # gradient of the weighted activation (what the down projection saw)
            grad_weighted = _grouped_matmul(grad_expert_out, w_down[experts].transpose(1, 2), groups)
            if weight is not None:
                weight_c = weight[first_row:end_row, None].to(activation.dtype)
                if grad_weight is not None:
                    grad_weight[first_row:end_row] = (grad_weighted * activation).sum(-1).to(grad_weight.dtype)
                if grad_w_down is not None:
                    activation.mul_(weight_c)
                grad_weighted.mul_(weight_c)
            if grad_w_down is not None:
                _grouped_weight_grad(activation, grad_expert_out, groups, grad_w_down[experts])
            del activation, grad_expert_out
            if keep_scale is not None:
                grad_weighted.mul_(keep_scale)  # through the dropout, back to the activation's output
            if gate is None:
                grad_up, grad_gate = torch.ops.aten.gelu_backward(grad_weighted, up_c), None
            else:
                grad_up = grad_weighted * silu_gate
                del silu_gate
                grad_gate = torch.ops.aten.silu_backward(grad_weighted.mul_(up_c), gate_c)
            del grad_weighted
            if grad_w_gate is not None or grad_w_up is not None or grad_source is not None:
                rows = _rows(source, index, first_row, end_row)
                if grad_w_gate is not None:
                    _grouped_weight_grad(rows, grad_gate, groups, grad_w_gate[experts])
                if grad_w_up is not None:
                    _grouped_weight_grad(rows, grad_up, groups, grad_w_up[experts])
                del rows
            if grad_source is not None:
                grad_rows = _grouped_matmul(grad_up, w_up[experts].transpose(1, 2), groups)
                if grad_gate is not None:
                    grad_rows += _grouped_matmul(grad_gate, w_gate[experts].transpose(1, 2), groups)
                _scatter(grad_source, index, first_row, end_row, grad_rows)
        return grad_source, None, grad_weight, grad_w_gate, grad_w_up, grad_w_down, None, None, None, None


def _rows(source: torch.Tensor, index: Optional[torch.Tensor], first_row: int, end_row: int) -> torch.Tensor:
    if index is None:
        return source[first_row:end_row]
    return source.index_select(0, index[first_row:end_row])


def _scatter(
    out: torch.Tensor, index: Optional[torch.Tensor], first_row: int, end_row: int, values: torch.Tensor
) -> None:
    if index is None:
        out[first_row:end_row] = values
    else:
        out.index_add_(0, index[first_row:end_row], values)


def clamped_swiglu(gate: torch.Tensor, up: torch.Tensor, alpha: float, limit: float) -> torch.Tensor:
    """GPT-OSS's activation: (clamp(up, -limit, limit) + 1) * g * sigmoid(alpha * g), g = min(gate, limit)."""
    gate = gate.clamp(max=limit)
    return (up.clamp(-limit, limit) + 1) * gate * torch.sigmoid(alpha * gate)


class GroupedExperts(nn.Module):
    """``num_experts`` experts with stacked weights w_gate, w_up [E, hidden, ffn], w_down [E, ffn, hidden].

    activation "swiglu" (and GPT-OSS's "clamped_swiglu") uses all three; "gelu" is the plain two-layer
    FFN w_up -> GELU -> w_down and has no w_gate (the checkpoint then simply holds no such tensor; w_up and
    w_down keep their names and shapes). ``dropout`` acts between the two linears in training.

    After ``shard`` the module holds a contiguous block of the global experts: ``num_experts`` local
    ones starting at global index ``first_expert`` out of ``num_global_experts``.
    """

    def __init__(
        self,
        num_experts: int,
        hidden_size: int,
        intermediate_size: int,
        init_std: float = 0.02,
        bias: bool = False,
        activation: str = "swiglu",
        swiglu_alpha: float = 1.702,
        swiglu_limit: float = 7.0,
        dropout: float = 0.0,
    ):
        super().__init__()
        self.num_experts = num_experts
        self.num_global_experts = num_experts
        self.first_expert = 0
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.use_grouped_mm = True  # False forces the loop over experts (tests compare the two)
        # transient memory of one chunk of rows in forward or backward; the rows beyond it wait their turn
        self.chunk_bytes = 16 << 20
        self.dropout = dropout
        self.gated = activation != "gelu"
        self.projection_names = ("w_gate", "w_up", "w_down") if self.gated else ("w_up", "w_down")
        shapes = {"w_gate": (hidden_size, intermediate_size), "w_up": (hidden_size, intermediate_size)}
        shapes["w_down"] = (intermediate_size, hidden_size)
        for name in self.projection_names:
            setattr(self, name, self._expert_parameter(torch.empty(num_experts, *shapes[name])))
        # GPT-OSS's experts (see clamped_swiglu): biases [E, ffn] / [E, hidden] and the clamped activation
        self.activation, self.swiglu_alpha, self.swiglu_limit = activation, swiglu_alpha, swiglu_limit
        self.bias_names = tuple(f"{name}_bias" for name in self.projection_names) if bias else ()
        for name in self.bias_names:
            setattr(self, name, self._expert_parameter(torch.zeros(num_experts, shapes[name[:-5]][1])))
        # copies of other ranks' busy experts computed here after this module's own (expert replication,
        # mymoe/parallel/replication.py): name -> [slots, ...], plain tensors, in no state dict or optimizer
        self.replicas: Optional[dict[str, torch.Tensor]] = None
        self.reset_parameters(init_std)

    @staticmethod
    def _expert_parameter(data: torch.Tensor) -> nn.Parameter:
        return mark_expert(nn.Parameter(data))

    def reset_parameters(self, init_std: float = 0.02) -> None:
        for name in self.projection_names:
            nn.init.normal_(getattr(self, name), mean=0.0, std=init_std)

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
                f"module with first_expert = rank * num_local"
            )
        for name in self.projection_names + self.bias_names:
            kept = getattr(self, name).detach()[start : start + num_local].clone()
            setattr(self, name, self._expert_parameter(kept))
        self.first_expert = first_expert
        self.num_experts = num_local

    def stacked(self, name: str) -> torch.Tensor:
        """The stacked tensor `name` of every expert computed here: this module's own, then its replicas."""
        weight = getattr(self, name)
        return weight if self.replicas is None else torch.cat([weight, self.replicas[name].to(weight.dtype)])

    @property
    def num_computed(self) -> int:
        return self.num_experts + (0 if self.replicas is None else self.replicas["w_down"].shape[0])

    def num_parameters_per_expert(self) -> int:
        inner = len(self.projection_names) - 1  # the matrices into the intermediate width
        biases = (inner * self.intermediate_size + self.hidden_size) if self.bias_names else 0
        return (inner + 1) * self.hidden_size * self.intermediate_size + biases

    def forward(self, batch: ExpertBatch) -> torch.Tensor:
        """Run every row of the batch through its expert; returns [batch.out_rows, hidden] (see ExpertBatch)."""
        if batch.tokens_per_expert.numel() != self.num_computed:
            raise ValueError(
                f"tokens_per_expert has {batch.tokens_per_expert.numel()} entries but this module "
                f"computes {self.num_computed} experts: shard the experts to the dispatcher's local experts"
            )
        if self.bias_names or self.activation == "clamped_swiglu":
            return self._forward_per_expert(batch)
        # a custom autograd Function is invisible to autocast, so cast to its dtype here as nn.Linear would be
        device_type = batch.source.device.type
        dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else batch.source.dtype
        source = batch.source.to(dtype).contiguous()
        weights = [
            self.stacked(name).to(dtype) if hasattr(self, name) else None for name in ("w_gate", "w_up", "w_down")
        ]
        use_grouped_mm = self.use_grouped_mm and grouped_mm_supported(
            dtype, source.device, self.hidden_size, self.intermediate_size
        )
        num_rows = source.shape[0] if batch.row_index is None else batch.row_index.shape[0]
        bytes_per_row = (3 * self.hidden_size + 6 * self.intermediate_size) * source.element_size()
        max_chunk_rows = max(1, self.chunk_bytes // bytes_per_row)
        if use_grouped_mm and num_rows <= max_chunk_rows:
            # one chunk of every expert: grouped GEMM takes its offsets on the device, so the step never
            # waits for the counts
            chunks = [(0, self.num_computed, 0, num_rows)]
            groups = [ExpertGroups.on_device(batch.tokens_per_expert)]
        else:
            # one host read of the counts per layer: chunk boundaries (and the loop's slices) must be known
            counts = batch.tokens_per_expert.tolist()
            chunks = plan_chunks(counts, max_chunk_rows)
            groups = [
                ExpertGroups.from_counts(counts[first:end], source.device, use_grouped_mm)
                for first, end, _, _ in chunks
            ]
        return _GatherExpertScatter.apply(
            source,
            batch.row_index,
            batch.row_weight,
            *weights,
            chunks,
            groups,
            batch.out_rows,
            self.dropout if self.training else 0.0,
        )

    def _forward_per_expert(self, batch: ExpertBatch) -> torch.Tensor:
        """Experts with biases or GPT-OSS's clamped activation in plain autograd, one expert at a time: they are
        outside the fused function above (which keeps memory low for the common bias-free case)."""
        counts = batch.tokens_per_expert.tolist()
        source = batch.source
        rows = source if batch.row_index is None else source.index_select(0, batch.row_index)  # expert-sorted
        w = {name: self.stacked(name) for name in self.projection_names + self.bias_names}
        outputs = []
        for expert, rows_e in enumerate(rows.split(counts)):
            up = rows_e @ w["w_up"][expert] + (w["w_up_bias"][expert] if self.bias_names else 0)
            if self.gated:
                gate = rows_e @ w["w_gate"][expert] + (w["w_gate_bias"][expert] if self.bias_names else 0)
            if self.activation == "clamped_swiglu":
                hidden = clamped_swiglu(gate, up, self.swiglu_alpha, self.swiglu_limit)
            else:
                hidden = F.silu(gate) * up if self.gated else F.gelu(up)
            out = dropout(hidden, self.dropout, self.training) @ w["w_down"][expert]
            outputs.append(out + w["w_down_bias"][expert] if self.bias_names else out)
        expert_out = torch.cat(outputs) if outputs else rows.new_zeros(0, self.hidden_size)
        if batch.row_weight is not None:
            expert_out = expert_out * batch.row_weight[:, None].to(expert_out.dtype)
        if batch.row_index is None:
            return expert_out
        return expert_out.new_zeros(batch.out_rows, self.hidden_size).index_add(0, batch.row_index, expert_out)

    def extra_repr(self) -> str:
        return (
            f"experts {self.first_expert}..{self.first_expert + self.num_experts - 1} of "
            f"{self.num_global_experts}, hidden={self.hidden_size}, ffn={self.intermediate_size}"
        )
