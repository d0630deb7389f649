"""The DeepSpeed path: the same model, data and logging, with DeepSpeed doing gradient reduction,
clipping and (ZeRO-1/2) optimizer-state partitioning.

Our dispatcher still moves the tokens; DeepSpeed only has to reduce expert gradients over the
expert-data-parallel group instead of the world. It learns which parameters are experts the way its
own MoE layers tell it:

- each expert parameter carries ``allreduce=False`` and ``group_name="ep_size_<EP>"``;
- expert parameters sit in their own optimizer groups marked ``"moe": True`` and named by that group
  name (``deepspeed.moe.utils.split_params_into_different_moe_groups_for_optimizer``);
- ``deepspeed.utils.groups`` holds the "ep_size_<EP>" groups, created with the same layout as ours
  (expert-parallel groups of consecutive ranks, expert-data-parallel groups strided);
- the engine looks for MoE layers by class (``deepspeed.moe.layer.MoE``) to decide whether to use all of
  the above, so while it is built our MoELayer is accepted as one (see ``_engine_sees_moe_layers``).

Both paths average gradients alike (dense over the world, experts summed over edp and divided by the
world size) and clip on the same global norm, so they train the same fp32 model to within rounding.
"""
from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch

from mymoe.config import Config, ConfigError
from mymoe.model.moe.layer import MoELayer
from mymoe.train.optim import build_optimizer, is_expert, parameter_groups


def load_deepspeed_config(path: str, config: Config, world_size: int) -> dict:
    """Read a DeepSpeed JSON and impose our batch, accumulation, clipping and precision on it."""
    file = Path(path)
    if not file.exists():
        raise ConfigError(f"DeepSpeed config {path} does not exist (see configs/ds_zero1.json, configs/ds_zero2.json)")
    try:
        ds_config = json.loads(file.read_text())
    except json.JSONDecodeError as error:
        raise ConfigError(f"DeepSpeed config {path} is not valid JSON: {error}") from None
    stage = ds_config.get("zero_optimization", {}).get("stage", 0)
    if stage not in (0, 1, 2):
        raise ConfigError(f"{path}: zero_optimization.stage={stage} is not supported with our expert parallelism "
                          f"(DeepSpeed allows MoE only with stage 0, 1 or 2): use configs/ds_zero1.json or ds_zero2.json")
    for key in ("optimizer", "scheduler", "fp16"):
        if key in ds_config:
            raise ConfigError(f"{path}: remove '{key}': the optimizer, schedule and precision come from the "
                              f"MyMoE config (train.lr, train.warmup_steps, train.precision)")
    train = config.train
    # Our config is the single source of truth for batch, accumulation and clipping, so both paths agree.
    ds_config.update(train_micro_batch_size_per_gpu=train.micro_batch_size,
                     gradient_accumulation_steps=train.gradient_accumulation_steps,
                     train_batch_size=train.micro_batch_size * train.gradient_accumulation_steps * world_size,
                     gradient_clipping=train.grad_clip,
                     bf16={"enabled": train.precision == "bf16"})
    ds_config.setdefault("zero_allow_untested_optimizer", True)
    ds_config.setdefault("steps_per_print", 10**9)
    return ds_config


def moe_param_groups(model: torch.nn.Module, weight_decay: float, expert_parallel_size: int) -> list[dict]:
    """Our decay / no-decay groups, expert parameters marked and regrouped the DeepSpeed way."""
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    group_name = f"ep_size_{expert_parallel_size}"
    for param in model.parameters():
        if is_expert(param):
            param.allreduce = False
            param.group_name = group_name
    groups = split_params_into_different_moe_groups_for_optimizer(parameter_groups(model, weight_decay))
    return [group for group in groups if group["params"]]


@contextlib.contextmanager
def _engine_sees_moe_layers():
    """DeepSpeedEngine sets has_moe_layers (and with it every expert-aware reduction) only for modules
    that are instances of its own MoE class; during construction let it count ours too."""
    from deepspeed.runtime import engine as engine_module

    original = engine_module.MoE
    engine_module.MoE = (original, MoELayer)
    try:
        yield
    finally:
        engine_module.MoE = original


def initialize_deepspeed(model: torch.nn.Module, config: Config, ctx, path: str):
    """Wrap the parallelized model with deepspeed.initialize; returns (engine, its optimizer)."""
    import deepspeed
    from deepspeed.utils import groups

    if not ctx.is_distributed:
        raise ConfigError("--deepspeed needs a launcher (torchrun, deepspeed, mpirun or srun) with at least 2 "
                          "processes; for one process train without --deepspeed")
    ds_config = load_deepspeed_config(path, config, ctx.world_size)
    deepspeed.init_distributed(dist_backend=ctx.backend)  # joins the process group we already made
    if f"ep_size_{ctx.expert_parallel_size}" not in groups._get_expert_parallel_group_dict():
        groups._create_expert_and_data_parallel(ctx.expert_parallel_size)
    optimizer = build_optimizer(moe_param_groups(model, config.train.weight_decay, ctx.expert_parallel_size),
                                config.train)
    with _engine_sees_moe_layers():
        engine, ds_optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    return engine, ds_optimizer
