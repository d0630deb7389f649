"""Sharded checkpoints over torch.distributed.checkpoint: every rank writes its own experts and optimizer
slices, experts are addressed by global index so any expert-parallel layout loads any checkpoint, a step
becomes visible only once every rank has written it, and loading checks every file's crc32 and never
runs pickled code.

    storage.py   the on-disk layout, checksums, manifest, and DCP readers that refuse pickled objects
    layout.py    Trainer.state_dict() <-> flat tensors keyed by global expert index (+ JSON extras)
    manager.py   CheckpointManager: save with atomic commit, keep-last-N, async save, resume from latest
    retention.py which steps keep-last may delete (only this run's older ones), and no nan state saved

    checkpoints = CheckpointManager(out_dir / "checkpoints", config, ctx)
    checkpoints.load_latest(trainer)     # False when there is nothing to resume
    checkpoints.save(trainer)            # step_<N>/ appears, and `latest` moves, once all ranks are done
    checkpoints.wait()                   # an async save has committed

    model, config, manifest = load_model("runs/x/checkpoints")   # one process, all experts, any saved layout
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional


from mymoe.checkpoint.manager import (
    CheckpointManager, architecture_differences, committed_steps, read_tensors, resolve_checkpoint)
from mymoe.checkpoint.layout import expert_checksums
from mymoe.checkpoint.storage import CheckpointError, read_manifest, verify_files
from mymoe.config import Config, config_from_dict


def load_model(checkpoint: str | Path, step: Optional[int] = None, verify: bool = True):
    """Build the saved model whole in this process (every expert) and load its weights: (model, config, manifest).
    LoRA adapters of a fine-tuning run come back merged into the weights; prefix-tuning ones stay attached.

    `checkpoint` is a checkpoints root (its `latest`, or `step`) or a step folder.
    """
    from mymoe.model import MoECausalLM

    directory = resolve_checkpoint(checkpoint, step)
    if directory is None:
        raise CheckpointError(f"no committed checkpoint under {checkpoint}: train first, or pass the folder that "
                              f"holds the step_* directories")
    manifest = read_manifest(directory)
    if verify:
        problems = verify_files(directory, manifest["files"])
        if problems:
            raise CheckpointError(f"checkpoint {directory} is damaged:\n  " + "\n  ".join(problems))
    config: Config = config_from_dict(manifest["config"])
    model = MoECausalLM(config.model)
    peft = config.peft
    if peft.enabled:  # the adapters the run trained, attached as it attached them
        from mymoe.peft import apply_peft

        apply_peft(model, peft.lora_rank, peft.lora_alpha, peft.lora_targets, peft.prefix_length, config.train.seed)
    targets, _ = read_tensors(directory, manifest, {"model": model.state_dict()}, model, None, rank=0)
    model.load_state_dict(targets.model)
    if peft.lora_rank:
        from mymoe.peft import merge_lora

        merge_lora(model)  # one plain weight per matrix: what generation and export want
    return model, config, manifest


__all__ = ["CheckpointError", "CheckpointManager", "architecture_differences", "committed_steps",
           "expert_checksums", "load_model", "read_manifest", "resolve_checkpoint"]
