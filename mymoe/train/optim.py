"""AdamW with the parameter groups a MoE needs, and the warmup + cosine learning-rate schedule."""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from mymoe.config import TrainConfig


def is_expert(param: torch.Tensor) -> bool:
    return getattr(param, "is_expert", False)


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decoupled weight decay on matrices only: norms, biases and other vectors are not regularised.

    Expert and dense parameters go to separate groups (names "expert_decay", "dense_no_decay", ...) so
    that the DeepSpeed path can hand the expert ones to its MoE grouping; the native path treats all
    groups alike. A tied matrix appears once.
    """
    groups: dict[tuple, list] = {}
    seen = set()
    for name, param in model.named_parameters():
        if not param.requires_grad or id(param) in seen:
            continue
        seen.add(id(param))
        decay = param.dim() >= 2 and "norm" not in name
        groups.setdefault((is_expert(param), decay), []).append(param)
    return [{"params": params, "weight_decay": weight_decay if decay else 0.0,
             "name": f"{'expert' if expert else 'dense'}_{'decay' if decay else 'no_decay'}"}
            for (expert, decay), params in sorted(groups.items())]


def build_optimizer(param_groups: list[dict], train: TrainConfig) -> torch.optim.AdamW:
    # foreach kernels are the fast path on CPU and GPU alike; fused AdamW is CUDA-only
    return torch.optim.AdamW(param_groups, lr=train.lr, betas=(train.adam_beta1, train.adam_beta2),
                             eps=train.adam_eps, foreach=True)


def total_steps(train: TrainConfig, tokens_per_step: int) -> int:
    """Steps the run will take: max_steps, or fewer when max_tokens is reached first."""
    if train.max_tokens is None:
        return train.max_steps
    return min(train.max_steps, math.ceil(train.max_tokens / tokens_per_step))


def learning_rate(step: int, train: TrainConfig, steps: Optional[int] = None) -> float:
    """Linear warmup to lr over warmup_steps, then cosine decay to min_lr at `steps` (default max_steps).

    `step` counts from 0, so the first step already trains at lr / warmup_steps rather than at 0.
    """
    steps = train.max_steps if steps is None else steps
    if train.warmup_steps and step < train.warmup_steps:
        return train.lr * (step + 1) / train.warmup_steps
    decay_steps = max(steps - train.warmup_steps, 1)
    progress = min(max(step - train.warmup_steps, 0) / decay_steps, 1.0)
    return train.min_lr + 0.5 * (train.lr - train.min_lr) * (1 + math.cos(math.pi * progress))


def aux_loss_scale(step: int, train: TrainConfig) -> float:
    """Ramp the aux-loss coefficients from 0 so the router is not forced to balance random features."""
    if train.aux_loss_ramp_steps <= 0:
        return 1.0
    return min(1.0, (step + 1) / train.aux_loss_ramp_steps)


class Schedule:
    """Sets each group's lr for the step; stateless apart from the step, which the checkpoint stores."""

    def __init__(self, optimizer: torch.optim.Optimizer, train: TrainConfig, steps: Optional[int] = None):
        self.optimizer, self.train, self.steps = optimizer, train, steps

    def apply(self, step: int) -> float:
        lr = learning_rate(step, self.train, self.steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr
