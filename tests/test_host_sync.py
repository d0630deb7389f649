"""A training step that never waits on the device: no device-to-host read outside the steps that report.

On CPU every tensor is on the host, so "a read" is a call of one of the tensor read paths (item,
__float__, __int__, __bool__, __index__, tolist, numpy) or a torch.distributed call that returns host
values, made from the project's own code; torch's optimizer reading its host-side step counter is not one.
Under CUDA, sync-debug mode raises on every synchronising call whoever makes it.

Dropless MoE reads nothing either: every assignment is kept, and grouped GEMM takes the experts' row
offsets on the device. The one read left is capacity mode's: how many assignments were kept sizes the
expert rows, which sort_by_expert (model/moe/dispatch.py) reads once per layer and micro-batch (and
GroupedExperts, model/moe/experts.py, reads the per-expert counts where its rows need more than one
chunk or grouped GEMM is unavailable). It is counted apart and held to exactly that.
"""

from __future__ import annotations

import sys
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from conftest import tiny_config
from mymoe.parallel import ParallelContext
from mymoe.train.loop import Trainer, train
from mymoe.train.metrics import StepMetrics

PROJECT = str(Path(__file__).resolve().parents[1] / "mymoe")
READS = ("item", "__float__", "__int__", "__bool__", "__index__", "tolist", "numpy")
HOST_VALUED = ("all_gather_object", "broadcast_object_list", "gather_object", "scatter_object_list")
# capacity mode's ragged expert GEMM token counts, one read per file per MoE layer and micro-batch
RAGGED_SIZES = ("model/moe/dispatch.py", "model/moe/experts.py")


@contextmanager
def counting_reads():
    """Counter of (read path, project file:line) for reads the project's code makes inside the block."""
    counts: Counter = Counter()

    def counted(name, original):
        def read(*args, **kwargs):
            caller = sys._getframe(1)
            if caller.f_code.co_filename.startswith(PROJECT):
                where = caller.f_code.co_filename[len(PROJECT) + 1 :]
                counts[(name, f"{where}:{caller.f_lineno}")] += 1
            return original(*args, **kwargs)

        return read

    patched = [(torch.Tensor, name, getattr(torch.Tensor, name)) for name in READS]
    patched += [(dist, name, getattr(dist, name)) for name in HOST_VALUED]
    for owner, name, original in patched:
        setattr(owner, name, counted(name, original))
    try:
        yield counts
    finally:
        for owner, name, original in patched:
            setattr(owner, name, original)


def split(counts: Counter) -> tuple[dict, int]:
    """(reads outside the ragged expert sizes, the number of ragged-size reads)."""
    ragged = sum(n for (_, where), n in counts.items() if where.startswith(RAGGED_SIZES))
    return {key: n for key, n in counts.items() if not key[1].startswith(RAGGED_SIZES)}, ragged


@pytest.mark.parametrize(
    "moe, ragged_sites",
    [
        ({}, 0),
        ({"n_shared_experts": 1, "shared_expert_gate": True}, 0),
        ({"capacity_factor": 1.0}, 1),
        ({"capacity_factor": 1.0, "overflow_policy": "null_expert"}, 1),
    ],
)
def test_a_training_step_reads_nothing_from_the_device(tmp_path, moe, ragged_sites):
    config = tiny_config(tmp_path, max_steps=10, moe=moe, train={"gradient_accumulation_steps": 2})
    trainer = Trainer(config, ParallelContext())
    trainer.train_step()  # the optimizer state is born in the first step
    with counting_reads() as counts:
        metrics = [trainer.train_step() for _ in range(2)]
    others, ragged = split(counts)
    assert others == {}, f"device-to-host reads in a step: {others}"
    layers = len(list(trainer.model.iter_moe_layers()))
    assert ragged == ragged_sites * layers * 2 * 2  # per site, per layer, per micro-batch, per step
    with counting_reads() as counts:
        StepMetrics.read_all(metrics)
    assert sum(counts.values()) == 1  # a report reads all its steps in one copy
    assert not metrics[0]["skipped"] and metrics[1]["loss"] > 0


def test_a_skipped_step_reads_nothing_and_changes_nothing(tmp_path):
    config = tiny_config(tmp_path, max_steps=10)
    trainer = Trainer(config, ParallelContext())
    trainer.train_step()
    weights = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    state = [{key: value.clone() for key, value in per_param.items()} for per_param in trainer.optimizer.state.values()]
    forward = trainer.forward

    def forward_to_nan_loss(*args, **kwargs):
        out = forward(*args, **kwargs)
        out.lm_loss = out.lm_loss * float("nan")
        return out

    trainer.forward = forward_to_nan_loss
    with counting_reads() as counts:
        metrics = trainer.train_step()
    assert split(counts)[0] == {}
    assert metrics["skipped"]
    assert all(torch.equal(p, weights[name]) for name, p in trainer.model.named_parameters())
    after = list(trainer.optimizer.state.values())
    assert all(
        torch.equal(per_param[key], value) for per_param, kept in zip(after, state) for key, value in kept.items()
    )


def test_reporting_once_per_interval_logs_what_reporting_every_step_does(tmp_path):
    every, sparse = [
        train(
            tiny_config(tmp_path / name, max_steps=8, train={"log_interval": interval}),
            ParallelContext(),
            progress=False,
        )
        for name, interval in (("every", 1), ("sparse", 4))
    ]
    assert every.losses == sparse.losses and len(sparse.losses) == 8


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA sync-debug mode needs a GPU")
def test_a_training_step_under_cuda_sync_debug_mode(tmp_path):
    """Every synchronising call warns under sync-debug mode "warn"; the project's, outside the ragged expert
    sizes, must be none (under "error" the first one raises, and the ragged sizes would be it)."""
    import warnings

    config = tiny_config(tmp_path, max_steps=10)
    ctx = ParallelContext(device=torch.device("cuda"))
    trainer = Trainer(config, ctx)
    trainer.train_step()
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            metrics = trainer.train_step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    synchronising = [
        f"{w.filename}:{w.lineno}"
        for w in caught
        if "synchroniz" in str(w.message)
        and w.filename.startswith(PROJECT)
        and not w.filename[len(PROJECT) + 1 :].startswith(RAGGED_SIZES)
    ]
    assert synchronising == []
    assert not metrics["skipped"]
