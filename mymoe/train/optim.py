"""The warmup + cosine learning-rate schedule and the aux-loss ramp (AdamW and its groups: mymoe.optim)."""

from __future__ import annotations

import math
from typing import Optional

import torch

from mymoe.config import TrainConfig


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
