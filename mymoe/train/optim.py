"""AdamW with the parameter groups a MoE needs, and the warmup + cosine learning-rate schedule."""
from __future__ import annotations

import math

import torch
from torch import nn

from mymoe.config import TrainConfig


def is_expert(param: torch.Tensor) -> bool:
    return getattr(param, "is_expert", False)


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices only: norms, biases and the expert-bias buffer-like vectors are not regularised.

    Expert and non-expert parameters go to separate groups (marked with "moe") because DeepSpeed
    reduces expert groups over the expert-data-parallel group; the native path ignores the mark.
    """
    groups: dict[tuple, list] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        decay = param.dim() >= 2 and "norm" not in name
        groups.setdefault((decay, is_expert(param)), []).append(param)
    result = []
    for (decay, expert), params in sorted(groups.items()):
        group = {"params": params, "weight_decay": weight_decay if decay else 0.0,
                 "name": f"{'expert' if expert else 'dense'}_{'decay' if decay else 'no_decay'}"}
        if expert:
            group["moe"] = True
        result.append(group)
    return result


def build_optimizer(model: nn.Module, train: TrainConfig) -> torch.optim.AdamW:
    groups = parameter_groups(model, train.weight_decay)
    # foreach kernels are the fast path on CPU and GPU alike; fused AdamW is CUDA-only
    return torch.optim.AdamW(groups, lr=train.lr, betas=(train.adam_beta1, train.adam_beta2), eps=train.adam_eps,
                             foreach=True)


def learning_rate(step: int, train: TrainConfig) -> float:
    """Linear warmup to lr, then cosine decay to min_lr at max_steps (step counts from 0)."""
    if train.warmup_steps and step < train.warmup_steps:
        return train.lr * (step + 1) / train.warmup_steps
    decay_steps = max(train.max_steps - train.warmup_steps, 1)
    progress = min(max(step - train.warmup_steps, 0) / decay_steps, 1.0)
    return train.min_lr + 0.5 * (train.lr - train.min_lr) * (1 + math.cos(math.pi * progress))


def aux_loss_scale(step: int, train: TrainConfig) -> float:
    """Ramp the aux-loss coefficients from 0 so the router is not forced to balance random features."""
    if train.aux_loss_ramp_steps <= 0:
        return 1.0
    return min(1.0, (step + 1) / train.aux_loss_ramp_steps)


class Schedule:
    """Sets each group's lr for the step; stateless apart from the step, which the checkpoint stores."""

    def __init__(self, optimizer: torch.optim.Optimizer, train: TrainConfig):
        self.optimizer, self.train = optimizer, train

    def apply(self, step: int) -> float:
        lr = learning_rate(step, self.train)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr
