"""Sharded checkpoints over torch.distributed.checkpoint: every rank writes its own experts and optimizer
slices, experts are addressed by global index so any expert-parallel layout loads any checkpoint, a step
becomes visible only once every rank has written it, and loading checks every record's crc32 as it reads
it and never runs pickled code.

    storage.py   the on-disk layout, checksums, manifest, and DCP readers that refuse pickled objects
    checksummed.py  DCP's file writer and reader with a crc32 per record, summed as the bytes pass
    balance.py   which rank writes each replicated tensor, so that all ranks write about as much
    layout.py    Trainer.state_dict() <-> flat tensors keyed by global expert index (+ JSON extras)
    manager.py   CheckpointManager: save with atomic commit, keep-last-N, async save, resume from latest
    retention.py which steps keep-last may delete (only this run's older ones), and no nan state saved

    checkpoints = CheckpointManager(out_dir / "checkpoints", config, ctx)
    checkpoints.load_latest(trainer)     # False when there is nothing to resume
    checkpoints.save(trainer)            # step_<N>/ appears, and `latest` moves, once all ranks are done
    checkpoints.wait()                   # an async save has committed

Building a model from a checkpoint is mymoe.load's (this package stores and reads tensors only).
"""

from __future__ import annotations

from mymoe.checkpoint.layout import expert_checksums
from mymoe.checkpoint.manager import (
    CheckpointManager,
    architecture_differences,
    committed_steps,
    find_checkpoint,
    resolve_checkpoint,
)
from mymoe.checkpoint.storage import CheckpointError, read_manifest

__all__ = [
    "CheckpointError",
    "CheckpointManager",
    "architecture_differences",
    "committed_steps",
    "expert_checksums",
    "find_checkpoint",
    "read_manifest",
    "resolve_checkpoint",
]
