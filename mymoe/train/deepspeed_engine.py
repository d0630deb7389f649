"""The DeepSpeed path: the same model, data and logging, with DeepSpeed doing gradient reduction,
clipping and (ZeRO-1/2) optimizer-state partitioning.

Our dispatcher still moves the tokens; DeepSpeed only needs to know which parameters are experts so
it reduces them over the expert-data-parallel group. It learns that from two attributes it reads on
each parameter (``allreduce=False`` and ``group_name``), and from the expert groups it keeps in
``deepspeed.utils.groups``, which we create with the same layout as ours (EP groups of consecutive ranks).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from mymoe.config import Config


def load_deepspeed_config(path: str, config: Config, world_size: int) -> dict:
    file = Path(path)
    if not file.exists():
        raise FileNotFoundError(f"DeepSpeed config {path} does not exist (see configs/ds_zero1.json, ds_zero2.json)")
    ds_config = json.loads(file.read_text())
    stage = ds_config.get("zero_optimization", {}).get("stage", 0)
    if stage not in (0, 1, 2):
        raise ValueError(f"{path}: zero_optimization.stage={stage} is not supported with expert parallelism here; "
                         f"use stage 0, 1 or 2")
    tr = config.train
    # Our config is the single source of truth for batch, accumulation and clipping, so both paths agree.
    ds_config.update(train_micro_batch_size_per_gpu=tr.micro_batch_size,
                     gradient_accumulation_steps=tr.gradient_accumulation_steps,
                     train_batch_size=tr.micro_batch_size * tr.gradient_accumulation_steps * world_size,
                     gradient_clipping=tr.grad_clip)
    ds_config.setdefault("zero_allow_untested_optimizer", True)
    if tr.precision == "bf16":
        ds_config.setdefault("bf16", {"enabled": True})
    return ds_config


def initialize_deepspeed(model: torch.nn.Module, optimizer: torch.optim.Optimizer, config: Config, ctx, path: str):
    import deepspeed
    from deepspeed.utils import groups

    ds_config = load_deepspeed_config(path, config, ctx.world_size)
    deepspeed.init_distributed(dist_backend=ctx.backend)
    ep_size = ctx.expert_parallel_size
    group_name = f"ep_size_{ep_size}"
    if group_name not in groups._get_expert_parallel_group_dict():
        groups._create_expert_and_data_parallel(ep_size)
    for param in model.parameters():
        if getattr(param, "is_expert", False):
            param.allreduce = False
            param.group_name = group_name
    # Regroup the optimizer's groups into DeepSpeed's MoE groups (one per expert group name) while
    # keeping our decay / no-decay split and hyper-parameters.
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    param_groups = [{k: v for k, v in group.items() if k != "moe"} for group in optimizer.param_groups]
    param_groups = split_params_into_different_moe_groups_for_optimizer(param_groups)
    optimizer = type(optimizer)(param_groups, **optimizer.defaults)
    engine, ds_optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    return engine, ds_optimizer
