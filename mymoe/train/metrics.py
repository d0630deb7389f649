"""What a run tells people: a progress bar, TensorBoard events, JSON lines, and expert-health warnings.

Only rank 0 writes. Every scalar goes both to TensorBoard (``<out_dir>/tensorboard``) and to
``<out_dir>/metrics.jsonl`` (one JSON object per logged step), so a run can be plotted without
TensorBoard. Per-layer expert loads go to both as well: a TensorBoard histogram per MoE layer whose
buckets are the experts (the bar of expert e is its token count), and the raw counts in the JSON lines,
which is what ``python -m mymoe.train.heatmap`` renders.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Optional

import torch

# bf16 tensor-core peaks by device name, the MFU denominator on GPUs
GPU_PEAK_FLOPS = (
    ("H200", 989e12),
    ("H100", 989e12),
    ("A100", 312e12),
    ("L40", 181e12),
    ("A10", 125e12),
    ("V100", 125e12),
    ("4090", 165e12),
    ("3090", 71e12),
)


def peak_flops_per_second(device: torch.device) -> float:
    """Peak dense throughput of one process's device, the MFU denominator.

    On CUDA a table of bf16 tensor-core peaks by device name; on CPU there is no published number to
    trust, so we measure this process's fp32 matmul rate once (a few tenths of a second). MFU on CPU
    is therefore "fraction of what a plain matmul achieves here", a useful relative number.
    """
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return next((peak for key, peak in GPU_PEAK_FLOPS if key in name), 100e12)
    size = 256
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    repeats, start = 10, time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * size**3 * repeats / (time.perf_counter() - start)


class StepMetrics(Mapping):
    """One training step's metrics, kept on the device until a value is first asked for.

    A step leaves them as tensors so that it never waits on the device; reading any key reads them all in
    one device-to-host copy, and `read_all` reads the metrics of many steps (a log interval's) in one. The
    keys: skipped, loss, lm_loss, aux_loss, z_loss, load_balancing_loss, lr, aux_loss_scale, grad_norm,
    expert_loads [layer][expert], expert_rows [layer][rank] (the rows each rank's experts computed: the
    busiest rank sets the pace under expert parallelism) and dropped [layer].
    """

    LOSSES = ("loss", "lm_loss", "aux_loss", "z_loss", "load_balancing_loss")

    def __init__(
        self,
        losses: torch.Tensor,
        dropped: torch.Tensor,
        grad_norm: torch.Tensor,
        skipped: torch.Tensor,
        expert_loads: torch.Tensor,
        expert_rows: torch.Tensor,
        lr: float,
        aux_loss_scale: float,
    ):
        # one float64 vector: [losses, dropped per layer, grad_norm, skipped, loads of every layer, rows]
        self.packed = torch.cat(
            [
                losses.double(),
                dropped.double(),
                grad_norm.double().view(1),
                skipped.double().view(1),
                expert_loads.double().flatten(),
                expert_rows.double().flatten(),
            ]
        )
        self.num_layers = dropped.numel()
        self.expert_loads_shape = tuple(expert_loads.shape)
        self.expert_rows_shape = tuple(expert_rows.shape)
        self.host = {"lr": lr, "aux_loss_scale": aux_loss_scale}
        self.values: Optional[dict] = None

    @staticmethod
    def read_all(steps: list["StepMetrics"]) -> None:
        """Read every step's metrics not read yet, in one device-to-host copy."""
        unread = [step for step in steps if step.values is None]
        if unread:
            for step, row in zip(unread, torch.stack([step.packed for step in unread]).tolist()):
                step._fill(row)

    def _fill(self, row: list[float]) -> None:
        losses, layers = len(self.LOSSES), self.num_layers
        values = dict(zip(self.LOSSES, row[:losses]), **self.host)
        values["dropped"] = row[losses : losses + layers]
        values["grad_norm"], skipped = row[losses + layers], row[losses + layers + 1]
        values["skipped"] = skipped > 0
        start = losses + layers + 2
        for key, (moe_layers, width) in (
            ("expert_loads", self.expert_loads_shape),
            ("expert_rows", self.expert_rows_shape),
        ):
            values[key] = [row[start + layer * width : start + (layer + 1) * width] for layer in range(moe_layers)]
            start += moe_layers * width
        self.values = values

    def _read(self) -> dict:
        if self.values is None:
            self.read_all([self])
        return self.values

    def __getitem__(self, key: str):
        return self._read()[key]

    def __iter__(self):
        return iter(self._read())

    def __len__(self) -> int:
        return len(self._read())


def busiest_over_mean(rows: list[float]) -> float:
    """The busiest rank's rows against the mean rank's: 1 is balanced; the step waits on the busiest."""
    mean = sum(rows) / max(len(rows), 1)
    return max(rows) / mean if mean > 0 else 1.0


class ExpertHealth:
    """Warns once when an expert gets no tokens, or more than `saturation` x its fair share, for
    `window` consecutive steps."""

    def __init__(self, window: int, saturation: float = 4.0):
        self.window, self.saturation = window, saturation
        self.idle_steps: dict = {}  # (layer, expert) -> consecutive steps without tokens
        self.saturated_steps: dict = {}
        self.warned: set = set()

    def observe(self, step: int, loads: list[list[float]]) -> list[str]:
        """Feed one step's per-layer loads; return the warnings that became due at this step."""
        messages = []
        for layer, layer_loads in enumerate(loads):
            total = sum(layer_loads)
            if total <= 0 or self.window <= 0:
                continue
            fair = total / len(layer_loads)
            for expert, load in enumerate(layer_loads):
                key = (layer, expert)
                self.idle_steps[key] = self.idle_steps.get(key, 0) + 1 if load == 0 else 0
                self.saturated_steps[key] = self.saturated_steps.get(key, 0) + 1 if load > self.saturation * fair else 0
                for kind, counter in (
                    ("dead (no tokens)", self.idle_steps),
                    (f"saturated (over {self.saturation:g}x its fair share)", self.saturated_steps),
                ):
                    if counter[key] >= self.window and (kind, key) not in self.warned:
                        self.warned.add((kind, key))
                        messages.append(
                            f"step {step}: expert {expert} of MoE layer {layer} has been {kind} for "
                            f"{self.window} steps; consider a larger model.moe.router_aux_loss_coef, "
                            f"bias balancing (model.moe.bias_update_rate) or router noise"
                        )
        return messages


def drop_records_after(path: Path, step: int) -> None:
    """Forget the records of steps after `step`: a resumed run replays them, so each step is logged once.

    A line cut short by a killed process is dropped too.
    """
    if not path.exists():
        return
    lines = path.read_text().splitlines()
    kept = []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if not isinstance(record, dict) or record.get("step", 0) <= step:
            kept.append(line + "\n")
    if len(kept) < len(lines):
        temporary = path.with_name(path.name + ".tmp")
        temporary.write_text("".join(kept))
        temporary.replace(path)


class MetricsLogger:
    def __init__(
        self,
        out_dir: str,
        total_steps: int,
        enabled: bool,
        dead_expert_window: int = 20,
        start_step: int = 0,
        progress: bool = True,
    ):
        self.enabled = enabled
        self.health = ExpertHealth(dead_expert_window)
        self.bar = self.writer = self.jsonl = None
        if not enabled:
            return
        path = Path(out_dir)
        path.mkdir(parents=True, exist_ok=True)
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(path / "tensorboard"))
        drop_records_after(path / "metrics.jsonl", start_step)
        self.jsonl = open(path / "metrics.jsonl", "a", buffering=1)
        if progress:
            from tqdm import tqdm

            # the bar's own rate and remaining time are the ETA; loss and tokens/s ride in the postfix
            self.bar = tqdm(
                total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True, file=sys.stderr
            )

    def log(
        self,
        step: int,
        scalars: dict,
        expert_loads: Optional[list[list[float]]] = None,
        dropped: Optional[list[float]] = None,
        expert_rows: Optional[list[list[float]]] = None,
        expert_rows_unreplicated: Optional[list[list[float]]] = None,
    ) -> None:
        """Write scalars, and optionally per-layer expert loads [layer][expert], dropped fractions, the rows
        each rank's experts computed [layer][rank] and, under expert replication, the rows each expert-parallel
        rank would have computed without copies [layer][ep rank]."""
        if not self.enabled:
            return
        for key, value in scalars.items():
            self.writer.add_scalar(key, value, step)
        record = {"step": step, **scalars}
        if expert_loads is not None:
            record["expert_load"] = expert_loads
            for layer, loads in enumerate(expert_loads):
                self._expert_histogram(f"expert_load/layer_{layer}", loads, step)
        if dropped is not None:
            record["dropped_fraction"] = dropped
            for layer, fraction in enumerate(dropped):
                self.writer.add_scalar(f"dropped_fraction/layer_{layer}", fraction, step)
        if expert_rows is not None:
            record["expert_rows"] = expert_rows
            for layer, rows in enumerate(expert_rows):
                self.writer.add_scalar(f"busiest_rank_rows_over_mean/layer_{layer}", busiest_over_mean(rows), step)
        for layer, rows in enumerate(expert_rows_unreplicated or []):
            self.writer.add_scalar(
                f"busiest_rank_rows_over_mean_unreplicated/layer_{layer}", busiest_over_mean(rows), step
            )
        if expert_rows_unreplicated is not None:
            record["expert_rows_unreplicated"] = expert_rows_unreplicated
        self.jsonl.write(json.dumps(record) + "\n")

    def _expert_histogram(self, tag: str, loads: list[float], step: int) -> None:
        """One bucket per expert, its height the expert's token count."""
        counts = torch.tensor(loads, dtype=torch.float64)
        if counts.sum() <= 0:
            return
        experts = torch.arange(len(loads), dtype=torch.float64)
        self.writer.add_histogram_raw(
            tag,
            min=0.0,
            max=float(len(loads) - 1),
            num=float(counts.sum()),
            sum=float((experts * counts).sum()),
            sum_squares=float((experts.square() * counts).sum()),
            bucket_limits=(experts + 0.5).tolist(),
            bucket_counts=counts.tolist(),
            global_step=step,
        )

    def observe_experts(self, step: int, expert_loads: list[list[float]]) -> None:
        """Warn (on the console and in the JSON lines) about experts dead or saturated for a window."""
        if not self.enabled:
            return
        for message in self.health.observe(step, expert_loads):
            self.event(step, "warning", message)

    def event(self, step: int, kind: str, message: str) -> None:
        """Something that happened (a warning, a revived expert): on the console and in the JSON lines."""
        if not self.enabled:
            return
        self.write(f"{kind.upper()} {message}", stream=sys.stderr)
        self.jsonl.write(json.dumps({"step": step, kind: message}) + "\n")

    def progress(self, step: int, loss: float, tokens_per_second: float) -> None:
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tokens_per_second:,.0f}", refresh=False)
            self.bar.update(step - self.bar.n)

    def write(self, message: str, stream=sys.stdout) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(message, file=stream)
        else:
            print(message, file=stream, flush=True)

    def end_progress(self) -> None:
        """Close the progress bar, so what is printed next (the checkpoint save) gets lines of its own."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def close(self) -> None:
        self.end_progress()
        if self.writer is not None:
            self.writer.close()
        if self.jsonl is not None:
            self.jsonl.close()
