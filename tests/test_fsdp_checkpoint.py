"""FSDP checkpoints are the same checkpoints: resumed bit-exactly, loaded by any other layout (replicated
or FSDP, world 1/2/4, EP 1/2/4) with the optimizer state, and the reverse.

A checkpoint a layout loads and saves again at once must hold exactly the tensors it read: every
parameter, AdamW moment and step, per global expert. Comparing those re-saved checkpoints with the
original, whole tensor by whole tensor, checks both the load into the layout and its save.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from dist_utils import run_distributed
from conftest import tiny_config
from test_checkpoint import read_all_tensors

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore:torch.distributed is disabled")]

STEP_DIR = "step_{:08d}"


def layout_config(workdir, world_size, expert_parallel_size, fsdp, max_steps, out_dir=None, moe=None):
    config = tiny_config(workdir, world_size, expert_parallel_size, max_steps=max_steps, moe=moe)
    parallel = dataclasses.replace(config.parallel, fsdp=fsdp)
    train = dataclasses.replace(config.train, out_dir=str(out_dir or config.train.out_dir))
    return dataclasses.replace(config, parallel=parallel, train=train)


def jobs_worker(rank, world_size, workdir, jobs):
    """Run each job in turn on one process group: build the job's layout, load a checkpoint (its
    `load`, or the latest of its own run folder), train to `stop_at` saving at `save_at`, or save at
    once what it loaded (`resave`)."""
    from mymoe.checkpoint import CheckpointManager
    from mymoe.parallel import build_context, init_distributed, shutdown
    from mymoe.train.loop import Trainer

    ctx = init_distributed(layout_config(workdir, world_size, 1, False, 1))
    try:
        results = []
        for job in jobs:
            config = layout_config(
                workdir, world_size, job["ep"], job["fsdp"], job.get("stop_at", 1), job.get("out_dir"), job.get("moe")
            )
            job_ctx = build_context(job["ep"], device=ctx.device, timeout_seconds=60)
            trainer = Trainer(config, job_ctx)
            manager = CheckpointManager(Path(config.train.out_dir) / "checkpoints", config, job_ctx, verbose=False)
            if job.get("load"):
                manager.load(trainer, job["load"])
            else:
                manager.load_latest(trainer)
            losses = []
            if job.get("resave"):
                manager.save(trainer)
            while trainer.step < job.get("stop_at", 0):
                losses.append(trainer.train_step()["loss"])
                if trainer.step in job.get("save_at", ()):
                    manager.save(trainer)
            manager.wait()
            results.append(losses)
        return results
    finally:
        shutdown()


def run_jobs(workdir, world_size, jobs):
    return run_distributed(jobs_worker, world_size, args=(str(workdir), jobs), init_process_group=False, timeout=120)[
        0
    ].value


def assert_same_tensors(expected_dir: Path, actual_dir: Path, ranks: int) -> None:
    """Every tensor equal; RNG streams only for the ranks both runs had."""
    expected, actual = read_all_tensors(expected_dir), read_all_tensors(actual_dir)

    def comparable(keys):
        return {k for k in keys if not k.startswith("rng.") or int(k.rpartition("_")[2]) < ranks}

    assert comparable(expected) == comparable(actual), comparable(expected) ^ comparable(actual)
    for key in comparable(expected):
        assert torch.equal(expected[key], actual[key]), f"{actual_dir}: {key} differs from {expected_dir}"


def checkpoint_dir(workdir: Path, step: int, run: str = "run") -> Path:
    return workdir / run / "checkpoints" / STEP_DIR.format(step)


WORLD_4 = [(1, False), (4, True), (1, True)]  # (EP, FSDP) layouts that load the FSDP checkpoint
WORLD_2 = [(2, False), (2, True), (1, True)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One spawn of 4 ranks: FSDP with EP 2 trains 6 steps (saved at 3 and 6); a second run resumes from
    step 3 to 6; three other layouts load step 6 and save it again; FSDP at EP 1, 2 and 4 loads the
    replicated checkpoint one process saved at step 3 and saves it again."""
    workdir = tmp_path_factory.mktemp("fsdp")
    from mymoe.checkpoint import CheckpointManager
    from mymoe.parallel import ParallelContext
    from mymoe.train.loop import Trainer

    single = layout_config(workdir, 1, 1, False, 3, out_dir=workdir / "single")
    trainer = Trainer(single, ParallelContext())
    manager = CheckpointManager(workdir / "single" / "checkpoints", single, ParallelContext(), verbose=False)
    for _ in range(3):
        trainer.train_step()
    manager.save(trainer)
    reference = checkpoint_dir(workdir, 6)
    jobs = [
        {"ep": 2, "fsdp": True, "stop_at": 6, "save_at": (3, 6)},
        {
            "ep": 2,
            "fsdp": True,
            "load": str(checkpoint_dir(workdir, 3)),
            "stop_at": 6,
            "save_at": (6,),
            "out_dir": str(workdir / "resumed"),
        },
    ]
    jobs += [
        {
            "ep": ep,
            "fsdp": fsdp,
            "load": str(reference),
            "resave": True,
            "out_dir": str(workdir / f"w4_ep{ep}_fsdp{fsdp}"),
        }
        for ep, fsdp in WORLD_4
    ]
    jobs += [
        {
            "ep": ep,
            "fsdp": True,
            "load": str(checkpoint_dir(workdir, 3, "single")),
            "resave": True,
            "out_dir": str(workdir / f"back_ep{ep}"),
        }
        for ep in (1, 2, 4)
    ]
    # 6 experts: at EP 2 each rank's 3 are split inside each expert over its 2 expert-data-parallel peers,
    # and at EP 1 the 6 over 4 ranks likewise (DTensor entries per expert)
    six = {"n_routed_experts": 6}
    jobs += [
        {"ep": 2, "fsdp": True, "moe": six, "stop_at": 3, "save_at": (2, 3), "out_dir": str(workdir / "six")},
        {
            "ep": 2,
            "fsdp": True,
            "moe": six,
            "load": str(checkpoint_dir(workdir, 2, "six")),
            "stop_at": 3,
            "save_at": (3,),
            "out_dir": str(workdir / "six_resumed"),
        },
    ]
    jobs += [
        {
            "ep": 1,
            "fsdp": fsdp,
            "moe": six,
            "load": str(checkpoint_dir(workdir, 3, "six")),
            "resave": True,
            "out_dir": str(workdir / f"six_ep1_fsdp{fsdp}"),
        }
        for fsdp in (False, True)
    ]
    losses = run_jobs(workdir, 4, jobs)
    return workdir, losses


def test_fsdp_resume_is_bit_exact(runs):
    workdir, losses = runs
    assert losses[1] == losses[0][3:]
    assert_same_tensors(checkpoint_dir(workdir, 6), checkpoint_dir(workdir, 6, "resumed"), ranks=4)


def test_experts_split_inside_resume_bit_exactly_and_load_elsewhere(runs):
    workdir, losses = runs
    assert losses[-3] == losses[-4][2:]
    assert_same_tensors(checkpoint_dir(workdir, 3, "six"), checkpoint_dir(workdir, 3, "six_resumed"), 4)
    for fsdp in (False, True):
        assert_same_tensors(checkpoint_dir(workdir, 3, "six"), checkpoint_dir(workdir, 3, f"six_ep1_fsdp{fsdp}"), 4)


def test_fsdp_checkpoint_loads_in_other_layouts_at_world_4_and_the_reverse(runs):
    workdir, _ = runs
    for ep, fsdp in WORLD_4:
        assert_same_tensors(checkpoint_dir(workdir, 6), checkpoint_dir(workdir, 6, f"w4_ep{ep}_fsdp{fsdp}"), 4)
    for ep in (1, 2, 4):  # a replicated checkpoint of one process, loaded by FSDP over 4 ranks
        assert_same_tensors(checkpoint_dir(workdir, 3, "single"), checkpoint_dir(workdir, 3, f"back_ep{ep}"), 1)


def test_fsdp_checkpoint_loads_at_world_2_and_in_one_process(runs):
    workdir, _ = runs
    source = checkpoint_dir(workdir, 6)
    run_jobs(
        workdir,
        2,
        [
            {
                "ep": ep,
                "fsdp": fsdp,
                "load": str(source),
                "resave": True,
                "out_dir": str(workdir / f"w2_ep{ep}_fsdp{fsdp}"),
            }
            for ep, fsdp in WORLD_2
        ],
    )
    for ep, fsdp in WORLD_2:
        assert_same_tensors(source, checkpoint_dir(workdir, 6, f"w2_ep{ep}_fsdp{fsdp}"), 2)
    from mymoe.checkpoint import CheckpointManager
    from mymoe.parallel import ParallelContext
    from mymoe.train.loop import Trainer

    config = layout_config(workdir, 1, 1, False, 6, out_dir=workdir / "w1")
    trainer = Trainer(config, ParallelContext())
    manager = CheckpointManager(workdir / "w1" / "checkpoints", config, ParallelContext(), verbose=False)
    manager.load(trainer, source)
    manager.save(trainer)
    assert_same_tensors(source, checkpoint_dir(workdir, 6, "w1"), 1)
    # consolidate (and through it export-hf and generate, which read the same way) treat it like any other
    from safetensors.torch import load_file

    from mymoe.load import load_model
    from mymoe.convert.consolidate import consolidate

    consolidate(source, workdir / "fsdp.safetensors")
    consolidate(checkpoint_dir(workdir, 6, "w1"), workdir / "single.safetensors")
    fsdp_file, single_file = load_file(workdir / "fsdp.safetensors"), load_file(workdir / "single.safetensors")
    weights = {key for key in fsdp_file if not key.startswith("rng.")}
    assert weights == {key for key in single_file if not key.startswith("rng.")}
    assert all(torch.equal(fsdp_file[key], single_file[key]) for key in weights)
    model, _, _ = load_model(source)
    assert torch.equal(model.state_dict()["model.embed_tokens.weight"], fsdp_file["model.embed_tokens.weight"])


def test_fsdp_ranks_each_write_a_shard_of_every_dense_tensor(runs):
    from mymoe.checkpoint.storage import read_dcp_metadata

    workdir, _ = runs
    chunks = {
        key: len(entry.chunks)
        for key, entry in read_dcp_metadata(checkpoint_dir(workdir, 6)).state_dict_metadata.items()
        if hasattr(entry, "chunks")
    }
    assert chunks["model.model.embed_tokens.weight"] == 4 and chunks["optim.model.embed_tokens.weight.exp_avg"] == 4
    replicated = read_dcp_metadata(checkpoint_dir(workdir, 6, "w4_ep1_fsdpFalse")).state_dict_metadata
    assert len(replicated["model.model.embed_tokens.weight"].chunks) == 1
    split = read_dcp_metadata(checkpoint_dir(workdir, 3, "six")).state_dict_metadata
    assert len(split["model.model.layers.0.mlp.experts.w_gate.expert_0"].chunks) == 2  # each edp peer's slice
