"""Debug mode (``train.debug=true``): per-step checks of the MoE layers, for finding why a run goes wrong.

Forward hooks on every module watch each training forward: whether each router's probabilities are all
finite, each MoE layer's kept load per expert and dropped share, and the first module (in the order the
outputs were made, so the innermost one) whose output holds a nan or inf. After each step the trainer
turns them into log lines. Every check reads the device, so a debug step waits on the host several
times: off by default, and never for benchmarks.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from mymoe.model.moe.layer import MoELayer
from mymoe.model.moe.router import Router
from mymoe.train.guard import _nonfinite, _tensors_in


class DebugMonitor:
    """Forward hooks on `model` that record what one step's forwards showed; `report` reads and resets."""

    def __init__(self, model: nn.Module):
        self.names = {module: name or "the model" for name, module in model.named_modules()}
        self.layer_names = [name for name, module in model.named_modules() if isinstance(module, MoELayer)]
        self.handles = [module.register_forward_hook(self._check) for module in model.modules()]
        self._reset()

    def _reset(self) -> None:
        self.first_nonfinite: Optional[str] = None
        self.router_finite: dict[str, bool] = {}
        self.loads: dict[str, torch.Tensor] = {}  # [experts] kept assignments, summed over micro-batches
        self.dropped: dict[str, list[float]] = {}  # dropped share of each micro-batch

    @torch.no_grad()
    def _check(self, module: nn.Module, inputs, output) -> None:
        name = self.names[module]
        if self.first_nonfinite is None and _nonfinite(_tensors_in(output)):
            self.first_nonfinite = f"{name} ({type(module).__name__})"
        if isinstance(module, Router):
            layer = name.rpartition(".")[0]
            finite = bool(torch.isfinite(module._score(output.router_logits.detach())).all())
            self.router_finite[layer] = self.router_finite.get(layer, True) and finite
        elif isinstance(module, MoELayer):
            aux = output[1]
            load = aux.tokens_per_expert.detach().cpu()
            self.loads[name] = load if name not in self.loads else self.loads[name] + load
            self.dropped.setdefault(name, []).append(float(aux.dropped_fraction))

    def report(self, step: int) -> list[str]:
        """The log lines of the step just taken (numbered like the metrics, from 1), then start afresh."""
        lines = []
        for name in self.layer_names:
            if name not in self.loads:
                continue
            dropped = sum(self.dropped[name]) / len(self.dropped[name])
            lines.append(
                f"debug step {step}: {name} router probs finite {self.router_finite.get(name, True)}, "
                f"load per expert {self.loads[name].tolist()}, dropped {dropped:.4f}"
            )
        if self.first_nonfinite is not None:
            lines.append(f"debug step {step}: the first non-finite output is that of {self.first_nonfinite}")
        self._reset()
        return lines

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()
