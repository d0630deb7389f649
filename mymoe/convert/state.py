"""A whole training state in one process: the model, the AdamW state, step, reader position and RNG.

`TrainingState` stands in for the Trainer at the checkpoint seam (`state_dict` / `load_state_dict`,
`model`, `optimizer`), so the CheckpointManager reads and writes it like a real run: same files, same
checks. It builds no data reader and runs no forward pass; the reader state passes through untouched.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import warnings

import torch
import torch.distributed.checkpoint as dcp

from mymoe.checkpoint.layout import optimizer_parameter_names, restore_param_groups
from mymoe.checkpoint.manager import checkpoint_reader, read_tensors, saved_tensor_keys
from mymoe.checkpoint.storage import TensorsOnlyLoadPlanner
from mymoe.config import Config, config_from_dict
from mymoe.model import MoECausalLM
from mymoe.optim import build_optimizer, parameter_groups
from mymoe.peft import apply_peft, merge_lora


class TrainingState:
    """Model (all experts, or experts [first, first + count)), optimizer and the run's counters."""

    def __init__(self, config: Config, first_expert: int = 0, num_experts: Optional[int] = None):
        self.config = config
        self.model = MoECausalLM(config.model)
        total = config.model.moe.n_routed_experts
        if num_experts is not None and num_experts != total:
            for layer in self.model.iter_moe_layers():
                layer.experts.shard(first_expert, num_experts)
        # the trainer's own groups, so parameter indices and hyperparameters line up with a real run
        self.optimizer = build_optimizer(parameter_groups(self.model, config.train.weight_decay), config.train)
        self.step = 0
        self.tokens_seen = 0
        self.train_reader: Optional[dict] = None
        self.rng: dict = {"cpu": torch.get_rng_state(), "cuda": None}

    def state_dict(self) -> dict:
        return {
            "step": self.step,
            "tokens_seen": self.tokens_seen,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "train_reader": self.train_reader,
            "rng": self.rng,
        }

    def load_state_dict(self, state: dict) -> None:
        self.step, self.tokens_seen = int(state["step"]), int(state["tokens_seen"])
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.train_reader = state["train_reader"]
        self.rng = {"cpu": state["rng"]["cpu"], "cuda": state["rng"].get("cuda")}

    def optimizer_names(self) -> list[str]:
        return optimizer_parameter_names(self.model, self.optimizer)


def checkpoint_model(directory: Path, manifest: dict) -> tuple[MoECausalLM, Config]:
    """The saved model whole in this process (every expert) with its weights, and its config; the caller
    has found the folder and verified its files. LoRA adapters of a fine-tuning run come back merged into
    the weights; prefix-tuning ones stay attached."""
    config = config_from_dict(manifest["config"])
    model = MoECausalLM(config.model)
    peft = config.peft
    if peft.enabled:  # the adapters the run trained, attached as it attached them
        apply_peft(model, peft.lora_rank, peft.lora_alpha, peft.lora_targets, peft.prefix_length, config.train.seed)
    targets, _ = read_tensors(directory, manifest, {"model": model.state_dict()}, model, None, rank=0)
    model.load_state_dict(targets.model)
    if peft.lora_rank:
        merge_lora(model)  # one plain weight per matrix: what generation and export want
    return model, config


def read_whole_checkpoint(directory: Path, manifest: dict, config: Config) -> tuple[TrainingState, dict]:
    """Every expert, the optimizer state and every rank's RNG of a committed checkpoint folder.

    Returns (state, {"rng.cpu.rank_N": tensor, ...}); the caller has verified the files.
    """
    state = TrainingState(config)
    template = {"model": state.model.state_dict()}
    targets, rng = read_tensors(directory, manifest, template, state.model, state.optimizer, rank=0)
    saved = state.optimizer.state_dict()
    state.load_state_dict(
        {
            "step": manifest["step"],
            "tokens_seen": manifest["tokens_seen"],
            "model": targets.model,
            "optimizer": {
                "state": targets.optimizer_state,
                "param_groups": restore_param_groups(saved["param_groups"], manifest["optimizer_param_groups"]),
            },
            "train_reader": manifest["train_reader"],
            "rng": rng,
        }
    )
    return state, read_rng_tensors(directory, manifest)


def read_rng_tensors(directory: Path, manifest: dict) -> dict[str, torch.Tensor]:
    """Every rank's saved RNG state, so a round trip keeps each rank's random stream."""
    keys = {key: shape for key, (shape, _) in saved_tensor_keys(directory).items() if key.startswith("rng.")}
    tensors = {key: torch.empty(shape, dtype=torch.uint8) for key, shape in keys.items()}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(
            tensors,
            storage_reader=checkpoint_reader(directory, manifest),
            planner=TensorsOnlyLoadPlanner(),
            no_dist=True,
        )
    return tensors
