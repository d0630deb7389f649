"""Load a whole model in one process from whatever a user has; every command loads through here.

    model, config, manifest = load_model("runs/x/checkpoints")     # a run's checkpoints (any EP layout)
    model, config, manifest = load_model("model.safetensors")      # a consolidated file (mymoe-convert)
    model, config, manifest = load_model("hf_folder/")             # a Hugging Face folder (config.json)
    model, config, manifest = load_model("model.pt")               # a torch.save'd state dict (+ config)
    vector_model = load_vector_model("vectors.pt")                 # a VectorMoE saved by save_vector_model
    init_from(model, config, path)                                 # fine-tuning: the weights, same architecture

This sits above checkpoint/ (which stores and reads tensors, and builds no model) and convert/ (which
knows each format); the trainer's ``train.init_from``, ``mymoe.generate``, ``mymoe-evaluate`` and
``mymoe-convert`` use it. A Hugging Face folder is read into memory, never through a temporary file. A .pt
file is read with ``torch.load(weights_only=True)``: tensors, numbers, strings and containers only, so a file
that would run code while unpickling is refused rather than trusted.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Optional

import torch

from mymoe.checkpoint import CheckpointError, architecture_differences, find_checkpoint
from mymoe.config import Config, config_from_dict, load_config, validate
from mymoe.convert.consolidate import config_path_beside, load_consolidated_model
from mymoe.convert.hf import hf_model
from mymoe.convert.state import checkpoint_model
from mymoe.model import MoECausalLM
from mymoe.model.vector import VectorMoE

UNKNOWN_LAYOUT = {"step": "?", "expert_parallel_size": "?"}  # a file or folder that is not a run's checkpoint
TORCH_SUFFIXES = (".pt", ".pth", ".bin")  # torch.save files; anything else that is a file is consolidated


def load_model(path: str | Path, step: Optional[int] = None, verify: bool = True) -> tuple[MoECausalLM, Config, dict]:
    """(model with every expert, config, manifest or a stand-in with step and expert_parallel_size "?")
    from a checkpoints folder or step folder (`step`: that step instead of the latest; `verify`: check
    every file's crc32), a consolidated .safetensors file, a Hugging Face folder or a .pt state dict."""
    source = Path(path)
    if not source.exists():
        raise CheckpointError(
            f"{source} does not exist: give a run's checkpoints folder, a consolidated "
            f".safetensors file, a Hugging Face folder or a .pt state dict"
        )
    if source.is_file() and source.suffix in TORCH_SUFFIXES:
        model, config = state_dict_model(source)
        return model, config, dict(UNKNOWN_LAYOUT)
    if source.is_file():
        model, config = load_consolidated_model(source)
        return model, config, dict(UNKNOWN_LAYOUT)
    if (source / "config.json").is_file():
        model, config, _ = hf_model(source)
        if config.data.tokenizer is None and (source / "tokenizer.model").is_file():  # what our exports hold
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
        raise CheckpointError(
            f"train.init_from={path} holds another architecture than this run:\n  "
            + "\n  ".join(differences)
            + "\nset the model section to the source's values"
        )
    model.load_state_dict(source.state_dict())


def read_torch_file(path: Path):
    """torch.load with weights_only=True: a pickle that names a function or class (one that would run code
    while loading) is refused with a one-line CheckpointError."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        lines = [
            line.strip().rstrip(".") for line in str(error).splitlines() if "GLOBAL" in line or "Unsupported" in line
        ]
        raise CheckpointError(
            f"{path} is refused: it holds pickled Python objects, not only tensors and plain "
            f"values, and unpickling them could run code ({lines[0] if lines else 'not a state dict'}); "
            f"save the weights with torch.save(model.state_dict(), path)"
        ) from None


def state_dict_model(path: Path) -> tuple[MoECausalLM, Config]:
    """A .pt file: {"model_state_dict": ..., "config": config.to_dict()}, or a bare state dict with the run's
    YAML config beside it (model.pt -> model.yaml)."""
    saved = read_torch_file(path)
    state, values = saved, None
    if isinstance(saved, dict) and "model_state_dict" in saved:
        state, values = saved["model_state_dict"], saved.get("config")
    if not isinstance(state, dict):
        raise CheckpointError(
            f"{path} holds a {type(state).__name__}, not a state dict: save torch.save(model.state_dict(), path)"
        )
    if values is not None:
        config = validate(config_from_dict(values if "model" in values else {"model": values}))
    elif config_path_beside(path).is_file():
        config = load_config(str(config_path_beside(path)))
    else:
        raise CheckpointError(
            f"{path} holds weights but not the architecture: put the run's config beside it as "
            f"{config_path_beside(path)}, or save {{'model_state_dict': model.state_dict(), "
            f"'config': config.to_dict()}}"
        )
    model = MoECausalLM(config.model)
    model.load_state_dict(state)
    return model, config


def save_vector_model(model: VectorMoE, path: str | Path) -> None:
    """The weights and the architecture (plain values) in one .pt file that load_vector_model reads."""
    torch.save({"model_state_dict": model.state_dict(), "config": model.architecture()}, path)


def load_vector_model(path: str | Path) -> VectorMoE:
    """A VectorMoE (the simple_moe model of ``mymoe.generate``) from a file save_vector_model wrote."""
    saved = read_torch_file(Path(path))
    if not (
        isinstance(saved, dict) and {"model_state_dict", "config"} <= saved.keys() and "in_features" in saved["config"]
    ):
        raise CheckpointError(
            f"{path} is not a vector model file: write one with mymoe.load.save_vector_model "
            f"(model_state_dict and config)"
        )
    model = VectorMoE.from_architecture(saved["config"])
    model.load_state_dict(saved["model_state_dict"])
    return model.eval()
