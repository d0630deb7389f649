"""An ensemble on disk: a folder with a small manifest and the weights that belong to the ensemble alone.

    ens/manifest.json         {"format": "mymoe-ensemble", "members": [their paths], "ensemble": settings, ...}
    ens/gate.safetensors      the gate (its own copy of the averaged embedding included)
    ens/adapters.safetensors  the members' LoRA / prefix adapters ("members.<i>.<name>"), when configured

Members are not copied: the manifest names each one's checkpoint (any source mymoe.load reads), resolved to
an absolute path, and they are loaded through mymoe.load. safetensors holds tensors only, so loading runs no
code. Every file is written under a temporary name and renamed (mymoe.convert.atomic): a crash leaves the
previous file, and `build` publishes the whole folder at once.
"""

from __future__ import annotations

import dataclasses
import json
import zlib
from pathlib import Path
from typing import Callable, Optional

import torch
from safetensors.torch import load_file, save_file

from mymoe.checkpoint import CheckpointError
from mymoe.config import Config, EnsembleConfig, ensemble_config_from_dict, validate_ensemble
from mymoe.convert.atomic import atomic_output, refuse_existing
from mymoe.ensemble.gate import SampleGate, average_embedding, gate_model_config
from mymoe.ensemble.model import GatedEnsemble
from mymoe.load import load_model
from mymoe.model import MoECausalLM
from mymoe.peft import apply_peft, lora_state_dict, load_lora_state_dict

FORMAT = "mymoe-ensemble"
MANIFEST, GATE, ADAPTERS = "manifest.json", "gate.safetensors", "adapters.safetensors"


def build_ensemble(
    members: list[str],
    out: str | Path,
    settings: EnsembleConfig,
    tokenizer: Optional[str] = None,
    overwrite: bool = False,
    seed: int = 0,
    announce: Callable[[str], None] = print,
) -> dict:
    """Load the members, check they can be mixed, give the gate their averaged embedding, attach adapters,
    and write the folder; returns its manifest."""
    out = Path(out)
    if len(members) < 2:
        raise CheckpointError(f"--members names {len(members)} model(s): an ensemble needs two or more")
    refuse_existing(out, overwrite)
    validate_ensemble(settings)
    announce(f"building an ensemble of {len(members)} members into {out}")
    models, configs = load_members(members)
    first = configs[0].model
    validate_ensemble(settings, first.hidden_size, first.attention_type)
    tokenizer = tokenizer or next((c.data.tokenizer for c in configs if c.data.tokenizer), None)
    manifest = {
        "format": FORMAT,
        "members": [str(Path(path).resolve()) for path in members],
        "vocab_size": first.vocab_size,
        "seq_len": min(c.data.seq_len for c in configs),  # the default sample length of train-gate and evaluate
        "tokenizer": str(Path(tokenizer).resolve()) if tokenizer else None,
        "ensemble": dataclasses.asdict(settings),
        "gate_steps": 0,
    }
    torch.manual_seed(seed)  # the gate's blocks start from the same weights on every build of these settings
    ensemble = assemble(models, configs, settings)
    with torch.no_grad():
        ensemble.gate.body.embed_tokens.weight.copy_(
            average_embedding([model.model.embed_tokens.weight for model in models])
        )
    with atomic_output(out, overwrite) as staging:
        staging.mkdir()
        save_weights(ensemble, manifest, staging)
    gate_parameters = sum(p.numel() for p in ensemble.gate.parameters())
    announce(f"wrote {out}: {len(models)} members, a gate of {gate_parameters / 1e6:.2f}M parameters")
    return manifest


def load_ensemble(folder: str | Path) -> tuple[GatedEnsemble, dict]:
    """(the ensemble with its trained gate and adapters, the manifest) from a folder build_ensemble wrote."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    settings = ensemble_config_from_dict(manifest["ensemble"])
    models, configs = load_members(manifest["members"])
    ensemble = assemble(models, configs, settings)
    ensemble.gate.load_state_dict(load_file(folder / GATE))
    if settings.peft.enabled:
        adapters = load_file(folder / ADAPTERS)
        for index, model in enumerate(models):
            prefix = f"members.{index}."
            load_lora_state_dict(model, {k[len(prefix) :]: v for k, v in adapters.items() if k.startswith(prefix)})
    return ensemble, manifest


def save_weights(ensemble: GatedEnsemble, manifest: dict, folder: Path) -> None:
    """The gate, the adapters and then the manifest, each replaced atomically (the manifest last, so it never
    names weights that are not yet there)."""
    with atomic_output(folder / GATE, overwrite=True) as path:
        save_file({k: v.contiguous() for k, v in ensemble.gate.state_dict().items()}, str(path))
    if manifest["ensemble"]["peft"]["lora_rank"] or manifest["ensemble"]["peft"]["prefix_length"]:
        adapters = {
            f"members.{index}.{name}": tensor.contiguous()
            for index, member in enumerate(ensemble.members)
            for name, tensor in lora_state_dict(member).items()
        }
        with atomic_output(folder / ADAPTERS, overwrite=True) as path:
            save_file(adapters, str(path))
    with atomic_output(folder / MANIFEST, overwrite=True) as path:
        path.write_text(json.dumps(manifest, indent=2) + "\n")


def read_manifest(folder: Path) -> dict:
    path = folder / MANIFEST
    if not path.is_file():
        raise CheckpointError(
            f"{folder} is not an ensemble folder ({MANIFEST} is missing): make one with "
            f"`python -m mymoe.ensemble build --members A B --out {folder}`"
        )
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not an ensemble manifest (format {manifest.get('format')!r}, not {FORMAT})")
    return manifest


def load_members(paths: list[str]) -> tuple[list[MoECausalLM], list[Config]]:
    """Every member through mymoe.load, frozen; refused unless their next-token distributions can be mixed."""
    models, configs = [], []
    for path in paths:
        model, config, _ = load_model(path)
        models.append(model.requires_grad_(False).eval())
        configs.append(config)
    check_members(paths, configs)
    return models, configs


def check_members(paths: list[str], configs: list[Config]) -> None:
    """Mixing probabilities id by id needs one vocabulary, and averaging embeddings one width."""
    first_path, first = paths[0], configs[0].model
    for path, config in zip(paths[1:], configs[1:]):
        for name in ("vocab_size", "hidden_size"):
            mine, theirs = getattr(config.model, name), getattr(first, name)
            if mine != theirs:
                why = (
                    "the ensemble mixes next-token probabilities id by id"
                    if name == "vocab_size"
                    else "the gate's embedding is the average of the members' embeddings"
                )
                raise CheckpointError(
                    f"members differ in {name}: {first_path} has {theirs}, {path} has {mine}; {why}, so every "
                    f"member needs the same {name}"
                )
    known = [(path, c.data.tokenizer, fingerprint(c.data.tokenizer)) for path, c in zip(paths, configs)]
    known = [entry for entry in known if entry[2] is not None]
    for path, tokenizer, crc in known[1:]:
        if crc != known[0][2]:
            raise CheckpointError(
                f"members were trained with different tokenizers: {known[0][0]} with {known[0][1]}, {path} with "
                f"{tokenizer}; the same id must mean the same text in every member: train them on data made with "
                f"one tokenizer"
            )


def fingerprint(tokenizer: Optional[str]) -> Optional[int]:
    """crc32 of a tokenizer's file (a folder's tokenizer.json or tokenizer.model); None when it cannot be read."""
    if not tokenizer:
        return None
    path = Path(tokenizer)
    if path.is_dir():
        path = next((path / name for name in ("tokenizer.json", "tokenizer.model") if (path / name).is_file()), path)
    return zlib.crc32(path.read_bytes()) if path.is_file() else None


def assemble(models: list[MoECausalLM], configs: list[Config], settings: EnsembleConfig) -> GatedEnsemble:
    """The members (with adapters when configured: only those train) and a fresh gate sized for them."""
    first = configs[0].model
    gate_config = gate_model_config(
        first.vocab_size,
        first.hidden_size,
        settings.gate_layers,
        settings.gate_heads,
        max(c.model.max_position_embeddings for c in configs),
    )
    if settings.peft.enabled:
        for index, model in enumerate(models):
            apply_peft(
                model,
                settings.peft.lora_rank,
                settings.peft.lora_alpha,
                settings.peft.lora_targets,
                settings.peft.prefix_length,
                seed=index,
            )
    return GatedEnsemble(models, SampleGate(gate_config, len(models)), settings.threshold)
