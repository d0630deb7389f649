"""Trainer units in one process: optimizer groups, schedule, aux ramp, accumulation, precision, seeds,
stops by steps and tokens, expert-health warnings, logging (JSON lines, TensorBoard) and the heatmap."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from mymoe.config import ConfigError, load_config
from mymoe.model import MoECausalLM
from mymoe.model.moe.experts import is_expert
from mymoe.parallel import ParallelContext
from mymoe.train.__main__ import main as train_main
from mymoe.train.deepspeed_engine import load_deepspeed_config
from mymoe.train import loop
from mymoe.train.heatmap import render
from mymoe.train.loop import Trainer, autocast_context, run
from mymoe.train.metrics import ExpertHealth, MetricsLogger
from mymoe.optim import parameter_groups
from mymoe.train.optim import aux_loss_scale, learning_rate, total_steps
from conftest import REPO, TINY_CONFIG, make_dataset, tiny_overrides

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("data"))


def tiny(dataset, out_dir, steps=20, **extra):
    train, valid = dataset
    return load_config(str(TINY_CONFIG), tiny_overrides(train, valid, out_dir, steps, extra))


def test_parameter_groups_decay_matrices_only_and_keep_experts_apart(tmp_path):
    config = load_config(str(TINY_CONFIG))
    model = MoECausalLM(config.model)
    groups = {group["name"]: group for group in parameter_groups(model, weight_decay=0.1)}
    assert set(groups) == {"dense_decay", "dense_no_decay", "expert_decay"}
    names = {id(param): name for name, param in model.named_parameters()}
    for group in groups.values():
        for param in group["params"]:
            decayed = group["weight_decay"] > 0
            assert decayed == (param.dim() >= 2 and "norm" not in names[id(param)]), names[id(param)]
            assert is_expert(param) == group["name"].startswith("expert")
    norm_weights = [p for n, p in model.named_parameters() if "norm" in n]
    assert norm_weights and all(any(p is q for q in groups["dense_no_decay"]["params"]) for p in norm_weights)
    # every trainable parameter exactly once (the tied embedding / head matrix too)
    grouped = [id(p) for group in groups.values() for p in group["params"]]
    assert sorted(grouped) == sorted({id(p) for p in model.parameters()})


def test_learning_rate_warms_up_linearly_then_decays_by_cosine_to_min_lr():
    train = load_config(
        str(TINY_CONFIG), ["--train.lr=1.0", "--train.min_lr=0.1", "--train.warmup_steps=4", "--train.max_steps=14"]
    ).train
    assert [learning_rate(step, train) for step in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert learning_rate(4, train) == pytest.approx(1.0)
    assert learning_rate(9, train) == pytest.approx(0.55)  # half way: (lr + min_lr) / 2
    assert learning_rate(14, train) == pytest.approx(0.1)
    assert learning_rate(100, train) == pytest.approx(0.1)
    lrs = [learning_rate(step, train) for step in range(4, 15)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))
    # a run cut short by max_tokens decays over the steps it will really take
    assert learning_rate(6, train, steps=6) == pytest.approx(0.1)


def test_total_steps_stop_at_max_tokens_when_that_comes_first():
    train = load_config(str(TINY_CONFIG), ["--train.max_steps=100", "--train.max_tokens=1000"]).train
    assert total_steps(train, tokens_per_step=256) == 4  # 4 * 256 = 1024 >= 1000
    train.max_tokens = None
    assert total_steps(train, tokens_per_step=256) == 100


def test_aux_loss_coefficient_ramps_from_zero():
    train = load_config(str(TINY_CONFIG), ["--train.aux_loss_ramp_steps=4"]).train
    assert [aux_loss_scale(step, train) for step in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    train.aux_loss_ramp_steps = 0
    assert aux_loss_scale(0, train) == 1.0


def test_autocast_bf16_on_cpu_only_when_asked():
    cpu = torch.device("cpu")
    assert not isinstance(autocast_context(load_config(str(TINY_CONFIG)), cpu), torch.autocast)
    bf16 = load_config(str(TINY_CONFIG), ["--train.precision=bf16"])
    assert isinstance(autocast_context(bf16, cpu), torch.autocast)


def test_gradient_accumulation_equals_one_larger_batch(dataset, tmp_path):
    # aux losses are not additive over micro-batches (they depend on the batch's load), so switch them off.
    # Expert gradients of the two runs differ by float rounding (~1e-10: rows of an expert are summed in
    # another order); Adam's first step divides by |g| + eps, which turns such noise on near-zero entries
    # into lr-sized differences when eps is tiny, so compare under an eps that does not amplify it
    common = {"model.moe.router_aux_loss_coef": 0, "model.moe.router_z_loss_coef": 0, "train.adam_eps": 1e-3}
    whole = Trainer(tiny(dataset, tmp_path, **common, **{"train.micro_batch_size": 4}), ParallelContext())
    halves = Trainer(
        tiny(dataset, tmp_path, **common, **{"train.micro_batch_size": 2, "train.gradient_accumulation_steps": 2}),
        ParallelContext(),
    )
    assert whole.tokens_per_step == halves.tokens_per_step
    first, second = whole.train_step(), halves.train_step()
    assert first["loss"] == pytest.approx(second["loss"], abs=1e-6)
    assert first["grad_norm"] == pytest.approx(second["grad_norm"], rel=1e-5)
    for (name, a), (_, b) in zip(whole.model.named_parameters(), halves.model.named_parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=name)


def test_expert_loads_of_every_layer_are_summed_in_one_collective(dataset, tmp_path, monkeypatch):
    trainer = Trainer(tiny(dataset, tmp_path), ParallelContext())
    trainer.train_step()
    layers = list(trainer.model.iter_moe_layers())
    for index, layer in enumerate(layers):
        layer._pending_load = torch.ones(layer.num_experts, dtype=torch.int64)
        layer._pending_rows = torch.tensor(10 + index)
    calls = []
    monkeypatch.setattr(loop, "all_reduce", lambda tensor, name, *args, **kwargs: calls.append((name, tensor.shape)))
    trainer.ctx = ParallelContext(rank=1, world_size=2)  # as if distributed: the collective is recorded, not run
    loads, rows = trainer.update_expert_biases()
    assert calls == [
        (
            "all_reduce (expert loads and rows of every MoE layer, world)",
            torch.Size([len(layers), layers[0].num_experts + 2]),
        )
    ]
    assert len(layers) > 1 and loads.tolist() == [[1.0] * layers[0].num_experts] * len(layers)
    assert rows.tolist() == [[0.0, 10.0 + index] for index in range(len(layers))]  # this rank's column


def test_seed_controls_the_run_and_gradient_checkpointing_changes_nothing(dataset, tmp_path):
    def first_losses(**extra):
        trainer = Trainer(tiny(dataset, tmp_path, **extra), ParallelContext())
        return [trainer.train_step()["loss"] for _ in range(2)]

    reference = first_losses()
    assert first_losses() == reference
    assert first_losses(**{"model.gradient_checkpointing": True}) == pytest.approx(reference, abs=1e-6)
    assert first_losses(**{"train.seed": 7}) != reference


def test_bf16_on_cpu_trains(dataset, tmp_path):
    trainer = Trainer(tiny(dataset, tmp_path, **{"train.precision": "bf16"}), ParallelContext())
    metrics = [trainer.train_step() for _ in range(2)]
    assert all(math.isfinite(m["loss"]) and math.isfinite(m["grad_norm"]) for m in metrics)


def test_expert_health_warns_once_per_dead_or_saturated_expert():
    health = ExpertHealth(window=3, saturation=2.0)
    loads = [[0.0, 10.0, 10.0, 60.0]]  # expert 0 dead, expert 3 at 3x its fair share of 20
    assert health.observe(1, loads) == [] and health.observe(2, loads) == []
    messages = health.observe(3, loads)
    assert len(messages) == 2
    assert "expert 0 of MoE layer 0 has been dead" in messages[0]
    assert "expert 3 of MoE layer 0 has been saturated" in messages[1]
    assert health.observe(4, loads) == []  # said once
    fresh = ExpertHealth(window=3)
    fresh.observe(1, loads), fresh.observe(2, loads)
    assert fresh.observe(3, [[5.0, 5.0, 5.0, 5.0]]) == []  # a single healthy step resets the window


def test_metrics_logger_writes_jsonl_histograms_and_warnings(tmp_path):
    logger = MetricsLogger(str(tmp_path), total_steps=4, enabled=True, dead_expert_window=2, progress=False)
    for step in (1, 2):
        logger.log(step, {"loss": 3.0 / step, "lr": 0.1}, [[0.0, 4.0, 4.0, 4.0]], [0.25])
        logger.observe_experts(step, [[0.0, 4.0, 4.0, 4.0]])
    logger.close()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2]
    assert records[0]["expert_load"] == [[0.0, 4.0, 4.0, 4.0]] and records[0]["dropped_fraction"] == [0.25]
    warnings = [r["warning"] for r in records if "warning" in r]
    assert len(warnings) == 1 and "expert 0 of MoE layer 0 has been dead" in warnings[0]

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"histograms": 0})
    events.Reload()
    assert {"loss", "lr", "dropped_fraction/layer_0"} <= set(events.Tags()["scalars"])
    histogram = events.Histograms("expert_load/layer_0")[-1].histogram_value
    assert list(histogram.bucket) == [0.0, 4.0, 4.0, 4.0]  # one bucket per expert


def test_heatmap_renders_layers_by_experts_over_steps(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    with open(metrics, "w") as f:
        for step in range(1, 21):
            f.write(
                json.dumps(
                    {
                        "step": step,
                        "loss": 1.0,
                        "expert_load": [[step, 20 - step, 10, 10], [5, 5, 25, 5]],
                        "expert_rows": [[20, 20], [10, 30]],
                    }
                )
                + "\n"
            )
        f.write(json.dumps({"step": 20, "eval/loss": 1.0}) + "\n")
    output = render(str(metrics), str(tmp_path / "heatmap.png"))
    assert Path(output).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_single_process_run_stops_at_max_tokens_and_logs_eval(dataset, tmp_path):
    config = tiny(
        dataset,
        tmp_path / "run",
        steps=50,
        **{"train.max_tokens": 1200, "train.eval_interval": 2, "train.micro_batch_size": 2},
    )
    result = run(config, progress=False)
    assert result.steps == 10 and result.tokens_seen == 1280  # 2 x 64 tokens a step, until >= 1200
    assert len(result.eval_losses) == 5
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "eval/perplexity" in r] == [2, 4, 6, 8, 10]
    assert records[-1]["eval/perplexity"] == pytest.approx(math.exp(records[-1]["eval/loss"]), rel=1e-6)
    assert (tmp_path / "run" / "checkpoints").is_dir()


def test_deepspeed_config_takes_batch_clipping_and_precision_from_ours(tmp_path):
    config = load_config(
        str(TINY_CONFIG),
        ["--train.micro_batch_size=3", "--train.gradient_accumulation_steps=2", "--train.grad_clip=0.5"],
    )
    ds = load_deepspeed_config(str(REPO / "configs" / "ds_zero2.json"), config, world_size=4)
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["train_batch_size"]) == (
        3,
        2,
        24,
    )
    assert ds["gradient_clipping"] == 0.5 and ds["bf16"] == {"enabled": False}
    assert ds["zero_optimization"]["stage"] == 2
    stage3 = tmp_path / "ds3.json"
    stage3.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    with pytest.raises(ConfigError, match="stage=3 is not supported"):
        load_deepspeed_config(str(stage3), config, world_size=2)


def test_cli_reports_a_bad_config_in_one_line(capsys):
    with pytest.raises(SystemExit, match="unknown key 'lrr'"):
        train_main(["--config", str(TINY_CONFIG), "--train.lrr=1"])


def test_cli_names_a_missing_data_prefix(tmp_path):
    with pytest.raises(SystemExit, match=r"data.train_prefixes: .*nope.bin and .idx not found"):
        train_main(["--config", str(TINY_CONFIG), f"--data.train_prefixes=[{tmp_path / 'nope'}]"])
    with pytest.raises(SystemExit, match="data.train_prefixes is empty"):
        train_main(["--config", str(TINY_CONFIG)])
