"""Load a whole model in one process from whatever a user has: a run's checkpoints folder (any
expert-parallel layout), a consolidated .safetensors file, or a Hugging Face folder."""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Optional

from mymoe.checkpoint import load_model
from mymoe.checkpoint.manager import architecture_differences
from mymoe.checkpoint.storage import CheckpointError
from mymoe.convert.consolidate import load_consolidated_model


def load_any(path: str | Path, step: Optional[int] = None):
    """(model, config, manifest-like dict) from a checkpoints folder, consolidated file or Hugging Face folder."""
    source = Path(path)
    if not source.exists():
        raise CheckpointError(f"{source} does not exist: give a run's checkpoints folder, a consolidated "
                              f".safetensors file or a Hugging Face folder")
    if source.is_file():
        model, config = load_consolidated_model(source)
        return model, config, {"step": "?", "expert_parallel_size": "?"}
    if (source / "config.json").is_file():
        from mymoe.convert.hf import import_hf

        with tempfile.TemporaryDirectory(prefix="mymoe-load-") as scratch:
            import_hf(source, Path(scratch) / "model.safetensors")
            model, config = load_consolidated_model(Path(scratch) / "model.safetensors")
        if config.data.tokenizer is None and (source / "tokenizer.model").is_file():
            config.data.tokenizer = str(source / "tokenizer.model")
        elif config.data.tokenizer is None and (source / "tokenizer.json").is_file():
            config.data.tokenizer = str(source)  # the folder: its config files name the special tokens
        return model, config, {"step": "?", "expert_parallel_size": "?"}
    return load_model(source, step)


def init_from(model, config, path: str | Path) -> None:
    """Copy the weights found at `path` into a freshly built, not yet sharded model of the same
    architecture: the start of a fine-tuning run (no optimizer state, step 0)."""
    source, source_config, _ = load_any(path)
    differences = architecture_differences(source_config.to_dict()["model"], config.to_dict()["model"])
    if differences:
        raise CheckpointError(f"train.init_from={path} holds another architecture than this run:\n  "
                              + "\n  ".join(differences) + "\nset the model section to the source's values")
    model.load_state_dict(source.state_dict())
