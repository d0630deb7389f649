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

Checkpoints go through the same CheckpointManager: ``ZeroOptimizerView`` shows ZeRO's partitioned Adam
state per model parameter, in the native optimizer's groups, so a checkpoint saved on either path
resumes on the other.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch

from mymoe.config import Config, ConfigError
from mymoe.model.moe.experts import is_expert
from mymoe.model.moe.layer import MoELayer
from mymoe.optim import build_optimizer, parameter_groups


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
    if stage not in (1, 2):
        raise ConfigError(
            f"{path}: zero_optimization.stage={stage} is not supported: DeepSpeed allows MoE only up to "
            f"stage 2, and stage 0 adds nothing to the native path; use configs/ds_zero1.json or "
            f"configs/ds_zero2.json"
        )
    for key in ("optimizer", "scheduler", "fp16"):
        if key in ds_config:
            raise ConfigError(
                f"{path}: remove '{key}': the optimizer, schedule and precision come from the "
                f"MyMoE config (train.lr, train.warmup_steps, train.precision)"
            )
    train = config.train
    # Our config is the single source of truth for batch, accumulation and clipping, so both paths agree.
    ds_config.update(
        train_micro_batch_size_per_gpu=train.micro_batch_size,
        gradient_accumulation_steps=train.gradient_accumulation_steps,
        train_batch_size=train.micro_batch_size * train.gradient_accumulation_steps * world_size,
        gradient_clipping=train.grad_clip,
        bf16={"enabled": train.precision == "bf16"},
    )
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
    """Wrap the parallelized model with deepspeed.initialize; returns (engine, its ZeRO optimizer)."""
    import deepspeed
    from deepspeed.utils import groups

    if not ctx.is_distributed:
        raise ConfigError(
            "--deepspeed needs a launcher (torchrun, deepspeed, mpirun or srun) with at least 2 "
            "processes; for one process train without --deepspeed"
        )
    ds_config = load_deepspeed_config(path, config, ctx.world_size)
    deepspeed.init_distributed(dist_backend=ctx.backend)  # joins the process group we already made
    if f"ep_size_{ctx.expert_parallel_size}" not in groups._get_expert_parallel_group_dict():
        groups._create_expert_and_data_parallel(ctx.expert_parallel_size)
    optimizer = build_optimizer(
        moe_param_groups(model, config.train.weight_decay, ctx.expert_parallel_size), config.train
    )
    with _engine_sees_moe_layers():
        engine, ds_optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    return engine, ds_optimizer


class ZeroOptimizerView:
    """ZeRO-1/2's optimizer state seen per model parameter, grouped as the native path groups it.

    ZeRO keeps Adam's moments in flat fp32 partitions spread over the data-parallel ranks (the expert ones
    over the expert-data-parallel group); checkpoints address state per parameter, experts by global
    index. ``state_dict`` gathers each parameter's full moments (a collective: every rank calls it in the
    same order), ``load_state_dict`` writes each rank's share back. Only what the CheckpointManager uses
    is here: ``param_groups``, ``state_dict`` and ``load_state_dict``.
    """

    MOMENTS = ("exp_avg", "exp_avg_sq")

    def __init__(self, model: torch.nn.Module, zero_optimizer, weight_decay: float):
        self.zero = zero_optimizer
        hyper = dict(zero_optimizer.optimizer.defaults)
        self.param_groups = [{**hyper, **group} for group in parameter_groups(model, weight_decay)]

    def _parameters(self) -> list:
        return [param for group in self.param_groups for param in group["params"]]

    def _step(self):
        """Adam's step count (the same for every group), or None before the first step."""
        states = [self.zero.optimizer.state.get(flat) for flat in self.zero.single_partition_of_fp32_groups]
        return next((state["step"] for state in states if state), None)

    def state_dict(self) -> dict:
        from deepspeed.utils import safe_get_full_optimizer_state

        step = self._step()
        state = {}
        if step is not None:
            self._link_state()
            for index, param in enumerate(self._parameters()):
                state[index] = {
                    "step": torch.as_tensor(step).clone(),
                    **{key: safe_get_full_optimizer_state(param, key) for key in self.MOMENTS},
                }
        groups, start = [], 0
        for group in self.param_groups:
            indices = list(range(start, start + len(group["params"])))
            start += len(indices)
            groups.append({**{key: value for key, value in group.items() if key != "params"}, "params": indices})
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: dict) -> None:
        from deepspeed.utils import safe_set_full_optimizer_state

        saved = state_dict["state"]
        if not saved:
            return
        self._materialize_state(torch.as_tensor(next(iter(saved.values()))["step"]))
        for index, param in enumerate(self._parameters()):
            if index in saved:
                for key in self.MOMENTS:
                    safe_set_full_optimizer_state(param, saved[index][key].to(param.device, torch.float32), key)

    def _materialize_state(self, step: torch.Tensor) -> None:
        """Give every flat partition Adam state (torch creates it lazily, at the first step) with this step
        count, and let ZeRO link each parameter's fragment of it."""
        base = self.zero.optimizer
        for flat in self.zero.single_partition_of_fp32_groups:
            state = base.state[flat]
            state.setdefault("exp_avg", torch.zeros_like(flat))
            state.setdefault("exp_avg_sq", torch.zeros_like(flat))
            state["step"] = step.detach().clone().to(torch.float32)
        self._link_state()

    def _link_state(self) -> None:
        """Point every parameter's fragment at the current Adam state. ZeRO links them once, right after
        the first group's first step, when the later groups have no state yet; so link again here."""
        self.zero._hp_optimizer_states_linked = False
        self.zero._lazy_init_hp_params_optimizer_state()

    def refresh_master_weights(self) -> None:
        """After the model's weights were loaded: copy them into ZeRO's fp32 master partitions."""
        self.zero.refresh_fp32_params()
