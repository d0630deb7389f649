"""Trainer state <-> a flat dict of tensors addressed by global expert index, plus JSON-able extras.

Stacked expert tensors ([E_local, ...], marked ``param.is_expert``) and their optimizer moments are cut
into one tensor per expert, keyed by the expert's global index:

    model.model.layers.1.mlp.experts.w_gate.expert_5               one expert's weight
    optim.model.layers.1.mlp.experts.w_gate.exp_avg.expert_5       its AdamW first moment
    model.model.layers.1.mlp.gate.expert_bias                      replicated tensors keep their name
    rng.cpu.rank_0                                                 per-rank RNG state

A rank saves the keys it holds and loads the keys its layout needs, so any expert-parallel size can
load any checkpoint. Replicated tensors are the same key on every rank; DCP writes one copy.
Everything that is not a tensor (step, reader state, optimizer hyperparameters) goes to the manifest.

Under FSDP (mymoe/parallel/fsdp.py) parameters and their optimizer moments are DTensors: a dense one is
handed to DCP as it is, which writes each rank's shard as part of the one global tensor; a stacked expert
one is sharded by whole experts on dim 0, so each rank writes the experts of its rows, or, when a rank
holds fewer experts than it has expert-data-parallel peers, on dim 1, so each expert's entry is a DTensor
of which each rank writes its slice. The checkpoint looks the same whichever layout wrote it, and loading
builds targets in the loading run's layout.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from mymoe.checkpoint.storage import CheckpointError, tensor_crc32
from mymoe.model.moe.experts import is_expert


@dataclass(frozen=True)
class ExpertRows:
    """Which global experts the rows of a stacked expert tensor hold."""

    first: int
    count: int
    total: int

    def global_indices(self) -> range:
        return range(self.first, self.first + self.count)


def expert_key(key: str, expert: int) -> str:
    return f"{key}.expert_{expert}"


def expert_rows(model: nn.Module) -> dict[str, ExpertRows]:
    """Parameter name -> global experts held, for every parameter marked ``is_expert``."""
    rows = {}
    for name, param in model.named_parameters():
        if is_expert(param):
            owner = _expert_module(model, name)
            rows[name] = ExpertRows(owner.first_expert, owner.num_experts, owner.num_global_experts)
    return rows


def _expert_module(model: nn.Module, name: str) -> nn.Module:
    """The experts module a parameter belongs to: its parent, or an ancestor for the parameters a
    parametrization (LoRA) keeps below it (experts.parametrizations.w_gate.0.lora_A)."""
    path = name.rpartition(".")[0]
    while path:
        module = model.get_submodule(path)
        if hasattr(module, "first_expert"):
            return module
        path = path.rpartition(".")[0]
    raise CheckpointError(f"parameter {name} is marked as an expert parameter but no experts module holds it")


def optimizer_parameter_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """Names of the optimizer's parameters in the order of its state_dict indices."""
    names = {id(param): name for name, param in model.named_parameters()}
    ordered = []
    for group in optimizer.param_groups:
        for param in group["params"]:
            if id(param) not in names:
                raise CheckpointError(
                    "the optimizer holds a parameter that is not in the model; build the optimizer "
                    "from model.parameters()"
                )
            ordered.append(names[id(param)])
    return ordered


def held_rows(value: torch.Tensor, rows: ExpertRows) -> tuple[torch.Tensor, int]:
    """(the rows of a stacked expert tensor this rank holds, the global index of the first): all of them, or
    under FSDP this rank's shard of them."""
    if not isinstance(value, DTensor):
        return value, rows.first
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    _, offset = compute_local_shape_and_global_offset(value.shape, value.device_mesh, value.placements)
    return value.to_local(), rows.first + offset[0]


def expert_slices(stacked: torch.Tensor, like: torch.Tensor) -> list[torch.Tensor]:
    """One tensor per local row of `stacked` (this rank's part of a stacked expert tensor shaped like `like`):
    the row itself, or when `like` is sharded inside each expert (dim > 0) a DTensor of the whole expert."""
    if not isinstance(like, DTensor) or like.placements[0].dim == 0:
        return [stacked[row] for row in range(stacked.shape[0])]
    from torch.distributed.tensor import Shard

    shape = like.shape[1:]
    placement = [Shard(like.placements[0].dim - 1)]
    return [
        DTensor.from_local(
            stacked[row],
            like.device_mesh,
            placement,
            run_check=False,
            shape=shape,
            stride=torch.empty(shape, device="meta").stride(),
        )
        for row in range(stacked.shape[0])
    ]


def _put(tensors: dict, key: str, value: torch.Tensor, rows: Optional[ExpertRows]) -> None:
    if rows is None or value.dim() == 0:
        tensors[key] = value
        return
    local, first = held_rows(value, rows)
    for row, expert_value in enumerate(expert_slices(local, value)):
        tensors[expert_key(key, first + row)] = expert_value


def flatten(state: dict, model: nn.Module, optimizer: torch.optim.Optimizer, rank: int) -> tuple[dict, dict]:
    """Trainer.state_dict() -> (tensors by key, JSON-able extras). Tensors are views of the live state."""
    rows = expert_rows(model)
    tensors: dict[str, torch.Tensor] = {}
    for name, value in state["model"].items():
        _put(tensors, f"model.{name}", value, rows.get(name))

    names = optimizer_parameter_names(model, optimizer)
    optimizer_state = state["optimizer"]
    optimizer_layout: dict[str, dict] = {}  # param name -> state key -> "tensor" or a plain value
    for index, param_state in optimizer_state["state"].items():
        name = names[index]
        optimizer_layout[name] = {}
        for key, value in param_state.items():
            if torch.is_tensor(value):
                _put(tensors, f"optim.{name}.{key}", value, rows.get(name))
                optimizer_layout[name][key] = "tensor"
            else:
                optimizer_layout[name][key] = value
    param_groups = [
        {key: (list(value) if isinstance(value, tuple) else value) for key, value in group.items() if key != "params"}
        for group in optimizer_state["param_groups"]
    ]

    rng = state["rng"]
    tensors[f"rng.cpu.rank_{rank}"] = rng["cpu"]
    if rng.get("cuda") is not None:
        tensors[f"rng.cuda.rank_{rank}"] = rng["cuda"]

    extras = {
        "step": int(state["step"]),
        "tokens_seen": int(state["tokens_seen"]),
        "train_reader": state["train_reader"],
        "loop": state.get("loop", {}),  # the trainer's own bookkeeping (train/loop.py), JSON
        "optimizer_state": optimizer_layout,
        "optimizer_param_groups": param_groups,
        "scheduler": {"step": int(state["step"])},
    }
    return tensors, extras


def expert_checksums(model: nn.Module, state_model: Optional[dict] = None) -> dict[str, dict[str, int]]:
    """crc32 of every expert this rank holds: {param name: {global index: crc32}}. ``state_model`` (a model
    state dict, e.g. a staged copy) is read instead of the live parameters when given."""
    sums: dict[str, dict[str, int]] = {}
    for name, rows in expert_rows(model).items():
        value = state_model[name] if state_model is not None else model.get_parameter(name)
        sums[name] = {str(expert): tensor_crc32(value[local]) for local, expert in enumerate(rows.global_indices())}
    return sums


# ---------------------------------------------------------------------------------------------------
# loading: destination tensors for this rank's layout, then back to Trainer.load_state_dict's format


@dataclass
class LoadTargets:
    tensors: dict  # key -> tensor DCP fills in (views of the stacked buffers below for experts)
    model: dict  # the model state dict to hand to Trainer.load_state_dict
    optimizer_state: dict  # index -> {state key: tensor or value}


def load_targets(
    template: dict,
    model: nn.Module,
    optimizer: Optional[torch.optim.Optimizer],
    manifest: dict,
    saved_keys: dict[str, tuple[torch.Size, torch.dtype]],
) -> LoadTargets:
    """Fresh tensors, shaped for this rank's layout, for every key it must read.

    ``template`` is the current Trainer.state_dict() (only shapes and dtypes are used); ``saved_keys`` maps
    each key in the checkpoint to its saved (shape, dtype). A key missing or of another shape is refused here, by name.
    """
    rows = expert_rows(model)
    tensors: dict[str, torch.Tensor] = {}

    def target(
        key: str, shape: torch.Size, dtype: torch.dtype, held: Optional[ExpertRows], like: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """`like`: the live tensor of this shape; when it is a DTensor (FSDP) the target takes its layout."""
        sharded = isinstance(like, DTensor)
        if held is None:
            _check(key, shape, saved_keys)
            tensors[key] = torch.empty_like(like, dtype=dtype) if sharded else torch.empty(shape, dtype=dtype)
            return tensors[key]
        first, count, device = held.first, held.count, None
        if sharded:
            local, first = held_rows(like, held)
            count, device = local.shape[0], local.device
        local_shape = tuple(local.shape[1:]) if sharded else tuple(shape)
        stacked = torch.empty((count, *local_shape), dtype=dtype, device=device)  # [E_local (or this rank's), ...]
        for local_row, expert_target in enumerate(expert_slices(stacked, like) if sharded else stacked):
            _check(expert_key(key, first + local_row), shape, saved_keys)
            tensors[expert_key(key, first + local_row)] = expert_target
        if sharded:
            return DTensor.from_local(
                stacked, like.device_mesh, like.placements, run_check=False, shape=like.shape, stride=like.stride()
            )
        return stacked

    model_state = {}
    for name, value in template["model"].items():
        held = rows.get(name) if value.dim() > 0 else None
        model_state[name] = target(
            f"model.{name}", value.shape[1:] if held else value.shape, value.dtype, held, like=value
        )

    optimizer_state: dict[int, dict] = {}
    if optimizer is not None:
        params = [param for group in optimizer.param_groups for param in group["params"]]
        for index, name in enumerate(optimizer_parameter_names(model, optimizer)):
            layout = manifest["optimizer_state"].get(name)
            if layout is None:  # no state saved for it (e.g. a parameter that never had a gradient)
                continue
            optimizer_state[index] = {}
            for key, kind in layout.items():
                if kind != "tensor":
                    optimizer_state[index][key] = kind
                    continue
                flat_key = f"optim.{name}.{key}"
                held = rows.get(name)
                if held is not None and expert_key(flat_key, held.first) in saved_keys:
                    shape, dtype = saved_keys[expert_key(flat_key, held.first)]
                elif flat_key in saved_keys:
                    held, (shape, dtype) = None, saved_keys[flat_key]
                else:
                    raise CheckpointError(f"the checkpoint has no optimizer tensor '{flat_key}' for parameter {name}")
                param = params[index]
                like = param if held is not None or torch.Size(shape) == param.shape else None
                optimizer_state[index][key] = target(flat_key, torch.Size(shape), dtype, held, like=like)
    return LoadTargets(tensors, model_state, optimizer_state)


def _check(key: str, shape: torch.Size, saved_keys: dict) -> None:
    if key not in saved_keys:
        raise CheckpointError(
            f"the checkpoint has no tensor '{key}', which this model needs: it was saved from a different architecture"
        )
    if torch.Size(saved_keys[key][0]) != shape:
        raise CheckpointError(
            f"'{key}' was saved with shape {list(saved_keys[key][0])} but this model needs "
            f"{list(shape)}: the checkpoint is from a different architecture"
        )


def restore_param_groups(current: list[dict], saved: list[dict]) -> list[dict]:
    """The current groups' parameter indices with the saved hyperparameters (tuples restored)."""
    if len(current) != len(saved):
        raise CheckpointError(
            f"the checkpoint's optimizer has {len(saved)} parameter groups but this one has "
            f"{len(current)}: was it built with different settings?"
        )
    groups = []
    for now, then in zip(current, saved):
        group = dict(now)
        for key, value in then.items():
            group[key] = tuple(value) if isinstance(now.get(key), tuple) else value
        groups.append(group)
    return groups
