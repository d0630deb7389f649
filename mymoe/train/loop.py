"""The training loop: reads like a recipe, each ingredient built by its own module.

    ids -> model (router -> dispatch -> experts -> combine) -> lm loss + aux -> backward
    -> reduce grads (world for dense, expert-data-parallel for experts) -> clip on the true global norm
    -> optimizer step -> expert-bias update from the step's load -> metrics -> (checkpoint)
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from mymoe.config import Config
from mymoe.data import build_train_reader
from mymoe.model import MoECausalLM
from mymoe.parallel import ParallelContext, clip_grad_norm_, init_distributed, parallelize, reduce_gradients, shutdown
from mymoe.train.metrics import MetricsLogger, peak_flops_per_second
from mymoe.train.optim import Schedule, aux_loss_scale, build_optimizer


@dataclass
class TrainResult:
    steps: int
    losses: list = field(default_factory=list)  # global mean loss of every step, for tests and summaries
    eval_losses: list = field(default_factory=list)
    out_dir: str = ""


def autocast_context(config: Config, device: torch.device):
    precision = config.train.precision
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def world_mean(value: torch.Tensor, ctx: ParallelContext) -> float:
    value = value.detach().float().clone()
    if ctx.world_size > 1:
        dist.all_reduce(value)
        value /= ctx.world_size
    return float(value)


def build_readers(config: Config, ctx: ParallelContext):
    data, tr = config.data, config.train
    if not data.train_prefixes:
        raise ValueError("data.train_prefixes is empty: preprocess a corpus with `python -m data_tools preprocess` "
                         "and pass --data.train_prefixes=[path/prefix]")
    common = dict(seq_len=data.seq_len, micro_batch_size=tr.micro_batch_size, dp_rank=ctx.rank,
                  dp_world_size=ctx.world_size)
    train_reader = build_train_reader(data.train_prefixes, data.train_weights, seed=tr.seed, **common)
    valid_reader = None
    if data.valid_prefixes:
        valid_reader = build_train_reader(data.valid_prefixes, None, seed=tr.seed + 1, **common)
    return train_reader, valid_reader


class Trainer:
    """Holds everything a step needs; `state_dict`/`load_state_dict` are the checkpoint seam."""

    def __init__(self, config: Config, ctx: ParallelContext, deepspeed_config: Optional[str] = None):
        self.config, self.ctx = config, ctx
        torch.manual_seed(config.train.seed)
        self.model = MoECausalLM(config.model)
        parallelize(self.model, ctx)
        self.model.to(ctx.device)
        self.optimizer = build_optimizer(self.model, config.train)
        self.engine = None
        if deepspeed_config is not None:
            from mymoe.train.deepspeed_engine import initialize_deepspeed

            self.engine, self.optimizer = initialize_deepspeed(self.model, self.optimizer, config, ctx, deepspeed_config)
        self.forward = self.engine if self.engine is not None else self.model
        self.schedule = Schedule(self.optimizer, config.train)
        self.train_reader, self.valid_reader = build_readers(config, ctx)
        self.step = 0
        self.tokens_seen = 0
        self.tokens_per_step = (config.train.micro_batch_size * config.data.seq_len
                                * config.train.gradient_accumulation_steps * ctx.world_size)

    # --- the checkpoint seam -------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"step": self.step, "tokens_seen": self.tokens_seen, "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(), "train_reader": self.train_reader.state_dict(),
                "rng": {"cpu": torch.get_rng_state(),
                        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.tokens_seen = int(state["step"]), int(state["tokens_seen"])
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.train_reader.load_state_dict(state["train_reader"])
        torch.set_rng_state(state["rng"]["cpu"])
        if state["rng"].get("cuda") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state(state["rng"]["cuda"])

    # --- one step ------------------------------------------------------------------------------------
    def train_step(self) -> dict:
        config, ctx = self.config, self.ctx
        accumulation = config.train.gradient_accumulation_steps
        lr = self.schedule.apply(self.step)
        aux_scale = aux_loss_scale(self.step, config.train)
        self.model.train()
        totals = {"loss": 0.0, "lm_loss": 0.0, "aux_loss": 0.0}
        stats = []
        for _ in range(accumulation):
            input_ids, labels = self.train_reader.next_batch()
            input_ids, labels = input_ids.to(ctx.device), labels.to(ctx.device)
            with autocast_context(config, ctx.device):
                out = self.forward(input_ids, labels=labels)
            loss = out.lm_loss + aux_scale * out.aux_loss
            if self.engine is not None:
                # DeepSpeed scales by 1/accumulation itself and counts micro-steps in step()
                self.engine.backward(loss)
                self.engine.step()
            else:
                (loss / accumulation).backward()
            totals["loss"] += float(loss.detach()) / accumulation
            totals["lm_loss"] += float(out.lm_loss.detach()) / accumulation
            totals["aux_loss"] += float(torch.as_tensor(out.aux_loss).detach()) / accumulation
            stats = out.router_stats
        if self.engine is not None:
            grad_norm = float(self.engine.get_global_grad_norm() or 0.0)
        else:
            reduce_gradients(self.model, ctx)
            grad_norm = float(clip_grad_norm_(self.model, config.train.grad_clip, ctx))
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        expert_loads = self.update_expert_biases()
        self.step += 1
        self.tokens_seen += self.tokens_per_step
        result = {key: world_mean(torch.tensor(value), ctx) for key, value in totals.items()}
        result.update(lr=lr, grad_norm=grad_norm, expert_loads=expert_loads,
                      dropped=[float(s["dropped_fraction"]) for s in stats],
                      z_loss=sum(float(s.get("z_loss", 0.0)) for s in stats))
        return result

    def update_expert_biases(self) -> list[list[float]]:
        """Sum each layer's load over all ranks, update aux-loss-free biases, return loads for logging."""
        loads = []
        for layer in self.model.iter_moe_layers():
            load = layer.pending_load().to(self.ctx.device, torch.float32)
            if self.ctx.world_size > 1:
                dist.all_reduce(load)
            layer.update_expert_bias(load)
            loads.append(load.cpu().tolist())
        return loads

    @torch.no_grad()
    def evaluate(self) -> Optional[float]:
        if self.valid_reader is None:
            return None
        self.model.eval()
        total = torch.zeros((), device=self.ctx.device)
        for _ in range(self.config.train.eval_steps):
            input_ids, labels = self.valid_reader.next_batch()
            with autocast_context(self.config, self.ctx.device):
                out = self.model(input_ids.to(self.ctx.device), labels=labels.to(self.ctx.device))
            total += out.lm_loss.float()
        return world_mean(total / self.config.train.eval_steps, self.ctx)

    def finished(self) -> bool:
        tr = self.config.train
        return self.step >= tr.max_steps or (tr.max_tokens is not None and self.tokens_seen >= tr.max_tokens)


def run(config: Config, deepspeed_config: Optional[str] = None, progress: bool = True) -> TrainResult:
    ctx = init_distributed(config)
    try:
        return _run(config, ctx, deepspeed_config, progress)
    finally:
        shutdown()


def _run(config: Config, ctx: ParallelContext, deepspeed_config: Optional[str], progress: bool) -> TrainResult:
    from mymoe.checkpoint import CheckpointManager

    trainer = Trainer(config, ctx, deepspeed_config)
    out_dir = Path(config.train.out_dir)
    checkpoints = CheckpointManager(out_dir / "checkpoints", config, ctx)
    if config.train.resume:
        checkpoints.load_latest(trainer)
    is_main = ctx.rank == 0
    logger = MetricsLogger(str(out_dir), config.train.max_steps, enabled=is_main,
                           dead_expert_window=config.train.dead_expert_window, start_step=trainer.step,
                           progress=progress)
    if is_main:
        config_text = (f"model: {trainer.model.num_parameters() / 1e6:.2f}M parameters "
                       f"({trainer.model.num_parameters(active_only=True) / 1e6:.2f}M active), "
                       f"world {ctx.world_size} = EP {ctx.expert_parallel_size} x EDP {ctx.expert_data_parallel_size}, "
                       f"{trainer.tokens_per_step} tokens/step, from step {trainer.step}")
        logger.write(config_text)
    flops_per_token = trainer.model.flops_per_token(config.data.seq_len)
    peak = peak_flops_per_second(ctx.device) * ctx.world_size
    result = TrainResult(steps=trainer.step, out_dir=str(out_dir))
    try:
        while not trainer.finished():
            start = time.perf_counter()
            metrics = trainer.train_step()
            elapsed = time.perf_counter() - start
            tokens_per_second = trainer.tokens_per_step / elapsed
            result.losses.append(metrics["loss"])
            logger.progress(trainer.step, metrics["loss"], tokens_per_second)
            step = trainer.step
            if step % config.train.log_interval == 0 or trainer.finished():
                scalars = {"loss": metrics["loss"], "lm_loss": metrics["lm_loss"], "aux_loss": metrics["aux_loss"],
                           "z_loss": metrics["z_loss"], "lr": metrics["lr"], "grad_norm": metrics["grad_norm"],
                           "tokens_per_second": tokens_per_second, "tokens_seen": trainer.tokens_seen,
                           "mfu": flops_per_token * tokens_per_second / peak}
                logger.log(step, scalars, metrics["expert_loads"], metrics["dropped"])
            if config.train.eval_interval and (step % config.train.eval_interval == 0 or trainer.finished()):
                eval_loss = trainer.evaluate()
                if eval_loss is not None:
                    result.eval_losses.append(eval_loss)
                    logger.log(step, {"eval/loss": eval_loss, "eval/perplexity": float(torch.tensor(eval_loss).exp())})
                    logger.write(f"step {step}: eval loss {eval_loss:.4f} "
                                 f"perplexity {float(torch.tensor(eval_loss).exp()):.2f}")
            if config.train.checkpoint_interval and step % config.train.checkpoint_interval == 0 and not trainer.finished():
                checkpoints.save(trainer)
        checkpoints.save(trainer)
        checkpoints.wait()
    finally:
        logger.close()
    result.steps = trainer.step
    if is_main:
        print(f"trained {trainer.step} steps, {trainer.tokens_seen:,} tokens; final loss "
              f"{result.losses[-1] if result.losses else float('nan'):.4f}; checkpoint in {checkpoints.root}", flush=True)
    return result
