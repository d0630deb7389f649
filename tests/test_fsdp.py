"""FSDP2 under expert parallelism (mymoe/parallel/fsdp.py) trains like one process on the global batch.

Four ranks, configs/tiny.yaml made smaller, FSDP with EP 1, 2 and 4 in one spawn (each layout gets its
groups over the same process group), gradient accumulation 2, activation checkpointing, and a clipping
threshold low enough that every step clips. mymoe.verify's comparison does the work: every rank replays
the gathered batches in one process holding the whole model, with torch's own clipping and AdamW.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from dist_utils import run_distributed
from test_train_support import TINY_CONFIG, make_dataset, tiny_overrides

pytestmark = pytest.mark.slow

TOLERANCE = 1e-5
MAX_NORM = 0.05


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("data"))


def fsdp_overrides(train_prefix, valid_prefix, out_dir, extra=None) -> list[str]:
    values = {"parallel.fsdp": True, "train.micro_batch_size": 2, "data.seq_len": 32, "train.grad_clip": MAX_NORM,
              "train.gradient_accumulation_steps": 2, "model.gradient_checkpointing": True,
              "model.num_hidden_layers": 2, "model.first_k_dense_replace": 0, "model.vocab_size": 256,
              "train.eval_interval": 0}
    values.update(extra or {})
    return tiny_overrides(train_prefix, valid_prefix, Path(out_dir), steps=3, extra=values)


def _layouts_worker(rank, world_size, train_prefix, valid_prefix, out_dir, expert_parallel_sizes, extra):
    from mymoe.config import load_config
    from mymoe.parallel import build_context, init_distributed, shutdown
    from mymoe.verify import verify

    config = load_config(str(TINY_CONFIG), fsdp_overrides(train_prefix, valid_prefix, out_dir, extra))
    ctx = init_distributed(config)
    try:
        results = {}
        for expert_parallel_size in expert_parallel_sizes:
            layout = dataclasses.replace(config, parallel=dataclasses.replace(
                config.parallel, expert_parallel_size=expert_parallel_size))
            layout_ctx = build_context(expert_parallel_size, device=ctx.device, timeout_seconds=60)
            results[expert_parallel_size] = verify(layout, layout_ctx, steps=3)
        return results
    finally:
        shutdown()


def check(results: dict) -> None:
    for expert_parallel_size, result in results.items():
        where = f"FSDP, world 4, EP {expert_parallel_size}"
        assert result["fully_sharded"], where
        assert result["loss"] <= TOLERANCE, (where, result)
        assert result["grad_norm"] <= TOLERANCE, (where, result)
        assert result["parameters"] <= TOLERANCE, (where, result)
        assert all(h["reference_grad_norm"] > MAX_NORM for h in result["history"]), "every step should clip"
        assert result["history"][-1]["loss"] < result["history"][0]["loss"]


def test_fsdp_with_ep_1_2_4_accumulation_and_checkpointing_equals_one_process(dataset, tmp_path):
    results = run_distributed(_layouts_worker, world_size=4, init_process_group=False, timeout=120,
                              args=(*dataset, str(tmp_path), [1, 2, 4], {}))
    check(results[0].value)
