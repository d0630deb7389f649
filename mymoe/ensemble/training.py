"""Train an ensemble's gate: for each training sample the target is the member that fits it best (the lowest
mean loss on that sample, computed by the members under no_grad), and the gate learns it by cross-entropy;
with lm_loss_weight > 0 the ensemble's own lm loss joins, which is what trains the members' adapters.

Samples come from .bin/.idx datasets through the trainer's reader (shuffled, blended by size), the
optimizer is mymoe.optim's AdamW over the trainable parameters (the gate, and adapters when configured)
with the trainer's warmup + cosine schedule, and the metrics go through the trainer's logger: a progress
bar, <ensemble>/gate_training/metrics.jsonl and TensorBoard events. Each call starts a fresh optimizer;
the step count continues from the manifest's gate_steps.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from mymoe.config import TrainConfig
from mymoe.data.reader import build_train_reader
from mymoe.ensemble.folder import load_ensemble, read_manifest, save_weights
from mymoe.evaluate.run import check_positions, check_prefix
from mymoe.optim import build_optimizer, parameter_groups
from mymoe.train.metrics import MetricsLogger
from mymoe.train.optim import learning_rate

RECENT_STEPS = 20  # the summary's routing accuracy is over the training batches of this many last steps


def train_gate(
    folder: str | Path,
    prefixes: list[str],
    steps: int,
    batch_size: int = 8,
    seq_len: Optional[int] = None,
    lr: float = 3e-3,
    weight_decay: float = 0.0,
    seed: int = 1234,
    device: Optional[str] = None,
    progress: bool = True,
    announce: Callable[[str], None] = print,
) -> dict:
    """Train the gate of the ensemble in `folder` for `steps` steps and save it there; returns a summary
    {"steps", "gate_steps", "loss", "routing_accuracy", "seconds"}."""
    folder = Path(folder)
    if steps < 1 or batch_size < 1:
        raise ValueError(f"--steps={steps} and --batch-size={batch_size} must be >= 1")
    manifest = read_manifest(folder)  # the inputs are checked before any member is loaded
    seq_len = seq_len or manifest["seq_len"]
    for prefix in prefixes:
        check_prefix(prefix, seq_len, manifest["vocab_size"])
    ensemble, manifest = load_ensemble(folder)
    for member in ensemble.members:
        check_positions(member.config, seq_len)
    lm_loss_weight = manifest["ensemble"]["lm_loss_weight"]
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    ensemble.to(device).train()

    schedule = TrainConfig(lr=lr, min_lr=lr / 10, warmup_steps=min(10, steps // 10), max_steps=steps)
    optimizer = build_optimizer(parameter_groups(ensemble, weight_decay), schedule)
    reader = build_train_reader(prefixes, None, seq_len, batch_size, seed=seed)
    first_step = manifest["gate_steps"]
    logger = MetricsLogger(
        str(folder / "gate_training"), first_step + steps, enabled=True, start_step=first_step, progress=progress
    )
    trainable = sum(p.numel() for p in ensemble.parameters() if p.requires_grad)
    announce(
        f"training the gate of {folder} for {steps} steps on {', '.join(prefixes)}: batch {batch_size}, "
        f"seq_len {seq_len}, lr {lr}, {trainable / 1e6:.2f}M trainable parameters, on {device}"
    )
    recent: list[tuple[float, float]] = []  # (loss, routing accuracy) of the last steps
    start = time.perf_counter()
    try:
        for step in range(steps):
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(step, schedule)
            input_ids, labels = (tensor.to(device) for tensor in reader.next_batch())
            target = ensemble.member_losses(input_ids, labels).argmin(1)  # [B] the member that fits best
            if lm_loss_weight:
                output = ensemble(input_ids, labels)
                gate_logits, lm_loss = output.gate_logits, output.lm_loss
            else:
                gate_logits, lm_loss = ensemble.gate(input_ids), None
            gate_loss = F.cross_entropy(gate_logits.float(), target)
            loss = gate_loss + lm_loss_weight * lm_loss if lm_loss is not None else gate_loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

            accuracy = float((gate_logits.argmax(1) == target).float().mean())
            recent = (recent + [(loss.item(), accuracy)])[-RECENT_STEPS:]
            scalars = {
                "gate/loss": gate_loss.item(),
                "gate/routing_accuracy": accuracy,
                "gate/lr": learning_rate(step, schedule),
            }
            if lm_loss is not None:
                scalars["gate/ensemble_lm_loss"] = lm_loss.item()
            logger.log(first_step + step + 1, scalars)
            tokens_per_second = (step + 1) * input_ids.numel() / (time.perf_counter() - start)
            logger.progress(first_step + step + 1, recent[-1][0], tokens_per_second)
    finally:
        logger.close()
    manifest["gate_steps"] = first_step + steps
    save_weights(ensemble, manifest, folder)
    summary = {
        "steps": steps,
        "gate_steps": manifest["gate_steps"],
        "loss": sum(loss for loss, _ in recent) / len(recent),
        "routing_accuracy": sum(accuracy for _, accuracy in recent) / len(recent),
        "seconds": time.perf_counter() - start,
    }
    announce(
        f"trained the gate of {folder} to step {summary['gate_steps']} in {summary['seconds']:.1f} s: loss "
        f"{summary['loss']:.4f}, routing accuracy {summary['routing_accuracy']:.3f} over the last "
        f"{len(recent)} steps' batches; saved {folder / 'gate.safetensors'}"
    )
    return summary
