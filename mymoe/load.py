"""Load a whole model in one process from whatever a user has; every command loads through here.

    model, config, manifest = load_model("runs/x/checkpoints")     # a run's checkpoints (any EP layout)
    model, config, manifest = load_model("model.safetensors")      # a consolidated file (mymoe-convert)
    model, config, manifest = load_model("hf_folder/")             # a Hugging Face folder (config.json)
    init_from(model, config, path)                                 # fine-tuning: the weights, same architecture

This sits above checkpoint/ (which stores and reads tensors, and builds no model) and convert/ (which
knows each format); the trainer's ``train.init_from``, ``mymoe.generate``, ``mymoe-evaluate`` and
``mymoe-convert`` use it.
A Hugging Face folder is read into memory, never through a temporary file.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from mymoe.checkpoint import CheckpointError, architecture_differences, find_checkpoint
from mymoe.config import Config
from mymoe.convert.consolidate import load_consolidated_model
from mymoe.convert.hf import hf_model
from mymoe.convert.state import checkpoint_model
from mymoe.model import MoECausalLM

UNKNOWN_LAYOUT = {"step": "?", "expert_parallel_size": "?"}  # a file or folder that is not a run's checkpoint


def load_model(path: str | Path, step: Optional[int] = None,
               verify: bool = True) -> tuple[MoECausalLM, Config, dict]:
    """(model with every expert, config, manifest or a stand-in with step and expert_parallel_size "?")
    from a checkpoints folder or step folder (`step`: that step instead of the latest; `verify`: check
    every file's crc32), a consolidated .safetensors file or a Hugging Face folder."""
    source = Path(path)
    if not source.exists():
        raise CheckpointError(f"{source} does not exist: give a run's checkpoints folder, a consolidated "
                              f".safetensors file or a Hugging Face folder")
    if source.is_file():
        model, config = load_consolidated_model(source)
        return model, config, dict(UNKNOWN_LAYOUT)
    if (source / "config.json").is_file():
        model, config, _ = hf_model(source)
        if config.data.tokenizer is None and (source / "tokenizer.model").is_file():
            config.data.tokenizer = str(source / "tokenizer.model")
        elif config.data.tokenizer is None and (source / "tokenizer.json").is_file():
            config.data.tokenizer = str(source)  # the folder: its config files name the special tokens
        return model, config, dict(UNKNOWN_LAYOUT)
    directory, manifest = find_checkpoint(source, step, verify)
    model, config = checkpoint_model(directory, manifest)
    return model, config, manifest


def init_from(model: MoECausalLM, config: Config, path: str | Path) -> None:
    """Copy the weights found at `path` into a freshly built, not yet sharded model of the same
    architecture: the start of a fine-tuning run (no optimizer state, step 0)."""
    source, source_config, _ = load_model(path)
    differences = architecture_differences(source_config.to_dict()["model"], config.to_dict()["model"])
    if differences:
        raise CheckpointError(f"train.init_from={path} holds another architecture than this run:\n  "
                              + "\n  ".join(differences) + "\nset the model section to the source's values")
    model.load_state_dict(source.state_dict())
