"""The training job on several CPU processes (gloo): EP=2 through the single-node torchrun launcher
(loss, TensorBoard, heatmap), DP=2 x EP=2 on 4 processes, and DeepSpeed ZeRO-1/2 against the native path."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

from dist_utils import run_distributed
from mymoe.model.moe.experts import is_expert
from conftest import REPO, TINY_CONFIG, make_dataset, python, tiny_overrides

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def ep2_run(dataset, tmp_path_factory):
    """configs/tiny.yaml, shortened to 40 steps, on 2 processes with EP=2, through launch/torchrun_single.sh."""
    out_dir = tmp_path_factory.mktemp("ep2")
    command = [
        "bash",
        str(REPO / "launch" / "torchrun_single.sh"),
        "--config",
        str(TINY_CONFIG),
        *tiny_overrides(
            *dataset, out_dir, steps=40, extra={"parallel.expert_parallel_size": 2, "train.eval_interval": 20}
        ),
        "--no-progress",
    ]
    completed = subprocess.run(
        command,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "NPROC": "2", "PYTHON": python()},
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    return out_dir, completed.stdout


def records(out_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def test_ep2_trains_tiny_and_the_loss_falls_well_below_its_start(ep2_run):
    out_dir, stdout = ep2_run
    assert "[launch]" in stdout and "world 2 = EP 2 x EDP 1" in stdout
    losses = [r["loss"] for r in records(out_dir) if "loss" in r]
    assert len(losses) == 40
    start, end = losses[0], sum(losses[-5:]) / 5
    assert start > 6.0  # about ln(1024) at initialisation
    assert end < 0.6 * start, (start, end)
    evals = [r["eval/loss"] for r in records(out_dir) if "eval/loss" in r]
    assert len(evals) == 2 and evals[1] < evals[0] < start
    assert (out_dir / "checkpoints").is_dir()


def test_the_rows_each_rank_computed_are_logged_per_layer(ep2_run):
    out_dir, _ = ep2_run
    logged = [r for r in records(out_dir) if "expert_rows" in r]
    assert len(logged) == 40
    for record in logged:
        for loads, rows in zip(record["expert_load"], record["expert_rows"]):
            assert len(rows) == 2 and min(rows) > 0
            assert sum(rows) == sum(loads)  # dropless: each kept assignment computed once, by its expert's rank
            # EP=2 over 4 experts: rank r computes experts 2r and 2r + 1, whoever sent the tokens
            assert rows == [loads[0] + loads[1], loads[2] + loads[3]]


def test_tensorboard_holds_the_promised_scalars_and_expert_histograms(ep2_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out_dir, _ = ep2_run
    events = EventAccumulator(str(out_dir / "tensorboard"), size_guidance={"scalars": 0, "histograms": 0})
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    promised = {
        "loss",
        "lm_loss",
        "lr",
        "grad_norm",
        "tokens_per_second",
        "mfu",
        "aux_loss",
        "z_loss",
        "dropped_fraction",
        "dropped_fraction/layer_0",
        "dropped_fraction/layer_1",
        "busiest_rank_rows_over_mean/layer_0",
        "eval/loss",
        "eval/perplexity",
    }
    assert promised <= scalars, promised - scalars
    assert len(events.Scalars("loss")) == 40
    assert all(event.value > 0 for event in events.Scalars("tokens_per_second"))
    assert all(0 < event.value < 10 for event in events.Scalars("mfu"))
    histograms = set(events.Tags()["histograms"])
    assert {"expert_load/layer_0", "expert_load/layer_1"} <= histograms
    buckets = list(events.Histograms("expert_load/layer_0")[0].histogram_value.bucket)
    # 4 experts; 2 ranks x 4 sequences x 64 tokens x top-2 assignments, none dropped (dropless)
    assert len(buckets) == 4 and sum(buckets) == 2 * 4 * 64 * 2


def test_heatmap_command_writes_a_png(ep2_run, tmp_path):
    out_dir, _ = ep2_run
    output = tmp_path / "expert_load.png"
    completed = subprocess.run(
        [python(), "-m", "mymoe.train.heatmap", str(out_dir / "metrics.jsonl"), "-o", str(output)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert completed.returncode == 0, completed.stderr
    assert f"wrote {output}" in completed.stdout
    assert output.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and output.stat().st_size > 5000


def _dp2_ep2(rank, world_size, train_prefix, valid_prefix, out_dir):
    import torch.distributed as dist

    from mymoe.config import load_config
    from mymoe.parallel import init_distributed
    from mymoe.train.loop import Trainer

    config = load_config(
        str(TINY_CONFIG),
        tiny_overrides(
            train_prefix,
            valid_prefix,
            Path(out_dir),
            steps=3,
            extra={"parallel.expert_parallel_size": 2, "train.micro_batch_size": 2},
        ),
    )
    ctx = init_distributed(config)
    trainer = Trainer(config, ctx)
    losses = [trainer.train_step()["loss"] for _ in range(3)]
    # replicas must still agree after training: dense weights on all 4 ranks, experts across each edp group
    dense = torch.cat([p.detach().flatten() for p in trainer.model.parameters() if not is_expert(p)])
    experts = torch.cat([p.detach().flatten() for p in trainer.model.parameters() if is_expert(p)])
    gathered_dense = [torch.empty_like(dense) for _ in range(world_size)]
    gathered_experts = [torch.empty_like(experts) for _ in range(world_size)]
    dist.all_gather(gathered_dense, dense)
    dist.all_gather(gathered_experts, experts)
    return {
        "losses": losses,
        "layout": (ctx.expert_parallel_rank, ctx.expert_data_parallel_rank),
        "dense_equal": all(torch.equal(gathered_dense[0], other) for other in gathered_dense),
        "experts": [tensor.clone() for tensor in gathered_experts],
    }


def test_dp2_x_ep2_on_four_processes(dataset, tmp_path):
    results = run_distributed(
        _dp2_ep2, world_size=4, args=(*dataset, str(tmp_path)), init_process_group=False, timeout=120
    )
    values = [result.value for result in results]
    assert [v["layout"] for v in values] == [(0, 0), (1, 0), (0, 1), (1, 1)]
    assert all(v["losses"] == values[0]["losses"] for v in values)  # the world mean, equal on every rank
    assert values[0]["losses"][-1] < values[0]["losses"][0]
    assert all(v["dense_equal"] for v in values)
    experts = values[0]["experts"]
    torch.testing.assert_close(experts[0], experts[2], rtol=0, atol=0)  # edp group [0, 2]
    torch.testing.assert_close(experts[1], experts[3], rtol=0, atol=0)  # edp group [1, 3]
    assert not torch.equal(experts[0], experts[1])  # different experts on the two ep ranks


def _native_and_deepspeed(rank, world_size, train_prefix, valid_prefix, out_dir):
    from mymoe.config import load_config
    from mymoe.parallel import init_distributed
    from mymoe.train.loop import Trainer

    # accumulation and active clipping, so DeepSpeed's accumulation, reduction and clipping are all compared
    config = load_config(
        str(TINY_CONFIG),
        tiny_overrides(
            train_prefix,
            valid_prefix,
            Path(out_dir),
            steps=4,
            extra={
                "parallel.expert_parallel_size": 2,
                "train.micro_batch_size": 2,
                "train.gradient_accumulation_steps": 2,
                "train.grad_clip": 0.5,
                "train.precision": "fp32",
            },
        ),
    )
    ctx = init_distributed(config)
    histories = {}
    for name, ds_config in (
        ("native", None),
        ("zero1", REPO / "configs" / "ds_zero1.json"),
        ("zero2", REPO / "configs" / "ds_zero2.json"),
    ):
        trainer = Trainer(config, ctx, None if ds_config is None else str(ds_config))
        metrics = [trainer.train_step() for _ in range(4)]
        stepping = trainer.optimizer if trainer.engine is None else trainer.engine.optimizer
        histories[name] = {
            "loss": [m["loss"] for m in metrics],
            "grad_norm": [m["grad_norm"] for m in metrics],
            "groups": [(g.get("name"), bool(g.get("moe", False))) for g in stepping.param_groups],
        }
    return histories


def test_deepspeed_zero1_and_zero2_match_the_native_path(dataset, tmp_path):
    # the first DeepSpeed start on a machine compiles its CPU shared-memory op (~1 min), hence the deadline
    results = run_distributed(
        _native_and_deepspeed, world_size=2, args=(*dataset, str(tmp_path)), init_process_group=False, timeout=240
    )
    histories = results[0].value
    native = histories["native"]
    assert native["loss"][-1] < native["loss"][0]
    assert all(norm > 0.5 for norm in native["grad_norm"])  # clipping was active
    for stage in ("zero1", "zero2"):
        assert histories[stage]["loss"] == pytest.approx(native["loss"], abs=1e-5), stage
        assert histories[stage]["grad_norm"] == pytest.approx(native["grad_norm"], rel=1e-5), stage
        # DeepSpeed's MoE convention: the expert parameters in their own group named after the ep size
        moe_groups = {name for name, moe in histories[stage]["groups"] if moe}
        assert moe_groups == {"ep_size_2"}, histories[stage]["groups"]


def _checkpoints_across_paths(rank, world_size, train_prefix, valid_prefix, out_dir):
    from mymoe.checkpoint import CheckpointManager
    from mymoe.config import load_config
    from mymoe.parallel import init_distributed
    from mymoe.train.loop import Trainer

    config = load_config(
        str(TINY_CONFIG),
        tiny_overrides(
            train_prefix,
            valid_prefix,
            Path(out_dir),
            steps=4,
            extra={"parallel.expert_parallel_size": 2, "train.micro_batch_size": 2, "train.precision": "fp32"},
        ),
    )
    ctx = init_distributed(config)
    zero1, zero2 = (str(REPO / "configs" / f"ds_zero{stage}.json") for stage in (1, 2))

    def losses(trainer, steps):
        return [trainer.train_step()["loss"] for _ in range(steps)]

    straight = losses(Trainer(config, ctx), 4)  # the native path, uninterrupted
    saved_by = {}
    for name, ds_config in (("native", None), ("zero2", zero2)):
        trainer = Trainer(config, ctx, ds_config)
        saved_by[name] = losses(trainer, 2)
        CheckpointManager(Path(out_dir) / name, config, ctx, verbose=False).save(trainer)
    resumed = {}
    for saved, path in (("zero2", None), ("native", zero1), ("zero2", zero2)):
        trainer = Trainer(config, ctx, path)
        assert CheckpointManager(Path(out_dir) / saved, config, ctx, verbose=False).load_latest(trainer)
        assert trainer.step == 2
        resumed[f"{saved} -> {'native' if path is None else Path(path).stem}"] = losses(trainer, 2)
    return {"straight": straight, "saved_by": saved_by, "resumed": resumed}


def test_deepspeed_checkpoints_resume_on_either_path(dataset, tmp_path):
    results = run_distributed(
        _checkpoints_across_paths, world_size=2, args=(*dataset, str(tmp_path)), init_process_group=False, timeout=240
    )
    value = results[0].value
    straight = value["straight"]
    assert value["saved_by"]["zero2"] == pytest.approx(straight[:2], abs=1e-5)
    assert set(value["resumed"]) == {"zero2 -> native", "native -> ds_zero1", "zero2 -> ds_zero2"}
    for route, losses in value["resumed"].items():
        assert losses == pytest.approx(straight[2:], abs=1e-5), route
