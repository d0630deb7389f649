"""The non-finite guard: a step whose loss or gradient norm is nan or inf changes nothing, and a run that
keeps producing them stops, naming where the first nan or inf appeared.

A healthy step pays nothing and waits for nothing: the trainer has the world-mean loss and the global
gradient norm on the device, and `step_if_finite` undoes the update there when either is not finite, alike
on every rank; the flags are read with the other metrics once per log interval. Only when `train.max_nonfinite_steps`
steps in a row were skipped does the guard rerun the last micro-batch with forward hooks and gradient
hooks to find the first module whose output (or parameter whose gradient) went non-finite, and stop the
run with a TrainingError. The checkpoint manager refuses to save non-finite state besides
(checkpoint/retention.py),
so the last good checkpoint is never pruned in favour of a broken one.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from mymoe.train.errors import TrainingError
from mymoe.train.precision import autocast_context


def _tensors_in(output) -> list[torch.Tensor]:
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, (tuple, list)):
        return [t for item in output for t in _tensors_in(item)]
    if hasattr(output, "__dataclass_fields__"):
        return [t for name in output.__dataclass_fields__ for t in _tensors_in(getattr(output, name))]
    return []


def _nonfinite(tensors: list[torch.Tensor]) -> bool:
    return any(t.is_floating_point() and not bool(torch.isfinite(t.detach()).all()) for t in tensors)


def locate_nonfinite(model: torch.nn.Module, forward, input_ids, labels) -> str:
    """Where the first nan or inf appears for this batch: a parameter, a module's output, or a gradient.

    Collective when the model is: every rank runs the same forward and backward whatever it finds on the
    way (a rank that skipped them would leave the others waiting in the dispatch); the gradients made are
    cleared again.
    """
    parameters = [f"parameter {name}" for name, param in model.named_parameters() if _nonfinite([param])]
    names = {module: name or "the model" for name, module in model.named_modules()}
    outputs: list[str] = []
    gradients: list[str] = []

    def forward_hook(module, inputs, output):
        if not outputs and _nonfinite(_tensors_in(output)):
            outputs.append(f"the output of {names[module]} ({type(module).__name__})")

    def gradient_hook(name):
        def hook(grad):
            if not gradients and _nonfinite([grad]):
                gradients.append(f"the gradient of {name}")

        return hook

    handles = [module.register_forward_hook(forward_hook) for module in model.modules()]
    handles += [
        param.register_hook(gradient_hook(name)) for name, param in model.named_parameters() if param.requires_grad
    ]
    try:
        forward(input_ids, shift_labels=labels).loss.backward()
    finally:
        for handle in handles:
            handle.remove()
        model.zero_grad(set_to_none=True)
    found = parameters + outputs + gradients
    return found[0] if found else "no module for this rank's last batch (the gradient reduction or another rank)"


class NonFiniteGuard:
    """Counts skipped steps in a row; stops the run after `max_consecutive` of them."""

    def __init__(self, max_consecutive: int):
        self.max_consecutive = max_consecutive
        self.skipped: list[int] = []  # the current streak of skipped steps

    def observe(self, trainer, metrics, logger, step: Optional[int] = None) -> None:
        """After each step (`step`, default the trainer's): warn about a skipped one, raise TrainingError once
        too many came in a row."""
        step = trainer.step if step is None else step
        if not metrics["skipped"]:
            self.skipped = []
            return
        self.skipped.append(step)
        logger.write(
            f"WARNING step {step}: loss {metrics['loss']} / gradient norm {metrics['grad_norm']} "
            f"is not finite; the step was skipped (no optimizer update), {len(self.skipped)} of "
            f"train.max_nonfinite_steps={self.max_consecutive} in a row"
        )
        if len(self.skipped) < self.max_consecutive:
            return
        where = self.diagnose(trainer)
        raise TrainingError(
            f"steps {self.skipped[0]}-{self.skipped[-1]} all had a non-finite loss or gradient norm; the first nan "
            f"or inf is in {where}. Stopped without saving, so the last checkpoint is the last good state: resume "
            f"from it with a lower --train.lr (now {trainer.config.train.lr:g}) or --train.grad_clip, or check the "
            f"data and model.rms_norm_eps"
        )

    @staticmethod
    def diagnose(trainer) -> str:
        input_ids, labels = trainer.last_batch
        ctx = trainer.ctx
        with autocast_context(trainer.config, ctx.device):
            where = locate_nonfinite(trainer.model, trainer.model, input_ids.to(ctx.device), labels.to(ctx.device))
        if not ctx.is_distributed:
            return where
        everywhere = [None] * ctx.world_size
        dist.all_gather_object(everywhere, where)
        return "; ".join(f"rank {rank}: {found}" for rank, found in enumerate(everywhere))


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a sharded (DTensor) tensor, or the tensor itself; in place edits reach the whole."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


@torch.no_grad()
def step_if_finite(optimizer: torch.optim.Optimizer, finite: torch.Tensor) -> None:
    """optimizer.step(), undone on the device where `finite` (a 0-d bool tensor) is False.

    The skip never waits on the host: parameters and optimizer state are copied before the step and put
    back with torch.where after it, so a non-finite step leaves both unchanged (a state entry the step
    created goes back to zero, AdamW's initial value). The copies cost one parameter-sized buffer per
    state tensor for the duration of the step.
    """
    params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]

    def tensors() -> dict:
        found = {("param", id(p)): _local(p) for p in params}
        for p in params:
            for key, value in optimizer.state.get(p, {}).items():
                if isinstance(value, torch.Tensor):
                    found[(key, id(p))] = _local(value)
        return found

    before = {key: tensor.clone() for key, tensor in tensors().items()}
    optimizer.step()
    for key, tensor in tensors().items():
        kept = before.get(key)
        if kept is None:
            kept = torch.zeros_like(tensor)
        tensor.copy_(torch.where(finite.to(tensor.device), tensor, kept))
