"""The step-driven MoE dynamics (mymoe/model/moe/dynamics.py) and debug mode, one test per dynamic: warm-up
from the dense path, capacity growth, aux-loss ramp, router reset, flexible FFN, token importance; through
the real trainer on one process where the step matters, on the model or the layer directly otherwise."""

from __future__ import annotations

import zlib
from pathlib import Path

import pytest
import torch

from conftest import bigram_documents, tiny_config, train_in_process, write_indexed
from mymoe.checkpoint import CheckpointError
from mymoe.config import ConfigError, MoEConfig, architecture_fields, config_from_dict, validate
from mymoe.convert.hf import export_refusals
from mymoe.model import MoECausalLM
from mymoe.model.moe.layer import MoELayer
from mymoe.parallel import ParallelContext
from mymoe.train.debug import DebugMonitor
from mymoe.train.loop import Trainer, check_engine

torch.set_num_threads(1)
HIDDEN = 16


def learnable_config(workdir: Path, max_steps: int, moe: dict, train: dict | None = None):
    """conftest's tiny config over a bigram corpus, whose loss falls within a few steps."""
    workdir.mkdir(parents=True, exist_ok=True)
    write_indexed(workdir / "data", bigram_documents(16, 129, seed=1))
    return tiny_config(workdir, max_steps=max_steps, moe=moe, train={"lr": 3e-3, **(train or {})})


def layer_with(**fields) -> MoELayer:
    torch.manual_seed(0)
    moe = MoEConfig(n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=8, **fields)
    return MoELayer(HIDDEN, moe).train()


def test_warmup_moves_the_output_from_the_dense_path_to_the_moe_path():
    layer = layer_with(moe_warmup_steps=4)
    tokens = torch.randn(12, HIDDEN)
    dense_calls = []
    layer.dense_ffn.register_forward_hook(lambda *_: dense_calls.append(1))
    layer.step = 10  # past the warm-up: the MoE path alone, the dense path not computed
    moe_only = layer(tokens)[0]
    assert not dense_calls
    dense = layer.dense_ffn(tokens)
    for step, share in ((0, 0.0), (1, 0.25), (2, 0.5), (4, 1.0)):
        layer.step = step
        expected = (1 - share) * dense + share * moe_only
        torch.testing.assert_close(layer(tokens)[0], expected)
    # with a shared expert, the shared expert is the dense path: shared + a * routed
    shared_layer = layer_with(moe_warmup_steps=4, n_shared_experts=1)
    assert shared_layer.dense_ffn is None
    shared_layer.step = 0
    torch.testing.assert_close(shared_layer(tokens)[0], shared_layer.shared_experts(tokens))


def test_warmup_follows_the_trainers_step(tmp_path):
    config = tiny_config(tmp_path, max_steps=5, moe={"moe_warmup_steps": 4})
    trainer = Trainer(config, ParallelContext())
    shares = []
    layer = next(trainer.model.iter_moe_layers())
    layer.register_forward_hook(lambda module, *_: shares.append(module.moe_share()))
    while not trainer.finished():
        trainer.train_step()
    assert shares == [0.0, 0.25, 0.5, 0.75, 1.0]


def test_capacity_grows_from_min_to_max_over_the_schedule(tmp_path):
    moe = {"capacity_factor": 1.0, "min_expert_capacity": 4, "max_expert_capacity": 20, "capacity_growth_steps": 4}
    trainer = Trainer(tiny_config(tmp_path, max_steps=6, moe=moe), ParallelContext())
    layer = next(trainer.model.iter_moe_layers())
    capacities, loads = [], []
    layer.register_forward_hook(lambda module, inputs, output: capacities.append(module.capacity(0)))
    layer.register_forward_hook(lambda module, inputs, output: loads.append(int(output[1].tokens_per_expert.max())))
    dropped = [trainer.train_step()["dropped"][0] for _ in range(6)]
    assert capacities == [4, 8, 12, 16, 20, 20]
    assert all(load <= capacity for load, capacity in zip(loads, capacities))
    assert dropped[0] > dropped[-1]  # 64 tokens * 2 choices over 4 experts overflow 4 slots, far fewer 20
    with pytest.raises(ConfigError, match="capacity_factor is null"):
        tiny_config(tmp_path, moe={"min_expert_capacity": 4, "max_expert_capacity": 20, "capacity_growth_steps": 4})
    with pytest.raises(ConfigError, match="capacity_growth_steps=0"):
        tiny_config(tmp_path, moe={**moe, "capacity_growth_steps": 0})


def test_aux_loss_ramps_with_the_step(tmp_path):
    layer = layer_with(router_aux_loss_coef=0.1, aux_loss_ramp_steps=4)
    tokens = torch.randn(12, HIDDEN)
    full = layer(tokens)[1].aux_loss
    assert full > 0
    for step, scale in ((0, 0.0), (1, 0.25), (4, 1.0), (9, 1.0)):
        layer.step = step
        torch.testing.assert_close(layer(tokens)[1].aux_loss, scale * full)
    with pytest.raises(ConfigError, match="would both ramp the aux loss"):
        tiny_config(tmp_path, moe={"aux_loss_ramp_steps": 4}, train={"aux_loss_ramp_steps": 4})


def test_router_reset_happens_at_its_interval_and_training_continues(tmp_path):
    config = learnable_config(tmp_path, 12, {"router_reset_interval": 4, "capacity_factor": None})
    trainer = Trainer(config, ParallelContext())
    gate = next(trainer.model.iter_moe_layers()).gate
    used = []  # the router weight each step's forward used
    gate.register_forward_pre_hook(lambda module, inputs: used.append(module.weight.detach().clone()))
    losses, state_steps = [], []
    while not trainer.finished():
        losses.append(trainer.train_step()["loss"])
        state_steps.append(int(trainer.optimizer.state[gate.weight]["step"]))
    resets = [line for line in trainer.log_lines if "re-initialised the routers" in line]
    assert [line.split(":")[0] for line in resets] == ["step 4", "step 8"]
    # AdamW's moments restart at each reset: one step of state after it, not the run's count
    assert state_steps == [1, 2, 3, 4, 1, 2, 3, 4, 1, 2, 3, 4]
    # step 4 ran on a fresh draw from the seed and the step, not on the router steps 0-3 trained
    generator = torch.Generator().manual_seed((config.train.seed + 4) ^ zlib.crc32(b"model.layers.0.mlp"))
    fresh = torch.empty_like(gate.weight).normal_(0.0, config.model.initializer_range, generator=generator)
    assert torch.equal(used[4], fresh) and not torch.equal(used[3], fresh)
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.5
    for section, fix in (("parallel", {"fsdp": True}), ("peft", {"lora_rank": 4})):
        with pytest.raises(ConfigError, match="router_reset_interval=4"):
            validate(config_from_dict({"model": {"moe": {"router_reset_interval": 4}}, section: fix}))
    with pytest.raises(ConfigError, match="DeepSpeed's engine holds partitioned"):
        check_engine(config, "configs/ds_zero1.json")


def test_router_reset_draws_the_same_weights_for_the_same_step():
    model = MoECausalLM(validate(config_from_dict({"model": {"vocab_size": 32, "hidden_size": 16}})).model)
    first = [param.clone() for param in model.reset_routers(seed=7)]
    with torch.no_grad():
        for param in model.parameters():
            param.add_(1.0)
    again = model.reset_routers(seed=7)
    assert all(torch.equal(a, b) for a, b in zip(first, again))


def test_token_importance_changes_who_is_dropped_at_capacity():
    layer = layer_with(token_importance=True, capacity_factor=0.5, min_capacity=0)  # 3 slots per expert
    tokens = torch.randn(12, HIDDEN)
    with torch.no_grad():
        layer.gate.weight.zero_()
        layer.gate.weight[0, 0] = layer.gate.weight[1, 0] = 1.0  # every token picks experts 0 and 1
        tokens[:, 0] = 2.0
        layer.importance.score.weight.zero_()
        layer.importance.score.weight[0, 1] = 1.0
        tokens[:, 1] = torch.linspace(3.0, -3.0, 12)  # importance: earlier tokens matter more

    def kept_tokens() -> list[int]:
        output = layer(tokens)[0]
        return [i for i in range(12) if bool(output[i].abs().sum() > 0)]

    assert kept_tokens() == [0, 1, 2]
    with torch.no_grad():
        layer.importance.score.weight[0, 1] = -1.0  # now the later tokens are the important ones
    assert kept_tokens() == [9, 10, 11]
    # the score learns: it scales the kept tokens' output, so the loss reaches it
    layer(tokens)[0].square().sum().backward()
    assert layer.importance.score.weight.grad.abs().sum() > 0
    with pytest.raises(ConfigError, match="token_importance=true"):
        validate(config_from_dict({"model": {"moe": {"token_importance": True}}}))


def test_flexible_ffn_weight_and_token_importance_train_and_checkpoint(tmp_path):
    moe = {"flexible_ffn": True, "token_importance": True, "capacity_factor": 1.0, "moe_warmup_steps": 2}
    config = learnable_config(tmp_path, 4, moe)
    torch.manual_seed(config.train.seed)
    initial = MoECausalLM(config.model)
    trainer, manager, _ = train_in_process(tmp_path, stop_at=4, save_at=(4,), config=config)
    for name in ("ffn_mix_logit", "importance.score.weight", "dense_ffn.down_proj.weight"):
        before = dict(initial.named_parameters())[f"model.layers.0.mlp.{name}"]
        after = dict(trainer.model.named_parameters())[f"model.layers.0.mlp.{name}"]
        assert not torch.allclose(before, after), name
    # saved and restored with the model
    restored, _, _ = train_in_process(tmp_path, stop_at=4, config=config)
    for (name, param), (_, loaded) in zip(trainer.model.named_parameters(), restored.model.named_parameters()):
        assert torch.equal(param, loaded), name
    marked = {name for name, _ in architecture_fields()}
    assert {"moe.moe_warmup_steps", "moe.flexible_ffn", "moe.token_importance"} <= marked
    changed = learnable_config(tmp_path, 4, {**moe, "flexible_ffn": False})
    with pytest.raises(CheckpointError, match="flexible_ffn"):
        train_in_process(tmp_path, stop_at=4, config=changed)
    refusals = export_refusals(trainer.model, "mixtral")
    assert all(any(field in problem for problem in refusals) for field in moe if field != "capacity_factor")


def test_debug_mode_logs_loads_drops_and_where_a_nan_begins(tmp_path):
    config = tiny_config(tmp_path, max_steps=2, moe={"capacity_factor": 1.0}, train={"debug": True})
    trainer = Trainer(config, ParallelContext())
    trainer.train_step()
    lines = trainer.log_lines
    assert len(lines) == 2 and all("router probs finite True" in line for line in lines)
    assert "debug step 1: model.layers.1.mlp" in lines[1] and "load per expert [" in lines[1]
    assert "dropped 0." in lines[0]
    model = MoECausalLM(config.model)
    monitor = DebugMonitor(model)
    with torch.no_grad():
        model.model.layers[1].mlp.experts.w_down.fill_(float("nan"))
    model(torch.zeros(1, 4, dtype=torch.long))
    assert monitor.report(1)[-1].endswith("is that of model.layers.1.mlp.experts (GroupedExperts)")
    monitor.close()
