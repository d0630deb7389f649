"""Dead-expert revival (``train.revive_dead_experts``): an expert that got almost no tokens over a window
is re-initialised, so that its parameters serve again instead of idling.

Every rank sees the same global loads (the trainer sums the step's expert loads over all ranks in its one
collective), so every rank decides alike without a collective of its own. At the end of each window of
``revival_window`` steps, in each MoE layer, an expert whose load over the window is under
``revival_threshold`` of its fair share (the layer's total / experts) is dead. With ``revival_init: live``
(the default) the dead experts take, in turn, the layer's busiest live experts as sources: the weights,
the router row, the router logit bias and the balancing bias of the source are copied, plus Gaussian noise
of ``revival_noise`` times each tensor's std, so the two experts split the busy one's tokens from the next
step on. With ``fresh`` the weights and router row are drawn as at initialisation and the biases set to the
live experts' mean. AdamW's moments of every reset slice are zeroed (its step counter is shared by the
stacked tensor and stays). Noise comes from a CPU generator seeded by (seed, step, layer, expert), so
every layout revives to the same weights and expert parallelism still equals one process.

This reads the window's loads on the host once per window: the only host read it adds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch.distributed.tensor import DTensor, distribute_tensor

from mymoe.config import ModelConfig, TrainConfig
from mymoe.model.moe.layer import MoELayer
from mymoe.parallel import ParallelContext
from mymoe.parallel.collectives import all_reduce

# moments of torch.optim.AdamW that follow the parameter's shape
MOMENTS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")


@dataclass
class Revival:
    step: int  # the step after which it happened (1-based: the number of steps taken)
    layer: int  # index among the MoE layers, in depth order
    expert: int  # global index of the revived expert
    window_tokens: float  # its kept assignments over the window, summed over all ranks
    source: Optional[int]  # the expert it was copied from; None when initialised fresh

    def message(self, window: int) -> str:
        origin = f"a noisy copy of expert {self.source}" if self.source is not None else "freshly initialised"
        return (
            f"step {self.step}: revived expert {self.expert} of MoE layer {self.layer} "
            f"({self.window_tokens:g} tokens in the last {window} steps): now {origin}"
        )


def dead_experts(window_load: torch.Tensor, threshold: float) -> list[int]:
    """Experts [e] of one layer whose window load is under `threshold` x the fair share (none if no tokens)."""
    total = float(window_load.sum())
    if total <= 0:
        return []
    fair = total / window_load.numel()
    return [expert for expert, load in enumerate(window_load.tolist()) if load < threshold * fair]


def pair_sources(window_load: torch.Tensor, dead: list[int]) -> dict[int, int]:
    """Each dead expert -> a live source, the busiest first, cycling when there are more dead than live."""
    live = [e for e in torch.argsort(window_load, descending=True, stable=True).tolist() if e not in dead]
    return {expert: live[i % len(live)] for i, expert in enumerate(dead)} if live else {}


def rewrite(tensor: torch.Tensor, edit: Callable[[torch.Tensor], None]) -> None:
    """Apply `edit` to the whole (unsharded) value of `tensor` in place. A DTensor (FSDP) is gathered, edited
    and written back to this rank's shard: a collective of its mesh, which every rank calls alike."""
    with torch.no_grad():
        if isinstance(tensor, DTensor):
            whole = tensor.full_tensor()
            edit(whole)
            mine = distribute_tensor(whole, tensor.device_mesh, tensor.placements, src_data_rank=None)
            tensor.to_local().copy_(mine.to_local())
        else:
            edit(tensor.data if isinstance(tensor, torch.nn.Parameter) else tensor)


def whole(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor.detach()


class ExpertReviver:
    """Sums the global loads of a window and revives the dead experts at its end (see the module doc)."""

    def __init__(
        self,
        layers: list[MoELayer],
        optimizer: torch.optim.Optimizer,
        train: TrainConfig,
        ctx: ParallelContext,
        model: ModelConfig,
    ):
        self.layers, self.optimizer, self.ctx = layers, optimizer, ctx
        # the stds MoECausalLM.reset_parameters draws with: output projections scaled by 1 / sqrt(2 L)
        self.init_std = model.initializer_range
        self.residual_std = model.initializer_range / math.sqrt(2 * model.num_hidden_layers)
        self.window, self.threshold = train.revival_window, train.revival_threshold
        self.init, self.noise, self.seed = train.revival_init, train.revival_noise, train.seed
        self.window_load: Optional[torch.Tensor] = None  # [layers, experts] summed over the window, on the device

    def observe(self, step: int, loads: torch.Tensor) -> list[Revival]:
        """Feed one step's global loads [layers, experts] (`step`: steps taken so far, this one included)."""
        self.window_load = loads.detach().clone() if self.window_load is None else self.window_load + loads
        if step % self.window != 0:
            return []
        window_load, self.window_load = self.window_load.cpu(), None
        revivals = []
        for index, (layer, layer_load) in enumerate(zip(self.layers, window_load)):
            dead = dead_experts(layer_load, self.threshold)
            sources = pair_sources(layer_load, dead) if self.init == "live" else {}
            for expert in dead:
                source = sources.get(expert)
                self._revive(layer, expert, source, self._generator(step, index, expert))
                revivals.append(Revival(step, index, expert, float(layer_load[expert]), source))
        return revivals

    def state(self) -> Optional[list]:
        """The loads summed so far in the current window (JSON-able, for the checkpoint manifest)."""
        return self.window_load.tolist() if self.window_load is not None else None

    def load_state(self, window_load: Optional[list]) -> None:
        self.window_load = None
        if window_load is not None:
            self.window_load = torch.tensor(window_load, dtype=torch.float32, device=self.ctx.device)

    def _generator(self, step: int, layer: int, expert: int) -> torch.Generator:
        generator = torch.Generator()
        generator.manual_seed(((self.seed * 1_000_003 + step) * 1_009 + layer) * 10_007 + expert)
        return generator

    # --- one expert -------------------------------------------------------------------------------------
    def _revive(self, layer: MoELayer, expert: int, source: Optional[int], generator: torch.Generator) -> None:
        experts, gate = layer.experts, layer.gate
        for name, param in experts.named_parameters(recurse=False):  # each stacked [local experts, ...]
            if source is not None:
                value = self._expert_slice(experts, param, source)
                value = value + self._noise(value, generator)
            elif name.endswith("bias"):
                value = torch.zeros(param.shape[1:], device=param.device, dtype=param.dtype)
            else:  # as the model's initialisation draws them
                std = self.residual_std if name == "w_down" else self.init_std
                value = (torch.randn(param.shape[1:], generator=generator) * std).to(param.device, param.dtype)
            self._write_expert(experts, param, expert, value)
        row = whole(gate.weight)[source].clone() if source is not None else None
        if row is not None:
            row += self._noise(row, generator)
        else:
            row = torch.randn(gate.weight.shape[1], generator=generator) * self.init_std
        self._set_row(gate.weight, expert, row)
        live_mean = None if source is not None else self._live_mean
        if gate.bias is not None:
            bias = whole(gate.bias)
            self._set_row(gate.bias, expert, bias[source] if source is not None else live_mean(bias, expert))
        bias = gate.expert_bias
        bias[expert] = bias[source] if source is not None else live_mean(bias, expert)

    @staticmethod
    def _live_mean(values: torch.Tensor, expert: int) -> torch.Tensor:
        others = torch.cat([values[:expert], values[expert + 1 :]])
        return others.mean() if others.numel() else values.new_zeros(())

    def _noise(self, value: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        if self.noise == 0:
            return torch.zeros_like(value)
        scale = self.noise * float(value.float().std()) if value.numel() > 1 else 0.0
        return (torch.randn(value.shape, generator=generator) * scale).to(value.device, value.dtype)

    def _expert_slice(self, experts, param: torch.Tensor, expert: int) -> torch.Tensor:
        """Global expert `expert`'s slice of a stacked expert tensor, on every rank: its owner among the
        expert-parallel ranks contributes it to a sum over the expert-parallel group."""
        local = whole(param)
        index = expert - experts.first_expert
        mine = 0 <= index < experts.num_experts
        value = local[index].clone() if mine else local.new_zeros(local.shape[1:])
        if self.ctx.is_distributed and self.ctx.expert_parallel_size > 1:
            all_reduce(
                value,
                "all_reduce (revived expert's source weights, expert parallel)",
                self.ctx.timeout_seconds,
                group=self.ctx.expert_parallel_group,
            )
        return value

    def _write_expert(self, experts, param: torch.Tensor, expert: int, value: torch.Tensor) -> None:
        index = expert - experts.first_expert
        if not 0 <= index < experts.num_experts:
            return
        rewrite(param, lambda full: full[index].copy_(value))
        self._clear_moments(param, index)

    def _set_row(self, param: torch.Tensor, row: int, value: torch.Tensor) -> None:
        rewrite(param, lambda full: full[row].copy_(value))
        self._clear_moments(param, row)

    def _clear_moments(self, param: torch.Tensor, row: int) -> None:
        state = self.optimizer.state.get(param, {})
        for key in MOMENTS:
            if key in state:
                rewrite(state[key], lambda full: full[row].zero_())
