"""`torchrun -m mymoe.verify` passes on a correct layout and fails on a broken one, and bad FSDP input
stops every rank with one clear error."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from dist_utils import run_distributed
from conftest import REPO, TINY_CONFIG, make_dataset, tiny_overrides

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("data"))


def run_verify(dataset, out_dir, broken: bool) -> subprocess.CompletedProcess:
    overrides = tiny_overrides(
        *dataset,
        out_dir,
        steps=3,
        extra={
            "parallel.fsdp": True,
            "parallel.expert_parallel_size": 2,
            "train.micro_batch_size": 2,
            "data.seq_len": 32,
            "train.gradient_accumulation_steps": 2,
            "model.vocab_size": 256,
            "train.eval_interval": 0,
        },
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    if broken:
        env["MYMOE_VERIFY_BREAK"] = "1"
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "mymoe.verify",
        "--config",
        str(TINY_CONFIG),
        "--tolerance",
        "1e-5",
        *overrides,
    ]
    return subprocess.run(command, capture_output=True, text=True, timeout=150, cwd=REPO, env=env)


def test_verify_passes_on_fsdp_with_expert_parallelism(dataset, tmp_path):
    done = run_verify(dataset, tmp_path, broken=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "world 2 = EP 2 x EDP 1, FSDP, gradient accumulation 2" in done.stdout
    assert "largest differences: loss" in done.stdout and "OK: every difference is within 1e-05" in done.stdout


def test_verify_fails_when_a_gradient_reduction_is_skipped(dataset, tmp_path):
    done = run_verify(dataset, tmp_path, broken=True)
    assert done.returncode != 0, done.stdout[-3000:]
    assert "FAILED:" in done.stdout and "does not train like one process" in done.stdout


def _bad_input_worker(rank, world_size, train_prefix, valid_prefix, out_dir):
    import torch.distributed as dist

    from mymoe.config import ConfigError, load_config
    from mymoe.train.loop import run

    cases = {
        "deepspeed": ({"parallel.fsdp": True}, str(REPO / "configs" / "ds_zero1.json")),
        "mesh": ({"parallel.fsdp": True, "parallel.expert_parallel_size": 3, "model.moe.n_routed_experts": 6}, None),
        "experts": (
            {
                "parallel.fsdp": True,
                "parallel.expert_parallel_size": 2,
                "model.moe.n_routed_experts": 3,
                "model.moe.num_experts_per_tok": 1,
            },
            None,
        ),
    }
    outcome = {}
    for name, (extra, deepspeed) in cases.items():
        try:
            config = load_config(str(TINY_CONFIG), tiny_overrides(train_prefix, valid_prefix, out_dir, extra=extra))
            run(config, deepspeed_config=deepspeed, progress=False)
            outcome[name] = "trained"
        except ConfigError as error:
            outcome[name] = str(error)
        assert not dist.is_initialized()  # no process group left behind for the next case
    return outcome


def test_bad_fsdp_input_stops_every_rank_with_one_clear_error(dataset, tmp_path):
    results = run_distributed(
        _bad_input_worker, 2, args=(*dataset, str(tmp_path)), init_process_group=False, timeout=90
    )
    for result in results:
        outcome = result.value
        assert "--deepspeed" in outcome["deepspeed"] and "parallel.fsdp=true" in outcome["deepspeed"], outcome
        assert "parallel.expert_parallel_size=3 must divide the world size 2" in outcome["mesh"], outcome
        assert "parallel.expert_parallel_size=2 must divide model.moe.n_routed_experts=3" in outcome["experts"], outcome


def _policies_worker(rank, world_size, train_prefix, valid_prefix, out_dir):
    import torch
    from torch.distributed.fsdp import CPUOffloadPolicy

    from mymoe.config import load_config
    from mymoe.parallel import init_distributed, shutdown
    from mymoe.train.loop import Trainer

    config = load_config(
        str(TINY_CONFIG),
        tiny_overrides(
            train_prefix,
            valid_prefix,
            out_dir,
            extra={
                "parallel.fsdp": True,
                "parallel.fsdp_param_dtype": "bf16",
                "parallel.fsdp_cpu_offload": True,
                "parallel.expert_parallel_size": 2,
                "train.micro_batch_size": 2,
                "data.seq_len": 32,
            },
        ),
    )
    ctx = init_distributed(config)
    try:
        trainer = Trainer(config, ctx)
        groups = [
            module._get_fsdp_state()._fsdp_param_group
            for module in trainer.model.modules()
            if hasattr(module, "_get_fsdp_state") and module._get_fsdp_state()._fsdp_param_group is not None
        ]
        metrics = [trainer.train_step() for _ in range(2)]
        param = next(trainer.model.parameters())
        return {
            "param_dtypes": {str(g.mp_policy.param_dtype) for g in groups},
            "reduce_dtypes": {str(g.mp_policy.reduce_dtype) for g in groups},
            "offloaded": all(isinstance(g.offload_policy, CPUOffloadPolicy) for g in groups),
            "units": len(groups),
            "losses": [m["loss"] for m in metrics],
            "master_dtype": str(param.dtype),
            "finite": all(torch.isfinite(torch.tensor(m["grad_norm"])) for m in metrics),
        }
    finally:
        shutdown()


def test_fsdp_mixed_precision_and_cpu_offload_reach_every_unit_and_train(dataset, tmp_path):
    """bf16 compute with fp32 master weights and reduction, and CPU offload, as config (on CPU here; the
    GPU is where they pay)."""
    results = run_distributed(_policies_worker, 2, args=(*dataset, str(tmp_path)), init_process_group=False, timeout=90)
    value = results[0].value
    assert value["param_dtypes"] == {"torch.bfloat16"} and value["reduce_dtypes"] == {"torch.float32"}, value
    assert value["offloaded"] and value["units"] == 2 * 2 + 1, value  # experts and block per layer, and the root
    assert value["master_dtype"] == "torch.float32" and value["finite"], value
    assert value["losses"][1] < value["losses"][0], value
