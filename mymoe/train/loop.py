"""The training loop: reads like a recipe, each ingredient built by its own module.

    ids -> model (router -> dispatch -> experts -> combine) -> lm loss + ramped aux -> backward
    -> reduce grads (world for dense, expert-data-parallel for experts) -> clip on the true global norm
    -> optimizer step -> expert-bias update from the step's load -> metrics -> (eval) -> (checkpoint)

With ``--deepspeed`` the middle (reduction, clipping, step, ZeRO partitioning) is DeepSpeed's engine;
everything else is the same code.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from mymoe.checkpoint import CheckpointManager, committed_steps
from mymoe.checkpoint.retention import fresh_run_refusal
from mymoe.config import Config, ConfigError
from mymoe.data.reader import build_train_reader
from mymoe.load import init_from as load_initial_weights
from mymoe.model import MoECausalLM
from mymoe.model.moe.dynamics import router_reset_due
from mymoe.model.transformer import training_loss
from mymoe.optim import build_optimizer, parameter_groups
from mymoe.parallel import ParallelContext, clip_grad_norm_, init_distributed, parallelize, reduce_gradients, shutdown
from mymoe.parallel.collectives import all_reduce
from mymoe.parallel.fsdp import apply_fsdp, set_gradient_sync
from mymoe.parallel.replication import Replicator, unreplicated_rows
from mymoe.peft import apply_peft
from mymoe.train.debug import DebugMonitor
from mymoe.train.compile import compile_blocks
from mymoe.train.deepspeed_engine import ZeroOptimizerView, initialize_deepspeed
from mymoe.train.evaluation import sum_lm_loss
from mymoe.train.guard import NonFiniteGuard, step_if_finite
from mymoe.train.lock import out_dir_lock
from mymoe.train.metrics import MetricsLogger, StepMetrics, peak_flops_per_second
from mymoe.train.optim import Schedule, aux_loss_scale, total_steps
from mymoe.train.precision import autocast_context
from mymoe.train.preflight import check_inputs
from mymoe.train.revival import ExpertReviver, Revival
from mymoe.train.stop import GracefulStop, StopNow


@dataclass
class TrainResult:
    steps: int
    tokens_seen: int = 0
    losses: list = field(default_factory=list)  # global mean loss of every step of this run
    eval_losses: list = field(default_factory=list)
    out_dir: str = ""


def world_mean(values: torch.Tensor, ctx: ParallelContext, what: str) -> torch.Tensor:
    """Mean over all ranks of each value, in one collective, left on the device (float64)."""
    tensor = values.to(ctx.device, torch.float64, copy=True)
    if ctx.is_distributed:
        all_reduce(tensor, f"all_reduce ({what}, world)", ctx.timeout_seconds)
        tensor /= ctx.world_size
    return tensor


def micro_batch_metrics(loss: torch.Tensor, out) -> torch.Tensor:
    """float64 [loss, lm_loss, aux_loss, z_loss, load_balancing_loss, dropped per layer...] of one micro-batch,
    the layers' parts summed, all on the device."""
    stats = out.router_stats
    head = torch.stack([loss.detach(), out.lm_loss.detach(), out.aux_loss.detach()]).double()
    if not stats:
        return torch.cat([head, head.new_zeros(2)])
    parts = torch.stack([torch.stack([s["z_loss"], s["load_balancing_loss"]]) for s in stats]).double()  # [layers, 2]
    dropped = torch.stack([s["dropped_fraction"] for s in stats]).double()
    return torch.cat([head, parts.sum(0), dropped])


def check_data(config: Config) -> None:
    """Raise ConfigError unless every data prefix has its .bin and .idx and passes the start-up checks of
    train/preflight.py (pure: call it on every rank)."""
    data = config.data
    if not data.train_prefixes:
        raise ConfigError(
            "data.train_prefixes is empty: preprocess a corpus with `python -m data_tools preprocess` "
            "and pass --data.train_prefixes=[path/prefix]"
        )
    for field_name, prefixes in (("train_prefixes", data.train_prefixes), ("valid_prefixes", data.valid_prefixes)):
        for prefix in prefixes:
            missing = [suffix for suffix in (".bin", ".idx") if not Path(f"{prefix}{suffix}").is_file()]
            if missing:
                raise ConfigError(
                    f"data.{field_name}: {prefix}{' and '.join(missing)} not found (a prefix names "
                    f"a .bin/.idx pair without the suffix; make one with `python -m data_tools "
                    f"preprocess --output {prefix} ...`)"
                )
    check_inputs(config)


def build_reader(config: Config, ctx: ParallelContext, split: str):
    """Every rank reads its own slice of each global batch: under expert parallelism all ranks are
    data-parallel for the tokens they feed in, whichever experts they hold. The "valid" split is read
    in file order, so each evaluation sees the same batches; None when there is no held-out split."""
    data, train = config.data, config.train
    common = dict(
        seq_len=data.seq_len,
        micro_batch_size=train.micro_batch_size,
        dp_rank=ctx.rank,
        dp_world_size=ctx.world_size,
        seed=train.seed,
    )
    if split == "valid":
        return build_train_reader(data.valid_prefixes, None, shuffle=False, **common) if data.valid_prefixes else None
    return build_train_reader(data.train_prefixes, data.train_weights, **common)


def check_engine(config: Config, deepspeed_config: Optional[str]) -> None:
    if deepspeed_config is not None and config.parallel.fsdp:
        raise ConfigError(
            f"--deepspeed {deepspeed_config} and parallel.fsdp=true both partition the training "
            f"state and cannot be combined: drop --deepspeed, or set --parallel.fsdp=false"
        )
    if deepspeed_config is not None and config.parallel.redundant_experts:
        raise ConfigError(
            f"--deepspeed {deepspeed_config} steps the experts inside its engine, where expert copies' "
            f"gradients cannot be added home: drop --deepspeed, or set --parallel.redundant_experts=0"
        )
    if deepspeed_config is not None and config.train.revive_dead_experts:
        raise ConfigError(
            f"--deepspeed {deepspeed_config} keeps its own fp32 copy of the weights, which dead-expert revival "
            f"does not reach: drop --deepspeed, or set --train.revive_dead_experts=false"
        )
    interval = config.model.moe.router_reset_interval
    if deepspeed_config is not None and interval:
        raise ConfigError(
            f"model.moe.router_reset_interval={interval} clears the routers' optimizer state, which DeepSpeed's "
            f"engine holds partitioned: drop --deepspeed {deepspeed_config}, or set router_reset_interval=0"
        )


class Trainer:
    """Holds everything a step needs; `state_dict`/`load_state_dict` are the checkpoint seam."""

    def __init__(
        self,
        config: Config,
        ctx: ParallelContext,
        deepspeed_config: Optional[str] = None,
        init_from: Optional[str] = None,
    ):
        check_data(config)
        check_engine(config, deepspeed_config)
        self.config, self.ctx = config, ctx
        train = config.train
        torch.manual_seed(train.seed)  # the same initial model on every rank (parallelize also broadcasts it)
        self.model = MoECausalLM(config.model)
        if init_from is not None:  # fine-tuning: the whole model's weights, before each rank keeps its experts
            load_initial_weights(self.model, config, init_from)
        parallelize(self.model, ctx)
        if config.peft.enabled:  # after sharding, so expert adapters match the experts this rank holds
            apply_peft(
                self.model,
                config.peft.lora_rank,
                config.peft.lora_alpha,
                config.peft.lora_targets,
                config.peft.prefix_length,
                seed=train.seed,
            )
        self.model.to(ctx.device)
        self.replicator = None
        if config.parallel.redundant_experts:  # on the device, so the copies are born there
            self.replicator = Replicator(
                self.model, ctx, config.parallel.redundant_experts, config.parallel.replication_interval
            )
        if train.compile:  # before FSDP wraps the blocks, as torchtitan does
            compile_blocks(self.model)
        if config.parallel.fsdp:  # after the adapters exist, so FSDP shards them with the rest
            apply_fsdp(self.model, ctx, config.parallel)
        torch.manual_seed(train.seed + ctx.rank)  # router noise and the like differ per rank, reproducibly
        self.engine = None
        if deepspeed_config is not None:
            self.engine, stepping_optimizer = initialize_deepspeed(self.model, config, ctx, deepspeed_config)
            # checkpoints see ZeRO's partitioned state per parameter, as the native optimizer holds it
            self.optimizer = ZeroOptimizerView(self.model, stepping_optimizer, train.weight_decay)
        else:
            stepping_optimizer = self.optimizer = build_optimizer(
                parameter_groups(self.model, train.weight_decay), train
            )
        self.forward = self.engine if self.engine is not None else self.model
        self.train_reader = build_reader(config, ctx, "train")
        self.tokens_per_step = (
            train.micro_batch_size * config.data.seq_len * train.gradient_accumulation_steps * ctx.world_size
        )
        self.total_steps = total_steps(train, self.tokens_per_step)
        self.schedule = Schedule(stepping_optimizer, train, self.total_steps)
        self.step = 0
        self.tokens_seen = 0
        self.resume_point = None  # (reader state, RNG) while a step's forward and backward run
        self.reviver = None
        if train.revive_dead_experts:
            self.reviver = ExpertReviver(list(self.model.iter_moe_layers()), self.optimizer, train, ctx, config.model)
        self.revivals: list[Revival] = []  # done but not reported yet
        self.last_batch = None  # the last micro-batch, which the non-finite guard reruns to find the culprit
        self.debug = DebugMonitor(self.model) if train.debug else None
        self.log_lines: list[str] = []  # what a step has to say (router resets, debug checks), for train_steps

    # --- the checkpoint seam -------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "step": self.step,
            "tokens_seen": self.tokens_seen,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "train_reader": self.train_reader.state_dict(),
            "loop": {
                "revival_window_load": self.reviver.state() if self.reviver is not None else None,
                "replication": self.replicator.state() if self.replicator is not None else None,
            },
            "rng": {
                "cpu": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
            },
        }

    def load_state_dict(self, state: dict) -> None:
        self.step, self.tokens_seen = int(state["step"]), int(state["tokens_seen"])
        self.model.load_state_dict(state["model"])
        if self.engine is not None:
            self.optimizer.refresh_master_weights()
        self.optimizer.load_state_dict(state["optimizer"])
        self.train_reader.load_state_dict(state["train_reader"])
        loop_state = state.get("loop", {})
        if self.reviver is not None:
            self.reviver.load_state(loop_state.get("revival_window_load"))
        if self.replicator is not None:  # the copies of the checkpoint's last placement, from its loads
            self.replicator.load_state(loop_state.get("replication"))
        torch.set_rng_state(state["rng"]["cpu"])
        if state["rng"].get("cuda") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state(state["rng"]["cuda"])

    # --- one step ------------------------------------------------------------------------------------
    def train_step(self) -> StepMetrics:
        """One optimizer step over gradient_accumulation_steps micro-batches; returns its world-mean metrics,
        still on the device: the step itself never waits on the host (the native path; DeepSpeed's engine
        reads its gradient norm itself)."""
        config, ctx = self.config, self.ctx
        accumulation = config.train.gradient_accumulation_steps
        lr = self.schedule.apply(self.step)
        aux_scale = aux_loss_scale(self.step, config.train)
        if router_reset_due(self.step, config.model.moe.router_reset_interval):
            self.reset_routers()
        self.model.train()
        if self.engine is None:  # where a stop deadline may abandon this step (mymoe/train/stop.py)
            self.resume_point = (self.train_reader.state_dict(), torch.get_rng_state())
        sums = None  # float64 [loss, lm_loss, aux_loss, z_loss, load_balancing_loss, dropped per layer...]
        for micro in range(accumulation):
            set_gradient_sync(self.model, micro == accumulation - 1)  # FSDP: one reduce-scatter per step
            input_ids, labels = self.train_reader.next_batch()
            self.last_batch = (input_ids, labels)
            with autocast_context(config, ctx.device):
                out = self.forward(input_ids.to(ctx.device), shift_labels=labels.to(ctx.device), step=self.step)
            loss = training_loss(out, config.model.mtp_loss_weight, aux_scale)
            if self.engine is not None:
                self.engine.backward(loss)  # DeepSpeed divides by the accumulation steps itself
                self.engine.step()  # a no-op until the last micro-batch of the step
            else:
                (loss / accumulation).backward()
            micro_values = micro_batch_metrics(loss, out)
            sums = micro_values if sums is None else sums + micro_values
        self.resume_point = None
        means = world_mean(sums / accumulation, ctx, "step losses and drop fractions")
        if self.engine is not None:
            grad_norm = torch.tensor(float(self.engine.get_global_grad_norm() or 0.0), device=ctx.device)
            skipped = torch.zeros((), dtype=torch.bool, device=ctx.device)
        else:
            if self.replicator is not None:
                self.replicator.add_replica_grads()
            reduce_gradients(self.model, ctx)
            grad_norm = clip_grad_norm_(self.model, config.train.grad_clip, ctx)
            # both numbers are global, so every rank skips alike (mymoe/train/guard.py)
            finite = torch.isfinite(means[0]) & torch.isfinite(grad_norm)
            step_if_finite(self.optimizer, finite)
            skipped = ~finite
            self.optimizer.zero_grad(set_to_none=True)
        expert_loads, expert_rows = self.update_expert_biases()
        self.step += 1
        self.tokens_seen += self.tokens_per_step
        if self.reviver is not None:
            self.revivals += self.reviver.observe(self.step, expert_loads)
        if self.replicator is not None:  # the owners' new weights (stepped, or revived) into the copies
            self.replicator.observe(self.step, expert_loads)
            self.replicator.refresh()
        if self.debug is not None:
            self.log_lines += self.debug.report(self.step)
        return StepMetrics(means[:5], means[5:], grad_norm, skipped, expert_loads, expert_rows, lr, aux_scale)

    def reset_routers(self) -> None:
        """Re-initialise every router (the same weights on every rank: seeded by the seed and the step) and
        forget their optimizer state, so AdamW restarts its moments for them; training continues."""
        reset = self.model.reset_routers(self.config.train.seed + self.step)
        for param in reset:
            self.optimizer.state.pop(param, None)
        self.log_lines.append(
            f"step {self.step}: re-initialised the routers of {len(list(self.model.iter_moe_layers()))} MoE layers "
            f"and cleared their optimizer state (model.moe.router_reset_interval="
            f"{self.config.model.moe.router_reset_interval})"
        )

    def abandon_step(self) -> None:
        """Undo a step stopped before its optimizer update: data position and RNG back at the step boundary."""
        reader_state, rng = self.resume_point
        self.train_reader.load_state_dict(reader_state)
        torch.set_rng_state(rng)
        self.model.zero_grad(set_to_none=True)
        self.resume_point = None

    def update_expert_biases(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Sum every layer's load over all ranks, and gather the rows each rank's experts computed, in one
        collective; update the aux-loss-free biases on the device; return (loads [layers, experts], rows
        [layers, ranks]) for logging."""
        layers = list(self.model.iter_moe_layers())
        ctx = self.ctx
        if not layers:
            return torch.zeros(0, 0, device=ctx.device), torch.zeros(0, ctx.world_size, device=ctx.device)
        # [layers, experts], this rank's tokens
        loads = torch.stack([layer.pending_load().to(ctx.device, torch.float32) for layer in layers])
        rows = torch.zeros(len(layers), ctx.world_size, device=ctx.device)  # [layers, ranks], this rank's column
        rows[:, ctx.rank] = torch.stack([layer.pending_rows().to(ctx.device, torch.float32) for layer in layers])
        packed = torch.cat([loads, rows], dim=1)
        if ctx.is_distributed:
            all_reduce(packed, "all_reduce (expert loads and rows of every MoE layer, world)", ctx.timeout_seconds)
        loads, rows = packed.split([loads.shape[1], ctx.world_size], dim=1)
        for layer, load in zip(layers, loads):
            layer.update_expert_bias(load)
        return loads, rows

    def evaluate(self, stop: Optional[GracefulStop] = None) -> Optional[float]:
        """Mean lm loss over the first eval_steps batches of the held-out split (the same ones every time);
        None when there is no such split, or when a stop was requested (asked between batches)."""
        valid_reader = build_reader(self.config, self.ctx, "valid")
        if valid_reader is None:
            return None
        batches = (valid_reader.next_batch() for _ in range(self.config.train.eval_steps))
        summed = sum_lm_loss(
            self.model, batches, self.config, self.ctx.device, stop.requested if stop is not None else None
        )
        if summed is None:
            return None
        return float(world_mean(torch.tensor([summed.loss]), self.ctx, "evaluation loss")[0])

    def finished(self) -> bool:
        return self.step >= self.total_steps


def checkpoint_manager(config: Config, ctx: ParallelContext) -> CheckpointManager:
    return CheckpointManager(Path(config.train.out_dir) / "checkpoints", config, ctx)


def run(config: Config, deepspeed_config: Optional[str] = None, progress: bool = True) -> TrainResult:
    """Join the job, train to the end, save the last checkpoint, leave the job."""
    check_engine(config, deepspeed_config)  # before any collective, on every rank alike
    ctx = init_distributed(config)
    try:
        with out_dir_lock(config.train.out_dir, ctx):  # before anything is read from or written to it
            return train(config, ctx, deepspeed_config, progress)
    finally:
        shutdown()


def train(
    config: Config, ctx: ParallelContext, deepspeed_config: Optional[str] = None, progress: bool = True
) -> TrainResult:
    checkpoints = checkpoint_manager(config, ctx)
    resuming = checkpoints.latest() is not None
    if resuming and not config.train.resume:  # every rank got the same answer from latest()
        raise ConfigError(fresh_run_refusal(checkpoints.root, committed_steps(checkpoints.root)))
    trainer = Trainer(config, ctx, deepspeed_config, init_from=None if resuming else config.train.init_from)
    if resuming:
        checkpoints.load_latest(trainer)
    train_config, out_dir = config.train, Path(config.train.out_dir)
    logger = MetricsLogger(
        str(out_dir),
        trainer.total_steps,
        enabled=ctx.rank == 0,
        dead_expert_window=train_config.dead_expert_window,
        start_step=trainer.step,
        progress=progress,
    )
    model = trainer.model
    through = f" (DeepSpeed {deepspeed_config})" if deepspeed_config else (" (FSDP)" if config.parallel.fsdp else "")
    logger.write(
        f"model: {model.num_parameters() / 1e6:.2f}M parameters "
        f"({model.num_parameters(active_only=True) / 1e6:.2f}M active); world {ctx.world_size} = "
        f"EP {ctx.expert_parallel_size} x EDP {ctx.expert_data_parallel_size}{through}; "
        f"{trainer.tokens_per_step:,} tokens/step; steps {trainer.step} -> {trainer.total_steps}; logs in {out_dir}"
    )
    flops_per_token = model.flops_per_token(config.data.seq_len)
    peak = peak_flops_per_second(ctx.device) * ctx.world_size
    result = TrainResult(steps=trainer.step, out_dir=str(out_dir))
    try:
        with GracefulStop(ctx, trainer, train_config.stop_timeout_seconds) as stop:
            train_steps(trainer, checkpoints, logger, result, stop, flops_per_token, peak)
        logger.end_progress()
        checkpoints.save(trainer)
        checkpoints.wait()
    finally:
        logger.close()
    result.steps, result.tokens_seen = trainer.step, trainer.tokens_seen
    final = f"{result.losses[-1]:.4f}" if result.losses else "n/a (nothing left to train)"
    logger.write(
        f"trained to step {trainer.step} ({trainer.tokens_seen:,} tokens); final loss {final}; "
        f"metrics in {out_dir / 'metrics.jsonl'}; checkpoint in {checkpoints.root}"
    )
    return result


def train_steps(
    trainer: Trainer, checkpoints, logger, result: TrainResult, stop: GracefulStop, flops_per_token: float, peak: float
) -> None:
    """Steps until the run is finished or a signal asks every rank to stop.

    A step's metrics stay on the device until a step that logs, evaluates or checkpoints (or the last):
    then the steps since the last report are read in one copy, and logged and guarded in order.
    """
    train_config = trainer.config.train
    guard = NonFiniteGuard(train_config.max_nonfinite_steps)
    unread: list = []  # (step, StepMetrics) since the last report
    since = time.perf_counter()  # when the first unread step began
    while not trainer.finished():
        try:
            metrics = trainer.train_step()
        except StopNow as why:
            trainer.abandon_step()
            report(trainer, unread, since, guard, logger, result, flops_per_token, peak)
            logger.write(f"{why}: the step in progress was abandoned; saving step {trainer.step} to resume from")
            return
        step = trainer.step
        unread.append((step, metrics))
        for line in trainer.log_lines:
            logger.write(line)
        trainer.log_lines = []
        evaluating = train_config.eval_interval and (step % train_config.eval_interval == 0 or trainer.finished())
        checkpointing = (
            train_config.checkpoint_interval and step % train_config.checkpoint_interval == 0 and not trainer.finished()
        )
        if step % train_config.log_interval == 0 or trainer.finished() or evaluating or checkpointing:
            report(trainer, unread, since, guard, logger, result, flops_per_token, peak)
            unread = []
        if evaluating:
            eval_loss = trainer.evaluate(stop)
            if eval_loss is not None:
                result.eval_losses.append(eval_loss)
                perplexity = math.exp(min(eval_loss, 50.0))
                logger.log(step, {"eval/loss": eval_loss, "eval/perplexity": perplexity})
                logger.write(f"step {step}: eval loss {eval_loss:.4f}, perplexity {perplexity:.2f}")
        if stop.requested():  # the caller saves the last checkpoint
            report(trainer, unread, since, guard, logger, result, flops_per_token, peak)
            logger.write(
                f"{stop.signal_name or 'a signal on another rank'}: stopping after step {step}, "
                f"saving a checkpoint to resume from"
            )
            return
        if checkpointing:
            checkpoints.save(trainer)
        if not unread:
            since = time.perf_counter()


def report(
    trainer: Trainer,
    unread: list,
    since: float,
    guard: NonFiniteGuard,
    logger,
    result: TrainResult,
    flops_per_token: float,
    peak: float,
) -> None:
    """Read the unread steps' metrics in one copy; record, log (at log_interval and the last step) and guard
    each in order. tokens/s is the mean since the first of them began: a step that does not read the device
    returns before its work is done, so one step's own time would mean little."""
    if not unread:
        return
    StepMetrics.read_all([metrics for _, metrics in unread])
    tokens_per_second = trainer.tokens_per_step * len(unread) / (time.perf_counter() - since)
    log_interval = trainer.config.train.log_interval
    logger.progress(unread[-1][0], unread[-1][1]["loss"], tokens_per_second)
    for step, metrics in unread:
        result.losses.append(metrics["loss"])
        logger.observe_experts(step, metrics["expert_loads"])
        if step % log_interval == 0 or step == trainer.total_steps:
            scalars = {
                key: metrics[key]
                for key in (
                    "loss",
                    "lm_loss",
                    "aux_loss",
                    "z_loss",
                    "load_balancing_loss",
                    "lr",
                    "aux_loss_scale",
                    "grad_norm",
                )
            }
            scalars.update(
                tokens_per_second=tokens_per_second,
                tokens_seen=trainer.tokens_seen,
                mfu=flops_per_token * tokens_per_second / peak,
                dropped_fraction=sum(metrics["dropped"]) / max(len(metrics["dropped"]), 1),
            )
            without = None
            if trainer.replicator is not None:  # what the ranks would have computed without the copies
                ctx = trainer.ctx
                without = [
                    unreplicated_rows(loads, ctx.expert_parallel_size, ctx.expert_data_parallel_size)
                    for loads in metrics["expert_loads"]
                ]
            logger.log(step, scalars, metrics["expert_loads"], metrics["dropped"], metrics["expert_rows"], without)
        guard.observe(trainer, metrics, logger, step)  # after the log, so the skipped steps are in it
    for revival in trainer.revivals:
        logger.event(revival.step, "revived", revival.message(trainer.config.train.revival_window))
    trainer.revivals = []
