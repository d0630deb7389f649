"""AdamW with the parameter groups a MoE needs: below both the trainer and the converters, which build
the same optimizer so that parameter indices and hyperparameters of a checkpoint line up."""

from __future__ import annotations

import torch
from torch import nn

from mymoe.config import TrainConfig
from mymoe.model.moe.experts import is_expert


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
    return [
        {
            "params": params,
            "weight_decay": weight_decay if decay else 0.0,
            "name": f"{'expert' if expert else 'dense'}_{'decay' if decay else 'no_decay'}",
        }
        for (expert, decay), params in sorted(groups.items())
    ]


def build_optimizer(param_groups: list[dict], train: TrainConfig) -> torch.optim.AdamW:
    # foreach kernels are the fast path on CPU and GPU alike; fused AdamW is CUDA-only. On a GPU the step
    # counters live on the device (capturable), so neither the update nor the trainer's gated one
    # (train/guard.py, which skips a non-finite step on the device) reads them on the host
    on_gpu = any(p.is_cuda for group in param_groups for p in group["params"])
    return torch.optim.AdamW(
        param_groups,
        lr=train.lr,
        betas=(train.adam_beta1, train.adam_beta2),
        eps=train.adam_eps,
        foreach=True,
        capturable=on_gpu,
    )
