"""Expert replication (mymoe/parallel/replication.py): the plan evens the ranks' rows, the dispatcher splits
an expert's tokens by the planned shares, and training with copies equals training without them."""

import pytest
import torch

from conftest import tiny_config
from dist_utils import run_distributed
from mymoe.config import ConfigError, validate
from mymoe.parallel import init_distributed, shutdown
from mymoe.parallel.replication import choose_copies, copy_tables, plan_replicas, unreplicated_rows
from mymoe.train.loop import Trainer, check_engine


def busiest_over_mean(rows):
    return max(rows) / (sum(rows) / len(rows))


def test_one_hot_expert_is_split_until_the_ranks_are_even():
    loads = [40.0, 20.0, 20.0, 20.0]  # one expert takes 40% of the tokens
    plan = plan_replicas(loads, ep_size=2, experts_per_rank=2, slots=1)
    assert unreplicated_rows(loads, 2, 1) == [60.0, 40.0]
    assert plan.extra == [[], [(0, 0.25)]]  # a copy of expert 0 on rank 1 takes a quarter of its tokens
    assert plan.predicted_rows(loads) == [50.0, 50.0]
    assert plan.copies(0) == [(0, 0.75), (5, 0.25)]  # virtual ids: rank r holds r * 3 .. r * 3 + 2


@pytest.mark.parametrize("ep_size, experts", [(2, 4), (4, 8), (4, 4), (8, 64)])
def test_plans_bring_the_busiest_rank_within_1_15_of_the_mean(ep_size, experts):
    generator = torch.Generator().manual_seed(ep_size * experts)
    loads = (torch.rand(experts, generator=generator) * 10 + 1).tolist()
    loads[1] = 0.4 * sum(loads) / 0.6  # expert 1 takes 40% of all tokens
    per_rank = experts // ep_size
    before = busiest_over_mean(unreplicated_rows(loads, ep_size, 1))
    plan = plan_replicas(loads, ep_size, per_rank, slots=2)
    after = busiest_over_mean(plan.predicted_rows(loads))
    assert after <= 1.15 < before, (before, after)
    for expert in range(experts):
        copies = plan.copies(expert)
        assert sum(share for _, share in copies) == pytest.approx(1.0)
        assert all(share >= 0 for _, share in copies)
        width = per_rank + 2
        ranks = [virtual // width for virtual, _ in copies]
        assert len(set(ranks)) == len(ranks)  # never two copies of one expert on one rank


def test_the_dispatcher_splits_an_experts_tokens_by_the_planned_shares():
    loads = [40.0, 20.0, 20.0, 20.0]
    plan = plan_replicas(loads, 2, 2, 1)
    virtual, cumulative = copy_tables(plan, 4, "cpu")
    indices = torch.zeros(1000, 2, dtype=torch.int64)  # every assignment chose expert 0
    indices[:, 1] = 3
    chosen = choose_copies(indices, virtual, cumulative)
    assert set(chosen[:, 1].tolist()) == {4}  # expert 3 has no copy: its owner's virtual id
    share_of_copy = (chosen[:, 0] == 5).float().mean().item()
    assert share_of_copy == pytest.approx(0.25, abs=0.01)
    assert set(chosen[:, 0].tolist()) == {0, 5}


def equivalence_worker(rank, world_size, workdir, capacity):
    """Train the same skewed model without and with copies in one process group; return both runs."""
    runs, ctx = {}, None
    for redundant in (0, 1):
        config = tiny_config(
            f"{workdir}/r{redundant}",
            world_size,
            world_size,
            max_steps=5,
            moe={"router_bias": True, "capacity_factor": capacity, "n_routed_experts": 4},
        )
        config.parallel.redundant_experts = redundant
        config.parallel.replication_interval = 2  # re-placed after steps 2 and 4
        validate(config, world_size)
        ctx = ctx or init_distributed(config)  # one process group for both runs
        trainer = Trainer(config, ctx)
        with torch.no_grad():  # expert 0 takes most tokens
            next(trainer.model.iter_moe_layers()).gate.bias[0] = 4.0
        metrics = [trainer.train_step() for _ in range(5)]
        runs[redundant] = {
            "losses": [m["loss"] for m in metrics],
            "grad_norms": [m["grad_norm"] for m in metrics],
            "rows": [m["expert_rows"][0] for m in metrics],
            "params": {name: p.detach().clone() for name, p in trainer.model.named_parameters()},
        }
    shutdown()
    plain, copied = runs[0], runs[1]
    worst = max((plain["params"][n] - copied["params"][n]).abs().max().item() for n in plain["params"])
    return {
        "plain": {k: plain[k] for k in ("losses", "grad_norms", "rows")},
        "copied": {k: copied[k] for k in ("losses", "grad_norms", "rows")},
        "worst_param": worst,
    }


@pytest.mark.slow
@pytest.mark.parametrize("world_size", [2, 4])
@pytest.mark.parametrize("capacity", [None, 1.0], ids=["dropless", "capacity"])
def test_training_with_copies_equals_training_without(tmp_path, world_size, capacity):
    results = run_distributed(
        equivalence_worker, world_size, args=(str(tmp_path), capacity), init_process_group=False, timeout=120
    )
    for result in results:
        value = result.value
        assert value["worst_param"] < 1e-5
        torch.testing.assert_close(value["copied"]["losses"], value["plain"]["losses"], atol=1e-5, rtol=0)
        torch.testing.assert_close(value["copied"]["grad_norms"], value["plain"]["grad_norms"], atol=1e-5, rtol=1e-5)
    rows_plain, rows_copied = results[0].value["plain"]["rows"], results[0].value["copied"]["rows"]
    assert rows_copied[:2] == rows_plain[:2]  # no copies before the first re-placement
    if capacity is not None:  # capacity already caps the hot expert's rows: copies have little to even
        return
    # after it, the busiest rank computes fewer rows than without copies
    assert sum(max(c) for c in rows_copied[2:]) < 0.9 * sum(max(p) for p in rows_plain[2:]), (rows_plain, rows_copied)


def test_replication_is_refused_where_it_cannot_work(tmp_path):
    config = tiny_config(tmp_path, 2, 2)
    config.parallel.redundant_experts = 1
    with pytest.raises(ConfigError, match="redundant_experts"):
        check_engine(config, "ds.json")
    config.parallel.fsdp = True
    with pytest.raises(ConfigError, match="fsdp=True"):
        validate(config, 2)
    config.parallel.fsdp = False
    config.parallel.expert_parallel_size = 1
    with pytest.raises(ConfigError, match="expert_parallel_size >= 2"):
        validate(config, 2)


def resume_worker(rank, world_size, workdir):
    from pathlib import Path

    from mymoe.checkpoint import CheckpointManager

    def skewed_trainer(folder, ctx=None):
        config = tiny_config(folder, world_size, world_size, max_steps=5, moe={"router_bias": True})
        config.parallel.redundant_experts = 1
        config.parallel.replication_interval = 2
        ctx = ctx or init_distributed(validate(config, world_size))
        trainer = Trainer(config, ctx)
        with torch.no_grad():
            next(trainer.model.iter_moe_layers()).gate.bias[0] = 4.0
        return config, ctx, trainer

    config, ctx, uninterrupted = skewed_trainer(f"{workdir}/a")
    expected = [uninterrupted.train_step() for _ in range(5)]
    config, _, first = skewed_trainer(f"{workdir}/b", ctx)
    head = [first.train_step() for _ in range(3)]  # re-placed after step 2, mid-window at 3
    manager = CheckpointManager(Path(config.train.out_dir) / "checkpoints", config, ctx, verbose=False)
    manager.save(first)
    manager.wait()
    _, _, resumed = skewed_trainer(f"{workdir}/b", ctx)
    assert manager.load_latest(resumed)
    tail = [resumed.train_step() for _ in range(2)]
    shutdown()
    # the copies change no loss, only who computes what: the rows show the resumed run kept them
    return {
        key: [(m["loss"], m["expert_rows"]) for m in metrics]
        for key, metrics in (("expected", expected), ("got", head + tail))
    }


@pytest.mark.slow
def test_a_resumed_run_keeps_its_copies_and_equals_the_uninterrupted_one(tmp_path):
    for result in run_distributed(resume_worker, 2, args=(str(tmp_path),), init_process_group=False, timeout=120):
        assert result.value["got"] == result.value["expected"]
