"""A parallel layout checked against one process: the work of ``torchrun ... -m mymoe.verify`` (verify.py).

Every rank trains a few steps in the layout the config asks for (expert parallelism, FSDP, gradient
accumulation, activation checkpointing, adapters), through the trainer itself. The batches each rank
read are then gathered, and every rank replays the same steps as one process holding the whole model:
for each micro-batch it runs every rank's slice in turn, averages their losses as data parallelism
does, then clips with torch.nn.utils.clip_grad_norm_ and steps a plain AdamW. It prints the largest
difference in loss, gradient norm and parameters (each rank compares the shard it holds, the worst over
all ranks is reported) and exits 1 above the tolerance.

Router noise and dropout are switched off for the check: each rank draws its own, which one process cannot
replay.
The whole model must fit in one process (shrink it with overrides, e.g. --model.num_hidden_layers=2).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from typing import Optional

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from mymoe.checkpoint.layout import expert_rows
from mymoe.config import Config, ConfigError, load_config
from mymoe.load import init_from as load_initial_weights
from mymoe.model import MoECausalLM
from mymoe.model.transformer import training_loss
from mymoe.parallel import ParallelContext, init_distributed, shutdown
from mymoe.parallel.fsdp import is_fully_sharded
from mymoe.optim import build_optimizer, parameter_groups
from mymoe.peft import apply_peft
from mymoe.train import loop as train_loop
from mymoe.train.loop import Trainer, autocast_context, check_data
from mymoe.train.optim import Schedule, aux_loss_scale

# test-only: names a bug to plant in the layout, so a test can see verify fail (not in --help)
BREAK_VARIABLE = "MYMOE_VERIFY_BREAK"


def without_randomness(config: Config) -> Config:
    """The config without router noise and dropout, the random draws no other layout can replay."""
    moe = dataclasses.replace(config.model.moe, router_jitter_noise=0.0, router_noise_std=0.0)
    no_dropout = dict(attention_dropout=0.0, hidden_dropout=0.0, expert_dropout=0.0)
    return dataclasses.replace(config, model=dataclasses.replace(config.model, moe=moe, **no_dropout))


class RecordingReader:
    """The trainer's reader, keeping each batch it hands out."""

    def __init__(self, reader):
        self.reader, self.batches = reader, []

    def next_batch(self):
        batch = self.reader.next_batch()
        self.batches.append(batch)
        return batch

    def __getattr__(self, name):
        return getattr(self.reader, name)


def break_layout(trainer) -> None:
    """Skip the gradient reduction: each rank steps on its own gradients (the planted bug)."""
    train_loop.reduce_gradients = lambda model, ctx: None
    if hasattr(trainer.model, "set_requires_gradient_sync"):
        never = trainer.model.set_requires_gradient_sync
        trainer.model.set_requires_gradient_sync = lambda enabled, **kwargs: never(False, **kwargs)


def gather_batches(batches: list, ctx: ParallelContext) -> list[list[tuple]]:
    """[micro-batch][rank] -> (input_ids, labels) of every rank, on every rank."""
    if not ctx.is_distributed:
        return [[batch] for batch in batches]
    gathered = []
    for input_ids, labels in batches:
        both = torch.stack((input_ids, labels)).to(ctx.device)
        parts = [torch.empty_like(both) for _ in range(ctx.world_size)]
        dist.all_gather(parts, both)
        gathered.append([(part[0].cpu(), part[1].cpu()) for part in parts])
    return gathered


def build_reference(config: Config, init_from: Optional[str] = None) -> MoECausalLM:
    """The whole model as the trainer builds it before any layout is applied."""
    torch.manual_seed(config.train.seed)
    model = MoECausalLM(config.model)
    if init_from is not None:
        load_initial_weights(model, config, init_from)
    if config.peft.enabled:
        apply_peft(
            model,
            config.peft.lora_rank,
            config.peft.lora_alpha,
            config.peft.lora_targets,
            config.peft.prefix_length,
            seed=config.train.seed,
        )
    return model


def reference_step(
    model, optimizer, schedule, config: Config, step: int, batches: list[list[tuple]], device
) -> tuple[float, float]:
    """One optimizer step of one process over every rank's slices; (mean loss, grad norm before clipping)."""
    train = config.train
    schedule.apply(step)
    aux_scale = aux_loss_scale(step, train)
    slices = [part for micro in batches for part in micro]
    total = 0.0
    for input_ids, labels in slices:
        with autocast_context(config, device):
            out = model(input_ids.to(device), shift_labels=labels.to(device))
        loss = training_loss(out, config.model.mtp_loss_weight, aux_scale)
        (loss / len(slices)).backward()
        total += float(loss.detach())
    params = [p for p in model.parameters() if p.grad is not None]
    if train.grad_clip > 0:
        norm = torch.nn.utils.clip_grad_norm_(params, train.grad_clip)
    else:
        norm = torch.nn.utils.get_total_norm([p.grad for p in params])
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    for layer in model.iter_moe_layers():
        layer.update_expert_bias(layer.pending_load().to(device, torch.float32))
    return total / len(slices), float(norm)


def held_part(reference: torch.Tensor, param: torch.Tensor, rows) -> tuple[torch.Tensor, torch.Tensor]:
    """(the shard of param this rank holds, the same part of the reference's whole tensor)."""
    if rows is not None:  # expert parallelism: this rank's experts
        reference = reference[rows.first : rows.first + rows.count]
    if isinstance(param, DTensor):  # FSDP: this rank's rows of them
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        shape, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
        for dim, (start, size) in enumerate(zip(offset, shape)):
            reference = reference.narrow(dim, start, size)
        param = param.to_local()
    return param, reference


def verify(config: Config, ctx: ParallelContext, steps: int = 3, broken: bool = False) -> dict:
    """Train `steps` steps in ctx's layout and in one process; the largest differences, equal on every rank:
    {"loss", "grad_norm", "parameters": max abs difference, "parameter": its name, "history": per step,
    "fully_sharded": whether FSDP was applied}."""
    config = without_randomness(config)
    trainer = Trainer(config, ctx, init_from=config.train.init_from)
    trainer.train_reader = RecordingReader(trainer.train_reader)
    if broken:
        break_layout(trainer)
    reference = build_reference(config, config.train.init_from).to(ctx.device)
    optimizer = build_optimizer(parameter_groups(reference, config.train.weight_decay), config.train)
    schedule = Schedule(optimizer, config.train, trainer.total_steps)
    history = []
    for step in range(steps):
        metrics = trainer.train_step()
        batches = gather_batches(trainer.train_reader.batches, ctx)
        trainer.train_reader.batches = []
        reference_loss, reference_norm = reference_step(
            reference, optimizer, schedule, config, step, batches, ctx.device
        )
        history.append(
            {
                "step": step + 1,
                "loss": metrics["loss"],
                "reference_loss": reference_loss,
                "grad_norm": metrics["grad_norm"],
                "reference_grad_norm": reference_norm,
            }
        )
    reference_params = dict(reference.named_parameters())
    rows = expert_rows(trainer.model)
    worst, worst_name = 0.0, ""
    for name, param in trainer.model.named_parameters():
        mine, expected = held_part(reference_params[name].detach(), param.detach(), rows.get(name))
        difference = (mine - expected).abs().max().item() if mine.numel() else 0.0
        if difference > worst:
            worst, worst_name = difference, name
    differences = torch.tensor(
        [
            worst,
            max(abs(h["loss"] - h["reference_loss"]) for h in history),
            max(abs(h["grad_norm"] - h["reference_grad_norm"]) for h in history),
        ],
        dtype=torch.float64,
        device=ctx.device,
    )
    if ctx.is_distributed:
        mine = differences.clone()
        dist.all_reduce(differences, op=dist.ReduceOp.MAX)
        names = [None] * ctx.world_size
        dist.all_gather_object(names, (float(mine[0]), worst_name))
        worst_name = max(names)[1]
    return {
        "parameters": float(differences[0]),
        "parameter": worst_name,
        "loss": float(differences[1]),
        "grad_norm": float(differences[2]),
        "history": history,
        "fully_sharded": is_fully_sharded(trainer.model),
    }


def layout_name(config: Config, ctx: ParallelContext) -> str:
    parts = [f"world {ctx.world_size} = EP {ctx.expert_parallel_size} x EDP {ctx.expert_data_parallel_size}"]
    if config.parallel.fsdp:
        parts.append("FSDP")
    if config.train.gradient_accumulation_steps > 1:
        parts.append(f"gradient accumulation {config.train.gradient_accumulation_steps}")
    if config.model.gradient_checkpointing:
        parts.append("activation checkpointing")
    return ", ".join(parts)


def run(args: argparse.Namespace, overrides: list[str]) -> None:
    """The command: verify's parsed arguments in, the comparison printed, exit 1 above the tolerance."""
    try:
        config = load_config(args.config, overrides)
        check_data(config)
    except ConfigError as error:
        sys.exit(f"mymoe.verify: {error}")
    ctx = init_distributed(config)
    try:
        if ctx.rank == 0:
            print(
                f"verify: {args.steps} steps in the layout {layout_name(config, ctx)}, against one process on "
                f"the global batch (router noise off)",
                flush=True,
            )
        result = verify(config, ctx, args.steps, broken=bool(os.environ.get(BREAK_VARIABLE)))
    finally:
        shutdown()
    worst = max(result["loss"], result["grad_norm"], result["parameters"])
    if ctx.rank != 0:  # every rank holds the same verdict
        sys.exit(1 if worst > args.tolerance else 0)
    for h in result["history"]:
        print(
            f"  step {h['step']}: loss {h['loss']:.6f} vs {h['reference_loss']:.6f}, grad norm "
            f"{h['grad_norm']:.6f} vs {h['reference_grad_norm']:.6f}"
        )
    print(
        f"largest differences: loss {result['loss']:.3g}, grad norm {result['grad_norm']:.3g}, parameters "
        f"{result['parameters']:.3g} ({result['parameter'] or 'none'})"
    )
    if worst > args.tolerance:
        print(
            f"FAILED: {worst:.3g} is above the tolerance {args.tolerance:g}: this layout does not train like one "
            f"process",
            flush=True,
        )
        sys.exit(1)
    print(f"OK: every difference is within {args.tolerance:g}", flush=True)
