"""What a run tells people: a progress bar, TensorBoard events, JSON lines, and expert-health warnings.

Only rank 0 writes. Every scalar goes to both TensorBoard and ``metrics.jsonl`` (one JSON object per
logged step) so a run can be plotted without TensorBoard; per-layer expert loads go to the JSON lines
too, which is what ``python -m mymoe.train.heatmap`` renders.
"""
from __future__ import annotations

import json
import time
import warnings
from pathlib import Path
from typing import Optional

import torch


def peak_flops_per_second(device: torch.device) -> float:
    """Peak dense throughput used as the MFU denominator.

    On CUDA a table of bf16 tensor-core peaks by device name; elsewhere there is no published number to
    trust, so we measure this machine's fp32 matmul rate once (a few tenths of a second).
    """
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, peak in (("H200", 989e12), ("H100", 989e12), ("A100", 312e12), ("L40", 181e12),
                          ("A10", 125e12), ("V100", 125e12), ("4090", 165e12), ("3090", 71e12)):
            if key in name:
                return peak
        return 100e12
    size = 512
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    repeats, start = 20, time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * size**3 * repeats / (time.perf_counter() - start)


class ExpertHealth:
    """Warns when an expert gets no tokens, or more than its fair share x `saturation`, for a whole window."""

    def __init__(self, window: int, saturation: float = 4.0):
        self.window, self.saturation = window, saturation
        self.idle_steps: dict = {}
        self.saturated_steps: dict = {}
        self.warned: set = set()

    def observe(self, step: int, loads: list[list[float]]) -> list[str]:
        messages = []
        for layer, layer_loads in enumerate(loads):
            total = sum(layer_loads)
            if total <= 0:
                continue
            fair = total / len(layer_loads)
            for expert, load in enumerate(layer_loads):
                key = (layer, expert)
                self.idle_steps[key] = self.idle_steps.get(key, 0) + 1 if load == 0 else 0
                self.saturated_steps[key] = (self.saturated_steps.get(key, 0) + 1
                                             if load > self.saturation * fair else 0)
                for kind, counter in (("dead (no tokens)", self.idle_steps), ("saturated", self.saturated_steps)):
                    if counter[key] >= self.window and (kind, key) not in self.warned:
                        self.warned.add((kind, key))
                        messages.append(f"step {step}: expert {expert} of MoE layer {layer} has been {kind} "
                                        f"for {self.window} steps; consider aux-loss or bias balancing")
        return messages


class MetricsLogger:
    def __init__(self, out_dir: str, total_steps: int, enabled: bool, dead_expert_window: int = 20,
                 start_step: int = 0, progress: bool = True):
        self.enabled = enabled
        self.health = ExpertHealth(dead_expert_window)
        self.bar = None
        self.writer = None
        self.jsonl = None
        if not enabled:
            return
        path = Path(out_dir)
        path.mkdir(parents=True, exist_ok=True)
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(path / "tensorboard"))
        self.jsonl = open(path / "metrics.jsonl", "a", buffering=1)
        if progress:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True)

    def log(self, step: int, scalars: dict, expert_loads: Optional[list[list[float]]] = None,
            dropped: Optional[list[float]] = None) -> None:
        if not self.enabled:
            return
        for key, value in scalars.items():
            self.writer.add_scalar(key, value, step)
        record = {"step": step, **scalars}
        if expert_loads is not None:
            record["expert_load"] = expert_loads
            for layer, loads in enumerate(expert_loads):
                loads_tensor = torch.tensor(loads, dtype=torch.float64)
                if loads_tensor.sum() > 0:
                    # a histogram of the per-expert share of tokens: uniform routing is one spike at 1/E
                    self.writer.add_histogram(f"expert_load/layer_{layer}", loads_tensor / loads_tensor.sum(), step)
            for message in self.health.observe(step, expert_loads):
                warnings.warn(message, stacklevel=2)
                if self.bar is not None:
                    self.bar.write("WARNING " + message)
        if dropped is not None:
            record["dropped_fraction"] = dropped
            for layer, fraction in enumerate(dropped):
                self.writer.add_scalar(f"dropped_fraction/layer_{layer}", fraction, step)
        self.jsonl.write(json.dumps(record) + "\n")

    def progress(self, step: int, loss: float, tokens_per_second: float) -> None:
        if self.bar is not None:
            self.bar.n = step
            self.bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tokens_per_second:,.0f}", refresh=False)
            self.bar.refresh()

    def write(self, message: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(message)
        else:
            print(message, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()
        if self.jsonl is not None:
            self.jsonl.close()
