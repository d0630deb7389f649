"""One safetensors file for a whole model, and its training state, from a sharded checkpoint; and back.

A consolidated file holds, under plain names:

    model.layers.1.mlp.experts.w_gate              every expert stacked [E, hidden, ffn], as the model names it
    optimizer.model.layers.1.mlp.experts.w_gate.exp_avg    AdamW moments, same shapes as the parameter
    rng.cpu.rank_0                                  each rank's RNG state

and in the safetensors metadata the resolved config (``config``) and, unless it was written weights-only,
the rest of the run's state (``training``: step, tokens seen, data-reader position, optimizer layout and
hyperparameters, the layout it was saved at). A tied ``lm_head.weight`` is stored once, as the embedding.
The config is also written beside the file as YAML (``model.safetensors`` -> ``model.yaml``), which
``mymoe-train`` reads. Loading needs no pickle.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch
import yaml
from safetensors import safe_open
from safetensors.torch import save_file

from mymoe.checkpoint.layout import expert_rows, restore_param_groups
from mymoe.checkpoint.manager import find_checkpoint
from mymoe.checkpoint.storage import CheckpointError
from mymoe.config import Config, config_from_dict
from mymoe.convert.atomic import atomic_output
from mymoe.convert.state import TrainingState, checkpoint_model, read_whole_checkpoint
from mymoe.model import MoECausalLM

FORMAT = "mymoe.consolidated"
FORMAT_VERSION = "1"
OPTIMIZER_PREFIX = "optimizer."
RNG_PREFIX = "rng."


def config_path_beside(path: Path) -> Path:
    return path.with_suffix(".yaml")


def consolidate(
    checkpoint: str | Path,
    out_file: str | Path,
    step: Optional[int] = None,
    weights_only: bool = False,
    overwrite: bool = False,
) -> dict:
    """Write the checkpoint as one safetensors file (+ YAML config beside it); returns a summary dict."""
    out_file = Path(out_file)
    directory, manifest = find_checkpoint(checkpoint, step)
    config = config_from_dict(manifest["config"])
    tensors: dict[str, torch.Tensor] = {}
    metadata = {"format": FORMAT, "format_version": FORMAT_VERSION, "config": json.dumps(config.to_dict())}
    if weights_only:
        model, _ = checkpoint_model(directory, manifest)
        tensors.update(model_tensors(model))
    else:
        state, rng = read_whole_checkpoint(directory, manifest, config)
        tensors.update(model_tensors(state.model))
        optimizer = state.optimizer.state_dict()
        for index, name in enumerate(state.optimizer_names()):
            for key, value in optimizer["state"].get(index, {}).items():
                if torch.is_tensor(value):
                    tensors[f"{OPTIMIZER_PREFIX}{name}.{key}"] = value
        tensors.update(rng)
        metadata["training"] = json.dumps(
            {
                "step": manifest["step"],
                "tokens_seen": manifest["tokens_seen"],
                "train_reader": manifest["train_reader"],
                "optimizer_state": manifest["optimizer_state"],
                "optimizer_param_groups": manifest["optimizer_param_groups"],
                "world_size": manifest["world_size"],
                "expert_parallel_size": manifest["expert_parallel_size"],
            }
        )
    config_file = config_path_beside(out_file)
    with atomic_output(out_file, overwrite) as temporary, atomic_output(config_file, overwrite) as temporary_config:
        save_file({key: value.contiguous() for key, value in tensors.items()}, str(temporary), metadata=metadata)
        temporary_config.write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
    return {
        "step": manifest["step"],
        "tensors": len(tensors),
        "bytes": out_file.stat().st_size,
        "config_file": config_file,
        "source": directory,
    }


def model_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict with a tied head stored once (safetensors refuses shared storage)."""
    tensors = dict(model.state_dict())
    if model.config.tie_word_embeddings:
        tensors.pop("lm_head.weight")
    return tensors


def save_weights(
    model: torch.nn.Module, config: Config, out_file: str | Path, overwrite: bool = False, **metadata: str
) -> int:
    """A weights-only consolidated file of `model` and its YAML config beside it (what import-hf and upcycle
    write, and train.init_from reads); returns the number of tensors."""
    out_file = Path(out_file)
    tensors = model_tensors(model)
    metadata = {"format": FORMAT, "format_version": FORMAT_VERSION, "config": json.dumps(config.to_dict()), **metadata}
    with (
        atomic_output(out_file, overwrite) as temporary,
        atomic_output(config_path_beside(out_file), overwrite) as temporary_config,
    ):
        save_file({key: value.contiguous() for key, value in tensors.items()}, str(temporary), metadata=metadata)
        temporary_config.write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
    return len(tensors)


class ConsolidatedFile:
    """A consolidated safetensors file opened lazily: experts are read only for the slice asked for."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise CheckpointError(
                f"{self.path} does not exist: pass a .safetensors file written by `mymoe-convert consolidate`"
            )
        try:
            self._file = safe_open(str(self.path), framework="pt")
        except Exception as error:  # safetensors raises its own error types for a bad header
            raise CheckpointError(f"{self.path} is not a readable safetensors file: {error}") from None
        metadata = self._file.metadata() or {}
        if metadata.get("format") != FORMAT:
            raise CheckpointError(
                f"{self.path} is not a mymoe consolidated file (its metadata has format="
                f"{metadata.get('format')!r}); a Hugging Face export is read with "
                f"`mymoe-convert import-hf`"
            )
        self.config: Config = config_from_dict(json.loads(metadata["config"]))
        self.training: Optional[dict] = json.loads(metadata["training"]) if "training" in metadata else None
        self.keys = set(self._file.keys())

    def tensor(self, key: str, rows: Optional[tuple[int, int]] = None) -> torch.Tensor:
        """The tensor `key`, or rows [first, first + count) of its first dimension."""
        if key not in self.keys:
            raise CheckpointError(f"{self.path} has no tensor '{key}': it was written from another architecture")
        if rows is None:
            return self._file.get_tensor(key)
        first, count = rows
        return self._file.get_slice(key)[first : first + count]

    def require_training(self) -> dict:
        if self.training is None:
            raise CheckpointError(
                f"{self.path} holds weights only (it was consolidated with --weights-only or "
                f"imported from Hugging Face), so a run cannot resume from it: consolidate the "
                f"checkpoint again without --weights-only"
            )
        return self.training

    def load_model_into(self, model: torch.nn.Module) -> None:
        """Fill `model` (all experts, or the slice its expert modules hold) from the file, checking shapes."""
        held = expert_rows(model)
        state = {}
        for name, current in model.state_dict().items():
            key = "model.embed_tokens.weight" if name == "lm_head.weight" and model.config.tie_word_embeddings else name
            rows = (held[name].first, held[name].count) if name in held else None
            value = self.tensor(key, rows)
            if value.shape != current.shape:
                raise CheckpointError(
                    f"'{name}' in {self.path} has shape {list(value.shape)} but the model needs "
                    f"{list(current.shape)}: the file is from another architecture"
                )
            if current.is_floating_point() and not value.is_floating_point():
                raise CheckpointError(
                    f"'{name}' in {self.path} holds {value.dtype} values where the model needs "
                    f"floats ({current.dtype}): these are not a model's weights; re-export them"
                )
            state[name] = value
        model.load_state_dict(state)

    def load_training_state(self, state: TrainingState, rank: int) -> None:
        """Fill a TrainingState (of any expert slice) with the model, optimizer, counters and rank's RNG."""
        training = self.require_training()
        self.load_model_into(state.model)
        held = expert_rows(state.model)
        optimizer_state: dict[int, dict] = {}
        for index, name in enumerate(state.optimizer_names()):
            layout = training["optimizer_state"].get(name)
            if layout is None:
                continue
            optimizer_state[index] = {}
            for key, kind in layout.items():
                if kind != "tensor":
                    optimizer_state[index][key] = kind
                    continue
                flat_key = f"{OPTIMIZER_PREFIX}{name}.{key}"
                rows = (held[name].first, held[name].count) if name in held else None
                if rows is not None and len(self._file.get_slice(flat_key).get_shape()) == 0:
                    rows = None  # a scalar (AdamW's step) is the same for every expert
                optimizer_state[index][key] = self.tensor(flat_key, rows)
        current_groups = state.optimizer.state_dict()["param_groups"]
        rng_key = f"{RNG_PREFIX}cpu.rank_{rank}"
        rng = self.tensor(rng_key if rng_key in self.keys else f"{RNG_PREFIX}cpu.rank_0")
        state.load_state_dict(
            {
                "step": training["step"],
                "tokens_seen": training["tokens_seen"],
                "model": state.model.state_dict(),
                "optimizer": {
                    "state": optimizer_state,
                    "param_groups": restore_param_groups(current_groups, training["optimizer_param_groups"]),
                },
                "train_reader": training["train_reader"],
                "rng": {"cpu": rng, "cuda": None},
            }
        )


def load_consolidated_model(path: str | Path):
    """(model with every expert, config) from a consolidated file, for generation or export."""
    source = ConsolidatedFile(path)
    model = MoECausalLM(source.config.model)
    source.load_model_into(model)
    return model, source.config
