"""The non-finite guard: a step whose loss or gradient norm is nan or inf changes nothing, and a run that
keeps producing them stops, naming where the first nan or inf appeared.

A healthy step pays nothing and waits for nothing: the trainer has the world-mean loss and the global
gradient norm on the device, and `step_if_finite` gates AdamW's update there to a no-op when either is not
finite, alike on every rank, copying nothing; the flags are read with the other metrics once per log interval. Only when `train.max_nonfinite_steps`
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


def _adamw_state(optimizer: torch.optim.AdamW, param: torch.Tensor, group: dict) -> dict:
    """The parameter's AdamW state, created as torch.optim.AdamW creates it (so checkpoints see one format)."""
    state = optimizer.state[param]
    if not state:
        on_device = group["capturable"] or group["fused"]
        state["step"] = torch.zeros((), dtype=torch.float32, device=param.device if on_device else "cpu")
        state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
    return state


@torch.no_grad()
def step_if_finite(optimizer: torch.optim.AdamW, finite: torch.Tensor) -> None:
    """AdamW's step (torch.optim.AdamW's update, foreach over each rank's local shards), a no-op on the
    device where `finite` (a 0-d bool tensor) is False: weights, moments and step counters stay bit for bit.

    The skip never waits on the host and copies nothing: the gradients are zeroed where the step is not
    finite (they may hold nan and are cleared after the step anyway), and every coefficient that would
    move state is gated instead (first-moment weight 0, second-moment decay 1, step count + 0, weight
    decay factor 1, step size 0).
    """
    if not isinstance(optimizer, torch.optim.AdamW) or any(
        group["amsgrad"] or group["maximize"] for group in optimizer.param_groups
    ):
        raise TypeError(f"step_if_finite steps mymoe.optim.build_optimizer's plain AdamW, not {optimizer!r}")
    go = finite.to(torch.float64)
    for group in optimizer.param_groups:
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            continue
        states = [_adamw_state(optimizer, p, group) for p in params]
        device = _local(params[0]).device
        gate = go.to(device)
        beta1, beta2 = group["betas"]
        lr, eps = group["lr"], group["eps"]
        weights = [_local(p) for p in params]
        grads = [_local(p.grad).masked_fill_(~finite.to(device), 0.0) for p in params]
        exp_avgs = [_local(state["exp_avg"]) for state in states]
        exp_avg_sqs = [_local(state["exp_avg_sq"]) for state in states]
        steps = [state["step"] for state in states]
        torch._foreach_add_(steps, gate.to(steps[0].device, steps[0].dtype))
        # decoupled weight decay, then the moments: the same order and formulas as torch's foreach AdamW
        torch._foreach_mul_(weights, (1 - lr * group["weight_decay"] * gate).to(torch.float32))
        torch._foreach_lerp_(exp_avgs, grads, [((1 - beta1) * gate).to(torch.float32)] * len(grads))
        torch._foreach_mul_(exp_avg_sqs, torch.where(gate > 0, beta2, 1.0).to(torch.float32))
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1 - beta2)
        # bias corrections per parameter (an expert without tokens has stepped less); a step never taken
        # counts as 1 there, its size being 0 anyway
        counts = torch._foreach_maximum([step.to(device, torch.float64) for step in steps], 1.0)
        step_sizes = [(-lr / (1 - beta1**count) * gate).to(torch.float32) for count in counts]
        denominators = torch._foreach_sqrt(exp_avg_sqs)
        torch._foreach_div_(denominators, [(1 - beta2**count).sqrt().to(torch.float32) for count in counts])
        torch._foreach_add_(denominators, eps)
        # p + (step_size * m) / denominator, as addcdiv rounds it
        updates = torch._foreach_mul(exp_avgs, step_sizes)
        torch._foreach_div_(updates, denominators)
        torch._foreach_add_(weights, updates)
