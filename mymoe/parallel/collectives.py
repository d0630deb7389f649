"""Collectives that say what they were doing when they fail, and autograd-aware data movement.

A rank that dies or stalls surfaces on the others as a backend RuntimeError ("Timed out waiting 5000ms
for recv", "Connection closed by peer"). `named_collective` re-raises it as a CollectiveError naming the
collective and its purpose, so a user reads "all_to_all_single (MoE dispatch, layer 3) timed out after
5 s" instead of a gloo source line.

The autograd Functions move rows between ranks; each backward is the reverse movement:
all-to-all <-> reverse all-to-all, all-gather <-> reduce-scatter. `start_all_to_all` is the all-to-all
with async_op=True: the caller computes while the rows travel and waits for them only where it reads them.
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch
import torch.distributed as dist


class CollectiveError(RuntimeError):
    """A collective failed or timed out; the message names it, its purpose and the likely cause."""


@contextlib.contextmanager
def named_collective(name: str, timeout_seconds: Optional[float] = None):
    try:
        yield
    except CollectiveError:
        raise
    except RuntimeError as error:  # DistBackendError is a RuntimeError
        backend_said = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        if "timed out" in str(error).lower() or "timeout" in str(error).lower():
            after = f" after {timeout_seconds:g} s" if timeout_seconds else ""
            raise CollectiveError(
                f"{name} timed out{after}: a rank died or stalled (if a rank is merely slow, raise "
                f"parallel.timeout_seconds). Backend said: {backend_said}"
            ) from error
        raise CollectiveError(
            f"{name} failed: a rank probably died or left early (its connection closed). Backend said: {backend_said}"
        ) from error


def all_reduce(
    tensor: torch.Tensor, name: str, timeout_seconds: Optional[float] = None, op: str = "sum", group=None
) -> torch.Tensor:
    """All-reduce `tensor` in place over `group` (default: the world) as named_collective `name` says;
    op is "sum" or "max". Returns the tensor."""
    with named_collective(name, timeout_seconds):
        dist.all_reduce(tensor, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op], group=group)
    return tensor


def _all_to_all(
    rows: torch.Tensor, output_splits: list, input_splits: list, group, name: str, timeout_seconds: Optional[float]
) -> torch.Tensor:
    received = rows.new_empty((sum(output_splits),) + tuple(rows.shape[1:]))
    with named_collective(f"all_to_all_single ({name})", timeout_seconds):
        dist.all_to_all_single(received, rows.contiguous(), output_splits, input_splits, group=group)
    return received


class AllToAll(torch.autograd.Function):
    """Rows [sum(input_splits), ...] out, rows [sum(output_splits), ...] in; backward sends them home."""

    @staticmethod
    def forward(ctx, rows, output_splits, input_splits, group, name, timeout_seconds):
        ctx.output_splits, ctx.input_splits = output_splits, input_splits
        ctx.group, ctx.name, ctx.timeout_seconds = group, name, timeout_seconds
        return _all_to_all(rows, output_splits, input_splits, group, name, timeout_seconds)

    @staticmethod
    def backward(ctx, grad):
        grad = _all_to_all(
            grad, ctx.input_splits, ctx.output_splits, ctx.group, f"{ctx.name}, backward", ctx.timeout_seconds
        )
        return grad, None, None, None, None, None


def all_to_all(
    rows, output_splits: list, input_splits: list, group, name: str, timeout_seconds: Optional[float] = None
) -> torch.Tensor:
    return AllToAll.apply(rows, output_splits, input_splits, group, name, timeout_seconds)


def launch_all_to_all(
    rows: torch.Tensor, output_splits: list, input_splits: list, group, name: str, timeout_seconds=None
):
    """Start an all-to-all without waiting: (the buffer it fills, its Work)."""
    received = rows.new_empty((sum(output_splits),) + tuple(rows.shape[1:]))
    with named_collective(f"all_to_all_single ({name})", timeout_seconds):
        work = dist.all_to_all_single(
            received, rows.contiguous(), output_splits, input_splits, group=group, async_op=True
        )
    return received, work


def wait(work, name: str, timeout_seconds: Optional[float] = None) -> None:
    """Block until a collective started with async_op=True is done (the time exposed to the caller)."""
    with named_collective(f"all_to_all_single ({name})", timeout_seconds):
        work.wait()


class _Flight:
    """The Works of one exchange in flight, forward and backward (the autograd Functions share it)."""

    def __init__(self, output_splits, input_splits, group, name, timeout_seconds):
        self.output_splits, self.input_splits, self.group = output_splits, input_splits, group
        self.name, self.timeout_seconds = name, timeout_seconds
        self.work = None
        self.backward_work, self.backward_received = None, None


class _StartAllToAll(torch.autograd.Function):
    """Forward starts the exchange; backward waits for the gradients that _WaitAllToAll's backward sent."""

    @staticmethod
    def forward(ctx, rows, flight: _Flight):
        ctx.flight = flight
        received, flight.work = launch_all_to_all(
            rows, flight.output_splits, flight.input_splits, flight.group, flight.name, flight.timeout_seconds
        )
        return received

    @staticmethod
    def backward(ctx, _unused_grad):
        flight = ctx.flight
        wait(flight.backward_work, f"{flight.name}, backward", flight.timeout_seconds)
        grad, flight.backward_received = flight.backward_received, None
        return grad, None


class _WaitAllToAll(torch.autograd.Function):
    """Forward waits for the exchange; backward starts sending the gradients home and returns at once, so
    the backward of whatever ran while the rows travelled can run while their gradients travel."""

    @staticmethod
    def forward(ctx, received, flight: _Flight):
        ctx.flight = flight
        wait(flight.work, flight.name, flight.timeout_seconds)
        flight.work = None
        return received.view_as(received)

    @staticmethod
    def backward(ctx, grad):
        flight = ctx.flight
        flight.backward_received, flight.backward_work = launch_all_to_all(
            grad,
            flight.input_splits,
            flight.output_splits,
            flight.group,
            f"{flight.name}, backward",
            flight.timeout_seconds,
        )
        # _StartAllToAll's backward ignores this and returns the exchanged gradient instead
        return grad, None


class InFlight:
    """An all-to-all started with ``start_all_to_all``; ``wait()`` returns its rows, differentiably."""

    def __init__(self, received: torch.Tensor, flight: _Flight):
        self._received, self._flight = received, flight

    def wait(self) -> torch.Tensor:
        return _WaitAllToAll.apply(self._received, self._flight)


def start_all_to_all(
    rows, output_splits: list, input_splits: list, group, name: str, timeout_seconds: Optional[float] = None
) -> InFlight:
    """``all_to_all`` that returns before the rows have moved: compute, then ``.wait()`` for them. Its
    backward is overlapped the same way (the reverse exchange runs while later backward work does)."""
    flight = _Flight(output_splits, input_splits, group, name, timeout_seconds)
    return InFlight(_StartAllToAll.apply(rows, flight), flight)


def _gather(chunk: torch.Tensor, group, name: str, timeout_seconds) -> torch.Tensor:
    chunks = [torch.empty_like(chunk) for _ in range(dist.get_world_size(group))]
    with named_collective(f"all_gather ({name})", timeout_seconds):
        dist.all_gather(chunks, chunk.contiguous(), group=group)
    return torch.cat(chunks)


def _reduce_scatter(stacked: torch.Tensor, group, name: str, timeout_seconds) -> torch.Tensor:
    chunks = [c.contiguous() for c in stacked.chunk(dist.get_world_size(group))]
    mine = torch.empty_like(chunks[0])
    with named_collective(f"reduce_scatter ({name})", timeout_seconds):
        dist.reduce_scatter(mine, chunks, group=group)
    return mine


class AllGather(torch.autograd.Function):
    """Equal chunks [n, ...] from every rank of the group -> [group_size * n, ...] in rank order."""

    @staticmethod
    def forward(ctx, chunk, group, name, timeout_seconds):
        ctx.group, ctx.name, ctx.timeout_seconds = group, name, timeout_seconds
        return _gather(chunk, group, name, timeout_seconds)

    @staticmethod
    def backward(ctx, grad):
        # every rank's copy of my chunk was used; its gradient is the sum over ranks
        return _reduce_scatter(grad, ctx.group, f"{ctx.name}, backward", ctx.timeout_seconds), None, None, None


class ReduceScatter(torch.autograd.Function):
    """[group_size * n, ...] on every rank -> the sum over ranks of chunk `rank`, [n, ...]."""

    @staticmethod
    def forward(ctx, stacked, group, name, timeout_seconds):
        ctx.group, ctx.name, ctx.timeout_seconds = group, name, timeout_seconds
        return _reduce_scatter(stacked, group, name, timeout_seconds)

    @staticmethod
    def backward(ctx, grad):
        return _gather(grad, ctx.group, f"{ctx.name}, backward", ctx.timeout_seconds), None, None, None


def apply_flat(tensors: list, fn, device: torch.device, bucket_elements: int = 1 << 25) -> None:
    """Run an in-place collective `fn(flat)` on the tensors packed into a few flat buffers, then unpack.

    One collective per bucket instead of one per tensor; buckets hold one dtype and at most
    `bucket_elements` elements (a single larger tensor gets its own). `device` is where the collective
    runs (the GPU for nccl), whatever device the tensors live on.
    """
    by_dtype: dict = {}
    for tensor in tensors:
        by_dtype.setdefault(tensor.dtype, []).append(tensor)
    for members in by_dtype.values():
        bucket, size = [], 0
        for tensor in members:
            if bucket and size + tensor.numel() > bucket_elements:
                _run_bucket(bucket, fn, device)
                bucket, size = [], 0
            bucket.append(tensor)
            size += tensor.numel()
        _run_bucket(bucket, fn, device)


def _run_bucket(bucket: list, fn, device: torch.device) -> None:
    flat = torch.cat([tensor.detach().reshape(-1).to(device) for tensor in bucket])
    fn(flat)
    offset = 0
    for tensor in bucket:
        tensor.detach().copy_(flat[offset : offset + tensor.numel()].view_as(tensor))
        offset += tensor.numel()
