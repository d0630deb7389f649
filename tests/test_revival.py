"""Dead-expert revival (mymoe/train/revival.py): an expert kept dead for a window is revived, then receives
tokens while the loss keeps falling; every layout revives alike; a resume mid-window changes nothing."""

from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import bigram_documents, tiny_config
from dist_utils import run_distributed
from mymoe.checkpoint import CheckpointManager
from mymoe.config import ConfigError, validate
from mymoe.data import IndexedWriter
from mymoe.parallel import ParallelContext, init_distributed, shutdown
from mymoe.train.loop import Trainer, check_engine
from mymoe.train.revival import dead_experts, pair_sources

DEAD = 1  # the expert of MoE layer 0 kept dead by a logit bias of -30
WINDOW = 4


def revival_config(workdir, world_size=1, expert_parallel_size=1, fsdp=False, **train):
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    if not (workdir / "data.bin").exists():  # a learnable corpus, so "the loss keeps falling" can be seen
        writer = IndexedWriter(str(workdir / "data.bin"), dtype=np.uint16)
        for document in bigram_documents(32, 129, seed=1):
            writer.add_document(document, [len(document)])
        writer.finalize(str(workdir / "data.idx"))
    config = tiny_config(
        workdir,
        world_size,
        expert_parallel_size,
        max_steps=12,
        moe={"router_bias": True, "bias_update_rate": 0.0},
        train={
            "lr": 1e-2,
            "revive_dead_experts": True,
            "revival_window": WINDOW,
            "revival_threshold": 0.05,
            **train,
        },
    )
    config.parallel.fsdp = fsdp
    return validate(config, world_size)


def kill_expert(trainer: Trainer) -> None:
    gate = next(trainer.model.iter_moe_layers()).gate
    with torch.no_grad():
        if hasattr(gate.bias, "full_tensor"):  # FSDP: the row lives on one rank's shard
            local = gate.bias.to_local()
            start = gate.bias.to_local().numel() * trainer.ctx.rank
            if start <= DEAD < start + local.numel():
                local[DEAD - start] = -30.0
        else:
            gate.bias[DEAD] = -30.0


def train_steps(trainer: Trainer, steps: int) -> tuple[list[float], list[float], list]:
    """(losses, layer-0 loads of the dead expert, revivals) of the next `steps` steps."""
    losses, loads, revivals = [], [], []
    for _ in range(steps):
        metrics = trainer.train_step()
        losses.append(metrics["loss"])
        loads.append(metrics["expert_loads"][0][DEAD])
        revivals += [(r.step, r.layer, r.expert, r.source) for r in trainer.revivals]
        trainer.revivals = []
    return losses, loads, revivals


def test_dead_experts_are_paired_with_the_busiest_live_ones():
    load = torch.tensor([50.0, 0.0, 30.0, 0.5, 20.0, 0.0])
    dead = dead_experts(load, threshold=0.05)  # fair share 16.75: under 0.84 is dead
    assert dead == [1, 3, 5]
    assert pair_sources(load, dead) == {1: 0, 3: 2, 5: 4}
    assert dead_experts(torch.zeros(4), 0.05) == []  # a layer that saw no tokens revives nothing


def test_a_dead_expert_is_revived_then_receives_tokens_and_the_loss_keeps_falling(tmp_path):
    trainer = Trainer(revival_config(tmp_path), ParallelContext())
    kill_expert(trainer)
    losses, loads, revivals = train_steps(trainer, WINDOW)
    assert loads == [0.0] * WINDOW
    assert (WINDOW, 0, DEAD) in [r[:3] for r in revivals]
    layer = next(trainer.model.iter_moe_layers())
    source = next(r[3] for r in revivals if r[:3] == (WINDOW, 0, DEAD))
    assert source is not None and source != DEAD
    # a noisy copy of the source, its router logit bias included; its AdamW moments cleared
    assert float(layer.gate.bias[DEAD].detach()) == pytest.approx(float(layer.gate.bias[source].detach()))
    assert torch.allclose(layer.experts.w_down[DEAD], layer.experts.w_down[source], atol=1e-2)
    assert not torch.equal(layer.experts.w_down[DEAD], layer.experts.w_down[source])
    for param in (layer.experts.w_gate, layer.gate.weight):
        assert not trainer.optimizer.state[param]["exp_avg"][DEAD].any()
    after, loads_after, _ = train_steps(trainer, 8)
    assert all(load > 0 for load in loads_after)
    assert np.mean(after[-3:]) < losses[-1] - 0.05


def test_a_resume_in_the_middle_of_a_window_revives_as_the_uninterrupted_run(tmp_path):
    uninterrupted = Trainer(revival_config(tmp_path / "a"), ParallelContext())
    kill_expert(uninterrupted)
    expected = train_steps(uninterrupted, 6)

    config = revival_config(tmp_path / "b")
    first = Trainer(config, ParallelContext())
    kill_expert(first)
    head = train_steps(first, 2)
    manager = CheckpointManager(Path(config.train.out_dir) / "checkpoints", config, ParallelContext(), verbose=False)
    manager.save(first)
    manager.wait()
    resumed = Trainer(config, ParallelContext())
    assert manager.load_latest(resumed)
    assert first.reviver.state() is not None and resumed.reviver.state() == first.reviver.state()
    tail = train_steps(resumed, 4)
    assert head[0] + tail[0] == expected[0]
    assert head[2] + tail[2] == expected[2]


def layout_worker(rank, world_size, workdir, expert_parallel_size, fsdp):
    config = revival_config(workdir, world_size, expert_parallel_size, fsdp)
    ctx = init_distributed(config)
    try:
        trainer = Trainer(config, ctx)
        kill_expert(trainer)
        losses, _, revivals = train_steps(trainer, 7)
        return {"losses": losses, "revivals": revivals}
    finally:
        shutdown()


@pytest.mark.slow
@pytest.mark.parametrize("expert_parallel_size, fsdp", [(2, False), (1, True)], ids=["ep2", "fsdp"])
def test_every_layout_revives_as_one_process(tmp_path, expert_parallel_size, fsdp):
    single = Trainer(revival_config(tmp_path / "one"), ParallelContext())
    kill_expert(single)
    losses, _, revivals = train_steps(single, 7)
    results = run_distributed(
        layout_worker,
        2,
        args=(str(tmp_path / "two"), expert_parallel_size, fsdp),
        init_process_group=False,
        timeout=90,
    )
    for result in results:
        assert result.value["revivals"] == revivals
        np.testing.assert_allclose(result.value["losses"], losses, rtol=0, atol=1e-5)


def test_revival_is_refused_where_it_cannot_reach_the_weights(tmp_path):
    config = revival_config(tmp_path)
    with pytest.raises(ConfigError, match="revive_dead_experts"):
        check_engine(config, "ds.json")
    config.peft.lora_rank = 4
    with pytest.raises(ConfigError, match="frozen"):
        validate(config)
    config.peft.lora_rank = 0
    config.train.revival_threshold = 0.0
    with pytest.raises(ConfigError, match="revival_threshold"):
        validate(config)


def test_a_fresh_revival_draws_the_expert_as_the_model_initialises_it(tmp_path):
    trainer = Trainer(revival_config(tmp_path, revival_init="fresh"), ParallelContext())
    kill_expert(trainer)
    _, _, revivals = train_steps(trainer, WINDOW)
    assert (WINDOW, 0, DEAD, None) in revivals  # no source: drawn anew
    layer, model = next(trainer.model.iter_moe_layers()), trainer.config.model
    std = model.initializer_range
    residual_std = std / (2 * model.num_hidden_layers) ** 0.5
    assert float(layer.experts.w_up[DEAD].std()) == pytest.approx(std, rel=0.1)
    assert float(layer.experts.w_down[DEAD].std()) == pytest.approx(residual_std, rel=0.1)
    live = [e for e in range(layer.num_experts) if e != DEAD]
    assert float(layer.gate.bias[DEAD].detach()) == pytest.approx(float(layer.gate.bias[live].detach().mean()))
    assert not trainer.optimizer.state[layer.experts.w_down]["exp_avg_sq"][DEAD].any()
